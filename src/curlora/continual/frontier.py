"""A fair comparison: learning-rate selection on validation data, and the stability–plasticity frontier.

A method that learns nothing forgets nothing, so comparing methods at one shared learning rate
says little. Each method runs at several rates; the headline uses, per method and rank, the rate
with the best mean *validation* accuracy (validation rows are carved from the training data, never
the evaluation data). The frontier plots, for every rate, how much each method learned (plasticity:
accuracy on each task right after learning it) against what it cost (perplexity increase, BWT,
forgetting), and reads the cost at matched accuracy.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any

from curlora.continual.metrics import seed_stat, interpolate_at_accuracy, mean_std, run_metrics

COSTS = ("ppl_increase", "forgetting", "bwt")
MATCHED_COSTS = ("ppl_increase", "forgetting")  # lower is better; BWT (higher is better) is in the points table


def _group_key(run: Mapping[str, Any]) -> tuple:
    return run["method"], run.get("rank")


def _ok(runs: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [r for r in runs if r.get("status") == "ok"]


def validation_accuracy(run: Mapping[str, Any]) -> float:
    """Mean final accuracy on the validation splits: the only number rate selection may read."""
    return mean_std(run["validation_accuracy"])[0]


def select_learning_rates(runs: Sequence[Mapping[str, Any]],
                          seeds: Collection[int] | None = None) -> list[dict[str, Any]]:
    """Per (method, rank): the rate with the best seed-mean validation accuracy (ties: smaller rate),
    read from the runs of ``seeds`` only (None: every run), the grid that ``confirm_seeds`` then repeat
    at the chosen rate; their runs must not move the choice they were made for. With task orders, the
    mean is pooled over every order run: one rate per method and rank, whatever the order."""
    by_group: dict[tuple, dict[Any, list[float]]] = {}
    for run in _ok(runs):
        if seeds is not None and run.get("seed") not in seeds:
            continue
        by_group.setdefault(_group_key(run), {}).setdefault(run.get("lr"), []).append(validation_accuracy(run))
    choices = []
    for (method, rank), by_lr in by_group.items():
        scores = {lr: mean_std(accs)[0] for lr, accs in by_lr.items()}
        best = max(sorted(scores, key=lambda lr: (lr is not None, lr or 0.0)), key=lambda lr: scores[lr])
        rates = sorted(lr for lr in scores if lr is not None)
        # The best rate at the end of the grid: a better one may lie beyond it (the report says so).
        edge = len(rates) > 1 and best in (rates[0], rates[-1])
        choices.append({"method": method, "rank": rank, "lr": best, "validation_accuracy": scores,
                        "at_grid_edge": edge})
    return choices


def selection_seeds(config: Mapping[str, Any]) -> list[int] | None:
    """The seeds whose runs chose the rates (a results file's config): with ``confirm_seeds``, the grid's
    ``seeds`` only (the confirming runs must not move the choice they were made for); else every run."""
    return config.get("seeds") if config.get("confirm_seeds") else None


def chosen_rates(selection: Sequence[Mapping[str, Any]]) -> dict[tuple, Any]:
    """(method, rank) -> the learning rate validation chose."""
    return {(c["method"], c["rank"]): c["lr"] for c in selection}


def mark_selected(runs: list[dict[str, Any]], selection: Sequence[Mapping[str, Any]]) -> None:
    chosen = chosen_rates(selection)
    for run in runs:
        run["selected"] = chosen.get(_group_key(run), object()) == run.get("lr")


def replicate(run: Mapping[str, Any]) -> str:
    """What one run repeats a point as: its seed, and its task order where the runs have orders."""
    return str(run.get("seed")) if run.get("order") is None else f"{run.get('seed')}, order {run['order']}"


def frontier_points(runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One point per (method, rank, lr): means over seeds (and task orders), std and 95 % interval of
    plasticity and of each cost, and each seed's (seed and order's) values, under ``per_seed``
    (matched-plasticity intervals are read per seed and order)."""
    grouped: dict[tuple, list[tuple[Any, dict[str, Any]]]] = {}
    for run in _ok(runs):
        grouped.setdefault((*_group_key(run), run.get("lr")), []).append((replicate(run), run_metrics(run)))
    ceilings = {run.get("method") for run in _ok(runs) if run.get("ceiling")}
    points = []
    for (method, rank, lr), members in grouped.items():
        point = {"method": method, "rank": rank, "lr": lr, "n_seeds": len(members), "ceiling": method in ceilings}
        for name in ("plasticity", "acc", *COSTS):
            stat = seed_stat(m[name] for _, m in members)
            point[name] = None if stat is None else stat["mean"]
            point[f"{name}_std"] = None if stat is None else stat["std"]
            point[f"{name}_ci95"] = None if stat is None else stat["ci95"]
        point["per_seed"] = {seed: {name: m[name] for name in ("plasticity", *COSTS)} for seed, m in members}
        points.append(point)
    return points


def pareto(pairs: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (accuracy, cost) pairs no other pair beats on both: a diverged rate that learned less
    at a higher cost is not part of a method's frontier."""
    kept, best_cost = [], float("inf")
    for acc, cost in sorted(pairs, key=lambda p: (-p[0], p[1])):
        if cost < best_cost:
            kept.append((acc, cost))
            best_cost = cost
    return sorted(kept)


def cost_at(frontier: Sequence[tuple[float, float]], target: float) -> float | None:
    """The least cost at which a Pareto frontier reaches ``target`` accuracy: below its first
    point that point's cost (more than enough), between points linear, beyond its last None."""
    if not frontier or target > frontier[-1][0]:
        return None
    if target <= frontier[0][0]:
        return frontier[0][1]
    return interpolate_at_accuracy(frontier, target)


def curve_cost(pts: Sequence[Mapping[str, Any]], cost: str, target: float) -> float | None:
    pairs = pareto((p["plasticity"], p[cost]) for p in pts if p["plasticity"] is not None and p[cost] is not None)
    return cost_at(pairs, target)


def matched_accuracy(points: Sequence[Mapping[str, Any]], targets: Sequence[float]) -> list[dict[str, Any]]:
    """At each target plasticity, every adapter's cost interpolated along its Pareto frontier
    (None outside the range its rates reached): on the seed-mean curve, and per seed on that
    seed's own curve, whose spread gives the cost's 95 % interval."""
    curves: dict[tuple, list[Mapping[str, Any]]] = {}
    for p in points:
        if p["plasticity"] is not None and p["lr"] is not None:
            curves.setdefault((p["method"], p["rank"]), []).append(p)
    rows = []
    for target in targets:
        for (method, rank), pts in curves.items():
            row: dict[str, Any] = {"target": target, "method": method, "rank": rank}
            seeds = sorted({seed for p in pts for seed in p.get("per_seed", {})})
            for cost in MATCHED_COSTS:
                row[cost] = curve_cost(pts, cost, target)
                per_seed = [curve_cost([p["per_seed"][seed] for p in pts if seed in p.get("per_seed", {})],
                                        cost, target) for seed in seeds]
                # Only when every seed's curve reaches the target is the spread over seeds meaningful.
                row[f"{cost}_stat"] = seed_stat(per_seed) if per_seed and None not in per_seed else None
            rows.append(row)
    return rows


def default_targets(points: Sequence[Mapping[str, Any]], n: int = 3) -> list[float]:
    """Plasticity levels inside the range most adapter curves reached: with two or three curves all
    of them, with more at least half (one narrow method must not empty the table; it gets dashes). The
    ceilings do not set the levels (they are references, and multitask's plasticity is its ACC, above
    every sequential curve: with two methods beside it there would be no level); they are still read at
    the levels they reach."""
    curves: dict[tuple, list[tuple[float, float]]] = {}
    for p in points:
        if (p["plasticity"] is not None and p["lr"] is not None and p["ppl_increase"] is not None
                and not p.get("ceiling")):
            curves.setdefault((p["method"], p["rank"]), []).append((p["plasticity"], p["ppl_increase"]))
    ranges = {key: [acc for acc, _ in pareto(pairs)] for key, pairs in curves.items()}
    if not ranges:
        return []
    must_reach = len(ranges) if len(ranges) <= 3 else math.ceil(len(ranges) / 2)
    low = sorted(min(v) for v in ranges.values())[must_reach - 1]
    high = sorted((max(v) for v in ranges.values()), reverse=True)[must_reach - 1]
    if low > high:
        return []
    if n == 1 or low == high:
        return [round(low, 3)]
    return [round(low + (high - low) * i / (n - 1), 3) for i in range(n)]


def analyse(runs: list[dict[str, Any]], selection_seeds: Collection[int] | None = None) -> dict[str, Any]:
    """Selection (on the runs of ``selection_seeds``, None: all) + frontier for ``results.json``; marks
    each run ``selected`` in place."""
    selection = select_learning_rates(runs, selection_seeds)
    mark_selected(runs, selection)
    points = frontier_points(runs)
    targets = default_targets(points)
    return {"selection": selection, "points": points, "targets": targets,
            "matched": matched_accuracy(points, targets)}
