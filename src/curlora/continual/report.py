"""Markdown report and PNG plots for a continual-learning results dict (schema version 1).

Tables follow the CURLoRA paper (Fawi 2024): Table 1 (accuracy per task after the whole
sequence) and Table 2 (perplexity before/after), plus CL metrics, per-run accuracy
matrices and a "Reading" section that states the comparisons in words, whichever way
they fall. Aggregates are recomputed from the runs so the report never disagrees with them.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from copy import deepcopy
from pathlib import Path
from typing import Any

from curlora.continual.frontier import analyse, chosen_rates, selection_seeds
from curlora.continual.metrics import SCHEMA_VERSION, constant, in_listed_order, separated, summarize
from curlora.continual.plots import (
    DASH, OFF_SCALE_FACTOR, plot_accuracy_matrix, plot_frontier, plot_loss_curves, plot_perplexity, point_name,
)
from curlora.fileio import atomic_write_bytes



def floor_methods(runs: Sequence[Mapping[str, Any]]) -> set[str]:
    """Methods whose backbone stayed frozen (the protocol's floors: head-only, zero-shot, k-shot), as the
    runs recorded it; files
    written before runs carried ``frozen_backbone`` name that method "head"."""
    return {r.get("method") for r in runs
            if r.get("frozen_backbone", r.get("base_method", r.get("method")) == "head")}


def ceiling_methods(runs: Sequence[Mapping[str, Any]]) -> set[str]:
    """Reference rows above the methods (multitask, single-task), as the runs recorded it."""
    return {r.get("method") for r in runs if r.get("ceiling")}


def gap_closed(g: Mapping[str, Any], floor: Mapping[str, Any], ceiling: Mapping[str, Any]) -> float | None:
    """Where a method's mean ACC lies from a floor's (0) to a ceiling's (1); None where either is missing
    or the ceiling is not above the floor."""
    low, high, acc = _mean(floor["acc"]), _mean(ceiling["acc"]), _mean(g["acc"])
    if None in (low, high, acc) or high <= low:
        return None
    return (acc - low) / (high - low)


def _between(g: Mapping[str, Any], floor: Mapping[str, Any], ceiling: Mapping[str, Any]) -> str | None:
    """Where a method's ACC lies from the strongest floor (0 %) to the strongest ceiling (100 %)."""
    share = gap_closed(g, floor, ceiling)
    if share is None:
        return None
    return f"{100 * share:.0f} % of the way from the floor ({_label(floor)}) to the ceiling ({_label(ceiling)})"


INTERVAL_NOTE = ("Values are mean ± sample std over seeds, with the 95 % Student-t interval of the mean "
                 "in brackets, where more than one seed finished. A difference is called resolved only "
                 "when the two 95 % intervals do not overlap; with one seed nothing is resolved.")


def orders_of(runs: Sequence[Mapping[str, Any]]) -> list[str]:
    """The task orders the runs learned in, as named in the config ([] without orders)."""
    return list(dict.fromkeys(r["order"] for r in runs if r.get("order") is not None))


def interval_note(runs: Sequence[Mapping[str, Any]]) -> str:
    """INTERVAL_NOTE, saying what the intervals run over: seeds, or seeds and task orders."""
    orders = orders_of(runs)
    if not orders:
        return INTERVAL_NOTE
    return (f"Values are mean ± sample std over seeds and task orders (every run of a seed in an order counts "
            f"once; orders {', '.join(map(escape, orders))}), with the 95 % Student-t interval of the mean in brackets, where "
            f"more than one run finished; the per-order table gives each order over its seeds alone. A difference "
            f"is called resolved only when the two 95 % intervals do not overlap; with one run nothing is resolved. "
            f"The runs of one seed in different orders share that seed's random draws, so they are not "
            f"independent samples: these intervals can be narrower than the seeds alone support (a reading that "
            f"counts each seed once, as its mean over the orders, is the stricter one).")


def step_names(runs: Sequence[Mapping[str, Any]], task_names: list[str]) -> list[str]:
    """What the k-th step of the sequence is called where runs of several orders are averaged by step
    (perplexity after each task, accuracy matrices): its task's name if every run learned the tasks in
    one order, else its place ("1st task learned" is not one task across orders)."""
    sequences = {tuple(r["task_order"]) for r in runs if r.get("task_order") is not None}
    if not sequences:
        return task_names
    if len(sequences) == 1:
        return [task_names[k] for k in next(iter(sequences))]
    return [f"task {k + 1} learned" for k in range(len(task_names))]

Stat = Mapping[str, float] | None


# Every string from data or config (task and label names, method names, the model, error messages) is
# written through this: a "|" or line break would end a table row, "<img ...>" would be markup, "$", "*",
# "`" or "[...](...)" would turn into math, emphasis, code or a link.
# (format_table escapes "|" in every cell, generated or not.)
_MARKDOWN = str.maketrans({"\\": "\\\\", "$": "\\$", "*": "\\*", "`": "\\`", "[": "\\[", "]": "\\]",
                           "&": "&amp;", "<": "&lt;", ">": "&gt;", "\r": " ", "\n": " "})


def escape(text: Any) -> str:
    """``text`` as literal Markdown (and HTML) on one line."""
    return str(text).translate(_MARKDOWN)


def format_table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    """Markdown table; None renders as an em dash, pipes and line breaks are escaped (cells from data
    come through :func:`escape` first)."""

    def cell(x: Any) -> str:
        return DASH if x is None else str(x).replace("|", "\\|").replace("\r", " ").replace("\n", " ")

    lines = [
        "| " + " | ".join(cell(h) for h in headers) + " |",
        "|" + "|".join("---" for _ in headers) + "|",
    ]
    for i, row in enumerate(rows):
        if len(row) != len(headers):
            raise ValueError(f"row {i} has {len(row)} cells, expected {len(headers)}")
        lines.append("| " + " | ".join(cell(x) for x in row) + " |")
    return "\n".join(lines)


def fmt_num(x: float | None, digits: int, signed: bool = False) -> str:
    if x is None:
        return DASH
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def fmt_stat(s: Stat, digits: int = 3, signed: bool = False) -> str:
    """mean ± std [95 % interval] when several seeds contributed, plain mean otherwise."""
    if s is None:
        return DASH
    text = fmt_num(s["mean"], digits, signed)
    if s["n"] < 2:
        return text
    ci = s.get("ci95")
    bracket = f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else ""
    return f"{text} ± {s['std']:.{digits}f}{bracket}"


def _mean(s: Stat) -> float | None:
    return None if s is None else s["mean"]


def fmt_lr(lr: Any) -> str:
    return DASH if lr is None else f"{lr:g}"


def _name(g: Mapping[str, Any]) -> str:
    """A method × rank as plots draw it."""
    return g["method"] if g.get("rank") is None else f"{g['method']} r{g['rank']}"


def _label(g: Mapping[str, Any]) -> str:
    """A method × rank as the report's prose writes it."""
    return escape(_name(g))


def _plot_accuracy_matrix(g: Mapping[str, Any], task_names: list[str], path: Path, sequential: bool) -> None:
    grid = [[math.nan if x is None else x["mean"] for x in row] for row in g["accuracy_matrix"]]
    runs, what = g["n_runs"], "run" if g.get("orders") else "seed"
    plot_accuracy_matrix(grid, task_names, f"{_name(g)} accuracy (mean of {runs} {what}{'s' * (runs > 1)})", path,
                         rows=stage_names(task_names, sequential))


def stage_names(task_names: Sequence[str], sequential: bool = True) -> list[str]:
    """The rows of an accuracy matrix: 'before', then 'after <task>' for each step of the sequence. A
    method that learns every task at its first step (multitask) has one row after it, then rows where its
    unchanged model is scored on one more task each."""
    if sequential:
        return ["before", *(f"after {t}" for t in task_names)]
    return ["before", "after every task at once", *(f"unchanged, + {t} scored" for t in task_names[1:])]


def _matrix_filenames(groups: list[Mapping[str, Any]]) -> list[str]:
    """accuracy_matrix_<method>_r<rank>.png; lr is appended only if it disambiguates."""
    clash = Counter((g["method"], g.get("rank")) for g in groups)
    names = []
    for g in groups:
        stem = f"accuracy_matrix_{g['method']}"
        if g.get("rank") is not None:
            stem += f"_r{g['rank']}"
        if clash[(g["method"], g.get("rank"))] > 1:
            stem += f"fmt_lr{fmt_lr(g.get('lr'))}"
        names.append(re.sub(r"[^A-Za-z0-9_.+-]", "_", stem) + ".png")
    return names


def _resolution(a: Stat, b: Stat) -> str:
    verdict = separated(a, b)
    if verdict is None:
        return "one seed: not resolved"
    return "resolved: intervals separate" if verdict else "not resolved: intervals overlap"


def _compare(g: Mapping[str, Any], ref_acc: Stat, ref_tasks: list[Stat],
             task_names: list[str], ref_name: str) -> str:
    """Clause comparing a group's ACC and final per-task accuracies with a reference."""
    acc = g["acc"]
    diff = acc["mean"] - ref_acc["mean"]
    parts = []
    for name, s, r in zip(task_names, g["task_accuracy"], ref_tasks):
        if s is None or r is None:
            continue
        d = s["mean"] - r["mean"]
        parts.append(f"{name} {d:+.3f}")
    wins = sum(1 for s, r in zip(g["task_accuracy"], ref_tasks)
               if s is not None and r is not None and s["mean"] > r["mean"])
    return (f"vs {ref_name} {fmt_stat(ref_acc)} ({diff:+.3f}, {_resolution(acc, ref_acc)}), "
            f"higher on {wins}/{len(parts)} tasks ({', '.join(parts)})")


def _reading(groups: list[Mapping[str, Any]], tasks: list[Mapping[str, Any]],
             runs: list[Mapping[str, Any]]) -> list[str]:
    """Plain-language findings derived only from the numbers."""
    task_names = [escape(t["name"]) for t in tasks]
    lines = []
    failed = [r for r in runs if r.get("status") != "ok"]
    if failed:
        lines.append(f"- {len(failed)} run(s) did not finish with status ok and are excluded "
                     "from all aggregates (see Runs).")
    if not groups:
        return lines + ["- No successful runs: nothing to compare."]
    # With several floor groups (head-only at several rates; zero-shot and k-shot) the strongest is the one to beat.
    floors = floor_methods(runs)
    heads = [g for g in groups if g["method"] in floors]
    head = max(heads, key=lambda g: g["acc"]["mean"]) if heads else None
    maj = [t.get("majority_accuracy") for t in tasks]
    maj_stats = [None if m is None else constant(m) for m in maj]
    maj_acc = constant(sum(maj) / len(maj)) if maj and all(m is not None for m in maj) else None
    task_aware = {r.get("method") for r in runs if r.get("needs_task_identity")}
    replaying = {r.get("method"): r.get("rows_kept_per_task") for r in runs if r.get("rows_kept_per_task")}
    ceilings = ceiling_methods(runs)
    tops = [g for g in groups if g["method"] in ceilings]
    top = max(tops, key=lambda g: g["acc"]["mean"]) if tops else None
    if head is None:
        lines.append("- No successful frozen-backbone run (head-only, zero-shot or k-shot): no floor.")
    for g in groups:
        is_head = g["method"] in floors
        clauses = [f"ACC {fmt_stat(g['acc'])}"]
        if head is not None and not is_head:
            clauses.append(_compare(g, head["acc"], head["task_accuracy"], task_names,
                                    f"the floor ({_label(head)})"))
        if head is not None and top is not None and not is_head and g["method"] not in ceilings:
            clauses.append(_between(g, head, top))
        if maj_acc is not None:
            clauses.append(_compare(g, maj_acc, maj_stats, task_names, "majority class"))
        if len(task_names) == 1:
            clauses.append("single task: BWT and forgetting are 0 by definition")
        elif g["bwt"] is None:
            clauses.append("learns every task at once: BWT and forgetting are not defined")
        else:
            bwt = _mean(g["bwt"])
            verdict = ("no net change on earlier tasks" if abs(bwt) < 5e-4 else
                       "earlier tasks lost accuracy" if bwt < 0 else "earlier tasks improved")
            clauses.append(f"BWT {fmt_stat(g['bwt'], signed=True)} ({verdict}), "
                           f"average forgetting {fmt_stat(g['forgetting'], signed=True)}")
        before, final = _mean(g["ppl_before"]), _mean(g["ppl_final"])
        if before is None or final is None:
            clauses.append("perplexity not measured")
        else:
            clauses.append(f"perplexity {final - before:+.2f} ({before:.2f} → {final:.2f})")
        if g["method"] in replaying:
            clauses.append(f"keeps {replaying[g['method']]} training rows of every task for replay")
        if g["method"] in task_aware:
            clauses.append("needs the task's identity at inference (evaluates each task with its own U), "
                           f"storing {_int(g['stored_per_task'])} numbers per task")
        name = f"{_label(g)} (lr {fmt_lr(g.get('lr'))})" if g.get("lr") is not None else _label(g)
        mark = " [floor]" if is_head else " [ceiling]" if g["method"] in ceilings else ""
        lines.append(f"- {name}{mark}: " + "; ".join(c for c in clauses if c)
                     + ".")
    lines.append(f"- {interval_note(runs)}")
    return lines


def _int(s: Stat) -> str:
    return DASH if s is None else f"{round(s['mean']):,}"


def _pad(xs: Sequence[Any], n: int) -> list[Any]:
    """Pad per-task values with None so a missing measurement keeps the columns aligned."""
    return [*xs, *[None] * (n - len(xs))]


def _run_matrix_table(R: Sequence[Sequence[Any]], task_names: list[str], sequential: bool) -> str:
    labels = stage_names(task_names, sequential)
    rows = [[lab, *(DASH if x is None else f"{x:.3f}" for x in row)] for lab, row in zip(labels, R)]
    return format_table(rows, ["", *task_names])


def _matched_reading(matched: Sequence[Mapping[str, Any]]) -> list[str]:
    """One sentence per target plasticity: which method paid the least perplexity for it, and
    whether the seeds resolve that against the runner-up."""
    lines = []
    for target in sorted({m["target"] for m in matched}):
        rows = [m for m in matched if m["target"] == target and m["ppl_increase"] is not None]
        if len(rows) < 2:
            continue
        rows.sort(key=lambda m: m["ppl_increase"])
        costs = ", ".join(f"{_label(m)} {m['ppl_increase']:+.2f}" for m in rows)
        verdict = _resolution(rows[0].get("ppl_increase_stat"), rows[1].get("ppl_increase_stat"))
        lines.append(f"- At plasticity {target:.3f} the perplexity increase was {costs}: "
                     f"{_label(rows[0])} raised it least at that accuracy ({verdict} against "
                     f"{_label(rows[1])}).")
    return lines


def fmt_cost(m: Mapping[str, Any], cost: str, digits: int, signed: bool = True) -> str:
    """A matched cost: its seed statistic where every seed reached the target, else the mean curve's."""
    stat = m.get(f"{cost}_stat")
    return fmt_stat(stat, digits, signed) if stat is not None else fmt_num(m[cost], digits, signed)


def _base_perplexity(runs: Sequence[Mapping[str, Any]]) -> float | None:
    """The base model's perplexity (every run scores the same one before training)."""
    return next((r["perplexity"]["before"] for r in runs
                 if r.get("status") == "ok" and (r.get("perplexity") or {}).get("before") is not None), None)


def _frontier_section(frontier: Mapping[str, Any] | None, run_dir: Path, base_ppl: float | None,
                      orders: bool = False) -> list[str]:
    """Rate selection, the frontier plot and the matched-accuracy table, when rates were swept."""
    if not frontier or not any(len(c["validation_accuracy"]) > 1 for c in frontier["selection"]):
        return []
    md = ["## Learning-rate selection (validation split only)", "",
          ("Each method × rank ran at every rate; the headline tables above use the rate with the "
           "best mean final accuracy on validation rows carved from the training data"
           + (", pooled over every task order run (one rate per method × rank, whatever the order)."
              if orders else ".")), "",
          format_table([[escape(c["method"]), c["rank"], fmt_lr(c["lr"]),
                         ", ".join(f"{fmt_lr(lr)}: {acc:.3f}" for lr, acc in c["validation_accuracy"].items())]
                        for c in frontier["selection"]],
                       ["Method", "Rank", "Chosen LR", "Validation ACC by LR"]), ""]
    edge = [_label(c) for c in frontier["selection"] if c.get("at_grid_edge")]
    if edge:
        md += [f"At the edge of the rate grid (the best rate may lie beyond it): {', '.join(edge)}.", ""]
    dropped = plot_frontier(frontier["points"], run_dir / "frontier.png", chosen_rates(frontier["selection"]), base_ppl)

    def point_stat(p: Mapping[str, Any], name: str) -> Stat:
        if p[name] is None:
            return None
        return {"mean": p[name], "std": p.get(f"{name}_std") or 0.0, "n": p["n_seeds"],
                "ci95": p.get(f"{name}_ci95")}

    md += ["## Stability–plasticity frontier", "",
           ("Every method at every rate: plasticity (mean accuracy right after learning each task, "
            "on evaluation data) against its cost; error bars: the lowest to the highest seed (the "
            "tables give the 95 % intervals); a ringed point: the rate chosen on validation."), "",
           "![frontier](frontier.png)", "",
           *([f"Left out of the plot (they are in the table), their perplexity past {OFF_SCALE_FACTOR:g}× "
              f"the base model's: {', '.join(escape(point_name(p)) for p in dropped)}.", ""] if dropped else []),
           format_table([[escape(p["method"]), p["rank"], fmt_lr(p["lr"]), p["n_seeds"], fmt_stat(point_stat(p, "plasticity")),
                          fmt_stat(point_stat(p, "acc")), fmt_stat(point_stat(p, "ppl_increase"), 2, signed=True),
                          fmt_stat(point_stat(p, "forgetting"), signed=True), fmt_stat(point_stat(p, "bwt"), signed=True)]
                         for p in frontier["points"]],
                        ["Method", "Rank", "LR", "Seeds", "Plasticity", "ACC", "Perplexity increase",
                         "Forgetting", "BWT"]), ""]
    if not frontier["matched"]:
        return md + ["The methods' plasticity ranges do not overlap, so no matched-accuracy reading exists.", ""]
    return md + [
        "### Cost at matched plasticity", "", *_matched_reading(frontier["matched"]), "",
        format_table([[f"{m['target']:.3f}", escape(m["method"]), m["rank"], fmt_cost(m, "ppl_increase", 2),
                       fmt_cost(m, "forgetting", 3)] for m in frontier["matched"]],
                     ["Plasticity", "Method", "Rank", "Perplexity increase", "Forgetting"]),
        "", ("Read along each method's Pareto frontier (rates that learned less at a higher cost are "
             "dropped): the least cost at which its rates reached that plasticity, on the seed-mean "
             "curve, with its spread over the seeds' own curves where every seed reached it. A dash: "
             "no rate of that method reached it."), ""]


Keys = list[list[Any]]


def _header(results: Mapping[str, Any], runs: list[Mapping[str, Any]]) -> list[str]:
    n_ok = sum(r.get("status") == "ok" for r in runs)
    corpus = results.get("corpus") or {}
    source = f", sha256 {corpus['sha256'][:12]}…" if corpus.get("sha256") else ""
    return ["# Continual-learning report", "",
            f"Model: {escape(results.get('model', DASH))}. Runs: {n_ok} ok, {len(runs) - n_ok} not ok. "
            f"Perplexity corpus: {escape(corpus.get('name', DASH))}{source} ({corpus.get('tokens_scored', DASH)} "
            f"tokens, window {corpus.get('window', DASH)}, stride {corpus.get('stride', DASH)}).",
            interval_note(runs), "",
            *([f"**Interim report**: {results['interim']['finished']} of the experiment's runs have finished and "
               f"{len(results['interim']['missing'])} are still to train (results.json's `interim` names them); every "
               f"rate is chosen among the finished runs only. The experiment's command with --resume trains the rest "
               f"and replaces this report.", ""] if results.get("interim") else []),
            *([escape(results["config"]["description"]), ""] if (results.get("config") or {}).get("description") else [])]


def _tasks_section(tasks: list[Mapping[str, Any]]) -> list[str]:
    return ["## Tasks (in training order)", "",
            format_table([[escape(t["name"]), escape(", ".join(t.get("label_names") or [])), t.get("n_train"),
                           t.get("n_eval"), fmt_num(t.get("majority_accuracy"), 3)] for t in tasks],
                         ["Task", "Labels", "Train", "Eval", "Majority acc"]), ""]


def _accuracy_section(keys: Keys, groups: list[Mapping[str, Any]], tasks: list[Mapping[str, Any]]) -> list[str]:
    task_names = [escape(t["name"]) for t in tasks]
    maj = [t.get("majority_accuracy") for t in tasks]
    maj_mean = sum(maj) / len(maj) if maj and None not in maj else None
    return ["## Table 1: accuracy per task after the full sequence", "", format_table(
        [[*k, *(fmt_stat(s) for s in g["task_accuracy"]), fmt_stat(g["acc"])] for k, g in zip(keys, groups)]
        + [["majority class", None, None, None, *(fmt_num(m, 3) for m in maj), fmt_num(maj_mean, 3)]],
        ["Method", "Rank", "LR", "Seeds", *task_names, "ACC"]), ""]


def _answers_section(keys: Keys, groups: list[Mapping[str, Any]], task_names: list[str]) -> list[str]:
    """Generative protocol: how often greedy generation gave an answer word at all (none: no section)."""
    if not any(g.get("valid_answer_rate") for g in groups):
        return []
    return ["## Valid answers by greedy generation", "",
            ("After the last task, the first evaluation rows of each task answered by greedy generation: the "
             "share whose answer, up to its end token, is one of the task's answers exactly as scored (case "
             "and spacing included). Accuracy above scores the answers' likelihoods instead, so it needs no "
             "valid generation."), "",
            format_table([[*k, *(fmt_stat(s) for s in _pad(g.get("valid_answer_rate") or [], len(task_names)))]
                          for k, g in zip(keys, groups)], ["Method", "Rank", "LR", "Seeds", *task_names]), "",
            *_acc_norm_table(keys, groups, task_names)]


def _predictions_section(runs: Sequence[Mapping[str, Any]], tasks: Sequence[Mapping[str, Any]]) -> list[str]:
    """Generative protocol: how many evaluation rows each run predicted as each label after the last
    task (runs before this was recorded, or heads runs: no section). A prompt that never draws some
    answer (a tilted floor) shows as a zero."""
    rows = [r for r in runs if r.get("status") == "ok" and r.get("predicted_labels")]
    if not rows:
        return []
    def cell(counts: Sequence[float], labels: Sequence[str]) -> str:
        return ", ".join(f"{escape(label)} {count:g}" for label, count in zip(labels, counts))
    table = [[escape(r["method"]), r.get("rank"), fmt_lr(r.get("lr")), r.get("seed"),
              *(cell(counts, t["label_names"]) for counts, t in zip(in_listed_order(r, r["predicted_labels"]), tasks))]
             for r in rows]
    return ["## Predicted labels", "",
            "Evaluation rows predicted as each label after the last task (a row whose top score several "
            "labels share counts 1/n for each).", "",
            format_table(table, ["Method", "Rank", "LR", "Seed", *(escape(t["name"]) for t in tasks)]), ""]


def _acc_norm_table(keys: Keys, groups: list[Mapping[str, Any]], task_names: list[str]) -> list[str]:
    """acc beside acc_norm after the last task (lm-evaluation-harness's pair): whether an answer
    spelt in more tokens than the others moved a method's accuracy (runs before acc_norm: no table)."""
    if not any(g.get("accuracy_norm") for g in groups):
        return []
    return ["Accuracy after the last task as acc (the sum of the answer's token log-probabilities: the "
            "accuracy matrix, ACC and the frontier use it) / acc_norm (that sum per character of the answer).", "",
            format_table([[*k, *(f"{fmt_stat(a)} / {fmt_stat(n)}" for a, n in zip(g["task_accuracy"], _pad(
                g.get("accuracy_norm") or [], len(task_names)))), f"{fmt_stat(g['acc'])} / {fmt_stat(g.get('acc_norm'))}"]
                for k, g in zip(keys, groups)], ["Method", "Rank", "LR", "Seeds", *task_names, "ACC"]), ""]


def _perplexity_section(keys: Keys, groups: list[Mapping[str, Any]], task_names: list[str]) -> list[str]:
    return ["## Table 2: perplexity before → after each task → final", "", format_table(
        [[*k, fmt_stat(g["ppl_before"], 2), *(fmt_stat(s, 2) for s in _pad(g["ppl_after_task"], len(task_names))),
          fmt_stat(g["ppl_final"], 2), fmt_stat(g["ppl_increase"], 2, signed=True)] for k, g in zip(keys, groups)],
        ["Method", "Rank", "LR", "Seeds", "Before", *(f"after {t}" for t in task_names), "Final", "Increase"]), ""]


def _metrics_section(keys: Keys, groups: list[Mapping[str, Any]], runs: list[Mapping[str, Any]]) -> list[str]:
    return ["## Continual-learning metrics", "",
            ("ACC: mean final accuracy. BWT: mean change on earlier tasks since each was learned "
             "(negative = forgetting). Forgetting: mean drop from each earlier task's best "
             "accuracy (positive = forgetting). Plasticity: mean accuracy right after learning "
             "each task."), "", format_table(
                [[*k, fmt_stat(g["acc"]), fmt_stat(g["bwt"], signed=True), fmt_stat(g["forgetting"], signed=True),
                  fmt_stat(g["plasticity"]), _int(g["adapter_params"]), _int(g["head_params"]), _int(g["stored_per_task"]),
                  fmt_stat(g["wall_time_s"], 1), fmt_stat(g["peak_memory_mb"], 0)] for k, g in zip(keys, groups)],
                ["Method", "Rank", "LR", "Seeds", "ACC", "BWT", "Forgetting", "Plasticity",
                 "Adapter params", "Head params", "Stored per task", "Wall time (s)", "Peak memory (MB)"]),
            "", ("Stored per task: numbers a method keeps for each task beyond its head (a bank's U, "
                 "EWC's Fisher and anchor, O-LoRA's LoRA); the reading says which methods need the "
                 "task's identity at inference."), *_threads_note(runs), ""]


def _threads_note(runs: list[Mapping[str, Any]]) -> list[str]:
    """Wall times compare only between runs that had the same CPU threads (workers share the cores)."""
    threads = sorted({r["threads"] for r in runs if r.get("threads") is not None})
    if not threads:
        return []
    return ["", f"Wall times: each run's own, with {' or '.join(map(str, threads))} CPU thread(s); runs in "
                f"worker processes (--workers) shared the machine with each other."]


def _runs_section(runs: list[Mapping[str, Any]], task_names: list[str]) -> list[str]:
    ordered = bool(orders_of(runs))
    md = ["## Runs", "", format_table(
        [[escape(r.get("method")), r.get("rank"), r.get("seed"), *([escape(r.get("order"))] if ordered else []),
          fmt_lr(r.get("lr")), fmt_lr(r.get("head_lr")), escape(r.get("status")), fmt_num(r.get("wall_time_s"), 1),
          None if r.get("status") == "ok" else escape(str(r.get("error") or "no error message")[:300])]
         for r in runs],
        ["Method", "Rank", "Seed", *(["Order"] if ordered else []), "LR", "Head LR", "Status", "Wall time (s)",
         "Error"]), ""]
    md += ["## Accuracy matrices per run", "",
           ("Row 'before' is measured before any training (heads untrained under the heads protocol, the "
            "model zero-shot under the generative one; unseen tasks may be missing); row 'after X' after "
            "training through task X (a multitask run learns every task at once, then is scored on one more "
            "task per row)."), ""]
    for r in runs:
        if r.get("status") == "ok":
            order = f", order {escape(r['order'])}" if r.get("order") is not None else ""
            md += [f"### {_label(r)}, seed {r.get('seed')}{order}, lr {fmt_lr(r.get('lr'))}", "",
                   _run_matrix_table(r["accuracy_matrix"], step_names([r], task_names), r.get("sequential", True)), ""]
    return md


def _orders_section(runs: list[Mapping[str, Any]]) -> list[str]:
    """Every metric per task order, each order over its own seeds (runs at the chosen rates); no
    section without orders."""
    if not orders_of(runs):
        return []
    groups = summarize({"runs": runs}, by_order=True)
    first = {(g["method"], g.get("rank"), g.get("lr")): i for i, g in reversed(list(enumerate(groups)))}
    groups.sort(key=lambda g: first[(g["method"], g.get("rank"), g.get("lr"))])  # each method's orders together
    return ["## Per task order", "",
            ("The metrics of each task order on its own, over its seeds (the tables above pool seeds and "
             "orders): order changes what is forgotten, so a verdict that holds in one order may not in another."),
            "", format_table(
                [[escape(g["method"]), g.get("rank"), fmt_lr(g.get("lr")), escape(g.get("order")), g["n_runs"], fmt_stat(g["acc"]),
                  fmt_stat(g["bwt"], signed=True), fmt_stat(g["forgetting"], signed=True), fmt_stat(g["plasticity"]),
                  fmt_stat(g["ppl_increase"], 2, signed=True)] for g in groups],
                ["Method", "Rank", "LR", "Order", "Seeds", "ACC", "BWT", "Forgetting", "Plasticity",
                 "Perplexity increase"]), ""]


def _plots_section(groups: list[Mapping[str, Any]], runs: Sequence[Mapping[str, Any]], task_names: list[str],
                   run_dir: Path) -> list[str]:
    md = ["## Plots", ""]
    together = {r["method"] for r in runs if r.get("sequential") is False}  # learns every task at step one
    series = [(_name(g) + (": every task at the first step" if g["method"] in together else ""),
               [g["ppl_before"], *g["ppl_after_task"]]) for g in groups]
    over = "seeds and task orders" if orders_of(runs) else "seeds"
    if plot_perplexity(series, task_names, run_dir / "perplexity.png", over):
        md += ["![perplexity](perplexity.png)", ""]
    for g, name in zip(groups, _matrix_filenames(groups)):
        _plot_accuracy_matrix(g, task_names, run_dir / name, g["method"] not in together)
        md += [f"![{_label(g)} accuracy matrix]({name})", ""]
    return md


def _loss_section(results: Mapping[str, Any], run_dir: Path) -> list[str]:
    """The training-loss plot, or why there is none (results written before runs kept ``train_loss``)."""
    md = ["## Training loss", ""]
    if plot_loss_curves(results, run_dir / "train_loss.png"):
        return md + [("Loss per optimizer step on each task, each method at the rate chosen on validation: "
                      "a flat curve is a method that learned nothing at its rate (a method whose chosen runs "
                      "predate per-step losses is not drawn)."), "",
                     "![training loss](train_loss.png)", ""]
    return md + ["Not plotted: no run at a chosen rate in these results recorded a per-step training loss "
                 "(`train_loss`; runs written before it was kept, and methods that train nothing, such as "
                 "zero-shot and k-shot, have none).", ""]


def write_report(results: Mapping[str, Any], run_dir: Path) -> Path:
    """Write ``report.md`` and PNG plots into ``run_dir``; return the report path.

    Runs whose status is not "ok" are listed with their error and left out of every
    aggregate; aggregates, intervals and the frontier are recomputed from the runs, so files
    written by earlier versions get them too. All files are written atomically.
    """
    version = results.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ValueError(f"unsupported results schema_version {version!r}, expected {SCHEMA_VERSION}")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tasks = list(results.get("tasks") or [])
    task_names = [t["name"] for t in tasks]  # as plots draw them; the tables' are escaped
    shown = [escape(name) for name in task_names]
    runs = deepcopy(list(results.get("runs") or []))
    config = results.get("config") or {}
    frontier = analyse(runs, selection_seeds(config)) if results.get("frontier") is not None else None
    # With a learning-rate sweep the headline shows each method at its validation-selected rate.
    summary = summarize({"runs": [r for r in runs if r.get("selected", True)]})
    floors = floor_methods(runs)
    groups = [g for g in summary if g["method"] not in floors] + [g for g in summary if g["method"] in floors]
    keys = [[escape(g["method"]), g.get("rank"), fmt_lr(g.get("lr")),
             f"{len(set(g['seeds']))} × {len(g['orders'])} orders" if g["orders"] else g["n_runs"]] for g in groups]
    md = [*_header(results, runs), *_tasks_section(tasks),
          "## Reading", "", *_reading(groups, tasks, runs), "",
          *_accuracy_section(keys, groups, tasks), *_answers_section(keys, groups, shown),
          *_predictions_section([r for r in runs if r.get("selected", True)], tasks),
          *_perplexity_section(keys, groups, step_names(runs, shown)),
          *_metrics_section(keys, groups, runs), *_orders_section([r for r in runs if r.get("selected", True)]),
          *_frontier_section(frontier, run_dir, _base_perplexity(runs), bool(orders_of(runs))),
          *_runs_section(runs, shown), *_plots_section(groups, runs, step_names(runs, task_names), run_dir),
          *_loss_section(results, run_dir)]
    path = run_dir / "report.md"
    atomic_write_bytes(path, "\n".join(md).encode("utf-8"))
    return path
