"""Continual-learning metrics over an accuracy matrix, and their aggregation over seeds.

The accuracy matrix ``R`` has shape ``(T+1) x T``: row 0 is measured before any training
(heads of unseen tasks may not exist yet, so its entries may be ``None``), row ``i`` (1..T)
is measured after training through task ``i`` (0-based task ``i-1``). In an after-row only the
tasks seen so far (``j < i``) must be numbers; later entries may be ``None``. Every metric
here therefore reads only after-rows at or below the diagonal, never row 0 or unseen tasks.

All functions are pure so the runner, the report and the tests share one definition.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from itertools import zip_longest
from typing import Any

Matrix = Sequence[Sequence[Any]]

# The results.json layout that the runner writes and the report reads.
SCHEMA_VERSION = 1

# Two-sided 95 % Student-t quantiles t(0.975, df) for df = 1..30 (beyond: Cornish-Fisher).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
         2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
         2.052, 2.048, 2.045, 2.042)

# Scalar metrics aggregated per group, in report order.
SCALAR_METRICS = (
    "acc",
    "bwt",
    "forgetting",
    "plasticity",
    "ppl_before",
    "ppl_final",
    "ppl_increase",
    "adapter_params",
    "head_params",
    "stored_per_task",
    "wall_time_s",
    "peak_memory_mb",
)


def _is_number(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def validate_matrix(R: Matrix) -> int:
    """Check the ``(T+1) x T`` shape and required entries; return ``T``.

    Fails loudly so a malformed runner output never turns into a plausible-looking metric.
    """
    if R is None or isinstance(R, (str, bytes)) or not isinstance(R, Sequence):
        raise ValueError(f"accuracy matrix must be a sequence of rows, got {type(R).__name__}")
    T = len(R) - 1
    if T < 1:
        raise ValueError(
            f"accuracy matrix needs T+1 >= 2 rows (before-row + one per task), got {len(R)}"
        )
    for i, row in enumerate(R):
        if isinstance(row, (str, bytes)) or not isinstance(row, Sequence):
            raise ValueError(f"accuracy matrix row {i} is not a sequence")
        if len(row) != T:
            raise ValueError(
                f"accuracy matrix must be (T+1) x T = {T + 1} x {T}; row {i} has {len(row)} entries"
            )
        for j, x in enumerate(row):
            if x is None and (i == 0 or j >= i):
                continue  # before-row or task not yet seen: allowed to be missing
            if not _is_number(x):
                raise ValueError(
                    f"accuracy matrix entry [{i}][{j}] must be a finite number, got {x!r}"
                )
    return T


def final_accuracy(R: Matrix) -> float:
    """ACC: mean accuracy over all tasks after the whole sequence (last row)."""
    T = validate_matrix(R)
    return math.fsum(R[T]) / T


def backward_transfer(R: Matrix) -> float:
    """BWT (Lopez-Paz & Ranzato 2017): mean over j < T-1 of ``R[T][j] - R[j+1][j]``.

    Negative means earlier tasks lost accuracy (forgetting), positive means later training
    helped them. With T=1 there is no earlier task, so BWT is 0.0 by definition.
    """
    T = validate_matrix(R)
    if T == 1:
        return 0.0
    return math.fsum(R[T][j] - R[j + 1][j] for j in range(T - 1)) / (T - 1)


def average_forgetting(R: Matrix) -> float:
    """Average forgetting (Chaudhry et al. 2018) after the last task.

    For each task j < T-1: best accuracy it had at any earlier after-row
    (rows j+1 .. T-1) minus its final accuracy ``R[T][j]``, averaged. Positive means
    forgetting; unlike -BWT it measures the drop from the peak, not from when the task was
    learned. With T=1 it is 0.0 by definition.
    """
    T = validate_matrix(R)
    if T == 1:
        return 0.0
    drops = (max(R[row][j] for row in range(j + 1, T)) - R[T][j] for j in range(T - 1))
    return math.fsum(drops) / (T - 1)


def plasticity(R: Matrix) -> float:
    """Mean of ``R[j+1][j]``: how well each task is learned right after training on it."""
    T = validate_matrix(R)
    return math.fsum(R[j + 1][j] for j in range(T)) / T


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1) over seeds.

    A single value has no spread estimate; its std is reported as 0.0 rather than NaN so
    tables stay readable (check ``n`` to tell the two apart).
    """
    xs = [float(v) for v in values]
    if not xs:
        raise ValueError("mean_std needs at least one value")
    mean = math.fsum(xs) / len(xs)
    if len(xs) == 1:
        return mean, 0.0
    return mean, math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (len(xs) - 1))


def t_quantile_975(df: int) -> float:
    """The 97.5 % quantile of Student's t with ``df`` degrees of freedom (3 decimals)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def interval95(mean: float, std: float, n: int) -> list[float] | None:
    """The 95 % Student-t interval of the mean over ``n`` seeds; None for one seed (no spread)."""
    if n < 2:
        return None
    half = t_quantile_975(n - 1) * std / math.sqrt(n)
    return [mean - half, mean + half]


def seed_stat(values: Iterable[Any]) -> dict[str, Any] | None:
    """mean/std/n and the 95 % interval over the available (non-None) values; None when none."""
    xs = [v for v in values if v is not None]
    if not xs:
        return None
    mean, std = mean_std(xs)
    return {"mean": mean, "std": std, "n": len(xs), "ci95": interval95(mean, std, len(xs))}


def separated(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None) -> bool | None:
    """Whether two seed statistics' 95 % intervals do not overlap (a constant, ``n`` = 0, counts
    as its own point interval); None when either side has no interval (one seed)."""
    def bounds(s: Mapping[str, Any]) -> list[float] | None:
        return [s["mean"], s["mean"]] if s.get("n") == 0 else s.get("ci95")

    if a is None or b is None:
        return None
    ia, ib = bounds(a), bounds(b)
    if ia is None or ib is None:
        return None
    return ia[1] < ib[0] or ib[1] < ia[0]


def constant(value: float) -> dict[str, Any]:
    """A fixed reference (e.g. majority-class accuracy) in the shape of a seed statistic."""
    return {"mean": value, "std": 0.0, "n": 0, "ci95": None}


def run_metrics(run: Mapping[str, Any]) -> dict[str, Any]:
    """Per-run metrics: scalars of ``SCALAR_METRICS`` plus per-task lists.

    Missing perplexity / params / timing give None, so one incomplete field does not hide
    the accuracy metrics. ``ppl_final`` falls back to the last after-task perplexity.
    """
    R = run.get("accuracy_matrix")
    try:
        T = validate_matrix(R)
    except ValueError as e:
        raise ValueError(
            f"run method={run.get('method')} rank={run.get('rank')} seed={run.get('seed')}: {e}"
        ) from e
    ppl = run.get("perplexity") or {}
    after = list(ppl.get("after_task") or [])
    before = ppl.get("before")
    final = ppl.get("final")
    if final is None and after:
        final = after[-1]
    params = run.get("trainable_params") or {}
    # A method that learns every task at once (multitask) has no "earlier" task: forgetting is undefined.
    sequential = run.get("sequential", True)
    return {
        "acc": final_accuracy(R),
        "bwt": backward_transfer(R) if sequential else None,
        "forgetting": average_forgetting(R) if sequential else None,
        "plasticity": plasticity(R),
        "ppl_before": before,
        "ppl_final": final,
        "ppl_increase": final - before if final is not None and before is not None else None,
        "adapter_params": params.get("adapter"),
        "head_params": params.get("heads"),
        "stored_per_task": run.get("stored_per_task", 0),
        "wall_time_s": run.get("wall_time_s"),
        "peak_memory_mb": run.get("peak_memory_mb"),
        "task_accuracy": [float(x) for x in R[T]],
        "ppl_after_task": after,
        "accuracy_matrix": [list(row) for row in R],
        # Generative protocol: the share of greedy answers that were an answer word, per task.
        "valid_answer_rate": list(run.get("valid_answer_rate") or []),
        # Generative protocol: the final row's length-normalised accuracy (acc_norm), per task.
        "accuracy_norm": list(run.get("accuracy_norm") or []),
    }


def _elementwise(lists: Iterable[Sequence[Any]]) -> list[dict[str, float] | None]:
    """Per-position stats; shorter lists (e.g. perplexity not measured) count as missing."""
    return [seed_stat(col) for col in zip_longest(*lists)]


def aggregate_runs(
    runs: Iterable[Mapping[str, Any]], keys: Sequence[str] = ("method", "rank")
) -> list[dict[str, Any]]:
    """Group runs with status "ok" by ``keys`` and give mean/std/n per metric.

    Failed runs are skipped: a partial sequence would bias ACC/BWT. Groups keep the order
    of first appearance. Each group holds the key values, ``n_runs``, ``seeds``, one
    ``{"mean","std","n"}`` (or None) per name in ``SCALAR_METRICS``, and per-element stats
    lists ``task_accuracy`` (final row), ``ppl_after_task`` and ``accuracy_matrix``.
    """
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for run in runs:
        if run.get("status") == "ok":
            groups.setdefault(tuple(run.get(k) for k in keys), []).append(run)
    out = []
    for key, members in groups.items():
        per_run = [run_metrics(r) for r in members]
        n_tasks = {len(m["task_accuracy"]) for m in per_run}
        if len(n_tasks) > 1:
            raise ValueError(f"runs of group {key} disagree on the number of tasks: {n_tasks}")
        agg: dict[str, Any] = dict(zip(keys, key))
        agg["n_runs"] = len(members)
        agg["seeds"] = [r.get("seed") for r in members]
        for name in SCALAR_METRICS:
            agg[name] = seed_stat(m[name] for m in per_run)
        agg["task_accuracy"] = _elementwise(m["task_accuracy"] for m in per_run)
        agg["ppl_after_task"] = _elementwise(m["ppl_after_task"] for m in per_run)
        agg["valid_answer_rate"] = _elementwise(m["valid_answer_rate"] for m in per_run)
        agg["accuracy_norm"] = _elementwise(m["accuracy_norm"] for m in per_run)
        norms = [sum(m["accuracy_norm"]) / len(m["accuracy_norm"]) for m in per_run if m["accuracy_norm"]]
        agg["acc_norm"] = seed_stat(norms) if norms else None
        agg["accuracy_matrix"] = [
            _elementwise(rows) for rows in zip(*(m["accuracy_matrix"] for m in per_run))
        ]
        out.append(agg)
    return out


def summarize(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Summary for ``results["summary"]``: aggregates by (method, rank, lr).

    lr is part of the key so an lr sweep is never averaged together; with one lr per
    method x rank this equals grouping by (method, rank).
    """
    return aggregate_runs(results.get("runs") or [], keys=("method", "rank", "lr"))


def interpolate_at_accuracy(
    points: Iterable[tuple[float, float]], target: float
) -> float | None:
    """Cost needed to reach ``target`` accuracy, linearly interpolated between points.

    ``points`` are (accuracy, cost) for one method. Points sharing an accuracy collapse to
    their lowest cost (the cheapest way to reach it). Returns None when ``target`` lies
    outside the measured accuracy range: extrapolating a frontier would be a guess.
    """
    best: dict[float, float] = {}
    for acc, cost in points:
        if not (_is_number(acc) and _is_number(cost)):
            raise ValueError(f"points must be finite (accuracy, cost) pairs, got {(acc, cost)!r}")
        best[acc] = min(cost, best.get(acc, math.inf))
    pts = sorted(best.items())
    if not pts or not pts[0][0] <= target <= pts[-1][0]:
        return None
    for (a0, c0), (a1, c1) in zip(pts, pts[1:]):
        if a0 <= target <= a1:
            return c0 + (c1 - c0) * (target - a0) / (a1 - a0)
    return pts[0][1]  # single point equal to target
