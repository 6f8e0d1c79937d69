"""The report's PNG plots: accuracy matrices, perplexity across the sequence, the frontier, and
the training loss per optimizer step.

Every plot is meant to be read at the size it is written: long task names are wrapped, tick
labels that would collide are rotated, and the frontier's learning-rate labels are moved apart
until no two overlap (:func:`declutter`). PNGs are written atomically.
"""

from __future__ import annotations

import io
import math
import re
import textwrap
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.text import Text

from curlora.continual.frontier import chosen_rates, select_learning_rates, selection_seeds
from curlora.continual.metrics import in_listed_order
from curlora.fileio import atomic_write_bytes

DASH = "—"
# A rate whose final perplexity is this many times the base model's has broken the language model:
# the frontier plot leaves it out (named beneath the plot) rather than stretch every axis to reach it.
OFF_SCALE_FACTOR = 10.0


def off_scale(points: Sequence[Mapping[str, Any]], base_ppl: float | None) -> list[Mapping[str, Any]]:
    """The frontier points whose perplexity rose past ``OFF_SCALE_FACTOR`` × the base model's."""
    if base_ppl is None:
        return []
    limit = (OFF_SCALE_FACTOR - 1.0) * base_ppl
    return [p for p in points if p.get("ppl_increase") is not None and p["ppl_increase"] > limit]


def palette(n: int) -> Any:
    """A colormap with a distinct colour for each of ``n`` series (tab10 would repeat past ten)."""
    return colormaps["tab20" if n > 10 else "tab10"]


def new_figure(figsize: tuple[float, float]) -> Figure:
    """A figure on the Agg canvas (no pyplot state), so text extents can be measured."""
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def plain(text: str) -> str:
    """A name from data or config drawn as written: matplotlib reads text between two ``$`` as math
    (a task named "cost $5_$10" failed the whole report); ``\\$`` is its literal dollar."""
    return text.replace("$", r"\$")


def wrap(label: str, width: int = 14) -> str:
    """A long name over several lines, broken after spaces and underscores, never inside a word."""
    lines: list[str] = []
    for token in re.split(r"(?<=[_ ])", label):
        if lines and len(lines[-1]) + len(token) <= width:
            lines[-1] += token
        else:
            lines.append(token)
    return "\n".join(line.rstrip() for line in lines)


def stage_labels(task_names: Sequence[str]) -> list[str]:
    """'before', then 'after <task>' for each task, wrapped for a tick label."""
    return ["before"] + [wrap(f"after {t}") for t in task_names]


def _overlap(a, b, pad: float = 1.0) -> bool:
    return not (a.x1 + pad <= b.x0 or b.x1 + pad <= a.x0 or a.y1 + pad <= b.y0 or b.y1 + pad <= a.y0)


def declutter(fig: Figure, texts: Sequence[Text], max_steps: int = 40) -> None:
    """Move annotation labels (offset in points) upward/downward, alternately, until none overlaps
    an earlier one."""
    renderer = fig.canvas.get_renderer()
    placed = []
    for text in texts:
        x0, y0 = text.get_position()
        for step in range(max_steps):
            box = Text.get_window_extent(text, renderer)  # the label itself, not its leader line
            if not any(_overlap(box, other) for other in placed):
                break
            shift = (step // 2 + 1) * 8 * (1 if step % 2 == 0 else -1)
            text.set_position((x0, y0 + shift))
        placed.append(Text.get_window_extent(text, renderer))


def plot_accuracy_matrix(grid: list[list[float]], task_names: list[str], title: str, path: Path,
                         rows: Sequence[str] | None = None) -> None:
    """Heatmap of a seed-mean accuracy matrix; NaN entries (unseen tasks) are blank. ``rows``: its row
    labels ('before', then 'after <task>' for each task unless given)."""
    task_names, title = [plain(t) for t in task_names], plain(title)
    finite = [x for row in grid for x in row if not math.isnan(x)]
    fig = new_figure((2.2 + 1.3 * len(task_names), 1.4 + 0.6 * len(grid)))
    ax = fig.add_subplot()
    im = ax.imshow(grid, cmap="viridis", vmin=0.0, vmax=max([1.0, *finite]), aspect="auto")
    for i, row in enumerate(grid):
        for j, x in enumerate(row):
            ax.text(j, i, DASH if math.isnan(x) else f"{x:.3f}", ha="center", va="center",
                    color="white" if not math.isnan(x) and x < 0.6 else "black", fontsize=8)
    ax.set_xticks(range(len(task_names)), [wrap(t) for t in task_names], fontsize=8)
    rows = ["before", *(f"after {t}" for t in task_names)] if rows is None else [plain(r) for r in rows]
    ax.set_yticks(range(len(grid)), rows, fontsize=8)
    ax.set_xlabel("evaluated task")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax)
    save_figure(fig, path)


def plot_perplexity(series: Sequence[tuple[str, list[Mapping[str, Any] | None]]], task_names: list[str],
                    path: Path, over: str = "seeds") -> bool:
    """Perplexity across the sequence, one line per (label, stats); error bars: 95 % interval
    where several runs went into a point (``over``: what they differ in, for the title). Stages that
    were not scored (a sweep scores the last task only) get no point: a dotted line bridges them, so
    no trajectory is drawn that was never measured. Each
    series is nudged sideways a little so that equal values and their bars stay apart. False if
    nothing was measured."""
    series, task_names = [(plain(label), stats) for label, stats in series], [plain(t) for t in task_names]
    fig = new_figure((3.0 + 1.4 * len(task_names), 4.2))
    ax = fig.add_subplot()
    drawn = intervals = gaps = False
    nudge = 0.12 / max(len(series), 1)
    colours = palette(len(series))
    for k, (label, stats) in enumerate(series):
        pts = [(i, s) for i, s in enumerate(stats) if s is not None]
        if not pts:
            continue
        xs = [i + (k - (len(series) - 1) / 2) * nudge for i, _ in pts]
        ys = [s["mean"] for _, s in pts]
        errors = [[s["mean"] - s["ci95"][0] if s.get("ci95") else 0.0 for _, s in pts],
                  [s["ci95"][1] - s["mean"] if s.get("ci95") else 0.0 for _, s in pts]]
        intervals = intervals or any(s.get("ci95") for _, s in pts)
        colour = colours(k % colours.N)
        ax.errorbar(xs, ys, yerr=errors, marker=MARKERS[k % len(MARKERS)], linestyle="none", capsize=3, label=label,
                    color=colour)
        for j in range(len(pts) - 1):
            skipped = pts[j + 1][0] - pts[j][0] > 1
            gaps = gaps or skipped
            ax.plot(xs[j:j + 2], ys[j:j + 2], color=colour, linestyle=":" if skipped else "-")
        drawn = True
    if not drawn:
        return False
    ax.set_xticks(range(len(task_names) + 1), stage_labels(task_names), fontsize=8)
    ax.set_ylabel("perplexity")
    notes = [text for text, shown in ((f"bars: 95 % interval over {over}", intervals),
                                       ("dotted: stages not scored", gaps)) if shown]
    ax.set_title("LM perplexity across the task sequence" + (f" ({'; '.join(notes)})" if notes else ""),
                 fontsize=9)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    save_figure(fig, path)
    return True


LABELLED_CURVES = 6  # beyond this many curves, rate labels would bury the points: the table gives them
MARKERS = "osD^vPXh<>"


def _seed_range(points: Sequence[Mapping[str, Any]], name: str) -> list[list[float]] | None:
    """Error bars from the lowest to the highest seed's value: the spread itself, which (unlike a
    Student-t interval over three seeds) never reaches below or above anything a seed produced."""
    ranges = []
    for p in points:
        values = [s[name] for s in (p.get("per_seed") or {}).values() if s.get(name) is not None]
        ranges.append((min(values), max(values)) if values else (p[name], p[name]))
    if all(lo == hi for lo, hi in ranges):
        return None
    return [[p[name] - lo for p, (lo, _) in zip(points, ranges)],
            [hi - p[name] for p, (_, hi) in zip(points, ranges)]]


def point_name(p: Mapping[str, Any]) -> str:
    rank = "" if p["rank"] is None else f" r{p['rank']}"
    lr = "" if p["lr"] is None else f" lr {p['lr']:g}"
    return f"{p['method']}{rank}{lr}"


def plot_frontier(points: Sequence[Mapping[str, Any]], path: Path,
                  chosen: Mapping[tuple, Any] | None = None,
                  base_ppl: float | None = None) -> list[Mapping[str, Any]]:
    """Plasticity (x) against perplexity increase and forgetting (y), one curve per method × rank;
    error bars: min–max over seeds; a ringed point: the rate chosen on validation (``chosen`` maps
    (method, rank) to it). With few curves each point is labelled with its learning rate. Given the
    base model's perplexity, rates that broke the language model (:func:`off_scale`) are left out
    and named beneath the plot; they are returned."""
    dropped = off_scale(points, base_ppl)
    left_out = {id(p) for p in dropped}
    curves: dict[tuple, list[Mapping[str, Any]]] = {}
    for p in points:
        if id(p) in left_out:
            continue
        curves.setdefault((p["method"], p["rank"]), []).append(p)
    many = len(curves) > LABELLED_CURVES
    fig = new_figure((14, 6.5) if many else (12, 4.8))
    axes = fig.subplots(1, 2)
    colours = palette(len(curves))
    seeds = max((p.get("n_seeds") or 1 for p in points), default=1)
    labels: list[list[Text]] = [[], []]
    for c, ((method, rank), pts) in enumerate(curves.items()):
        pts = sorted((p for p in pts if p["plasticity"] is not None), key=lambda p: p["plasticity"])
        label = plain(method if rank is None else f"{method} r{rank}")
        style = {"color": colours(c % colours.N), "label": label, "capsize": 2, "elinewidth": 0.8,
                 "marker": "*" if pts and pts[0]["lr"] is None else MARKERS[c % len(MARKERS)]}
        style["markersize"] = 10 if style["marker"] == "*" else 5
        if style["marker"] == "*":  # hollow: a rate that learned nothing sits on the floor and stays visible
            style.update(markerfacecolor="none", markeredgewidth=1.2)
        for k, (ax, cost) in enumerate(zip(axes, ("ppl_increase", "forgetting"))):
            shown = [p for p in pts if p[cost] is not None]
            if not shown:
                continue
            ax.errorbar([p["plasticity"] for p in shown], [p[cost] for p in shown],
                        xerr=_seed_range(shown, "plasticity"), yerr=_seed_range(shown, cost), **style)
            best = [p for p in shown if chosen and p["lr"] is not None and chosen.get((method, rank)) == p["lr"]]
            ax.plot([p["plasticity"] for p in best], [p[cost] for p in best], linestyle="none", marker="o",
                    markersize=11, markerfacecolor="none", markeredgecolor=style["color"], markeredgewidth=1.5)
            for p in shown if not many else ():
                if p["lr"] is not None:
                    labels[k].append(ax.annotate(
                        f"{p['lr']:g}", (p["plasticity"], p[cost]), fontsize=7, xytext=(4, 4),
                        textcoords="offset points", arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "0.5"}))
    how = "ringed: rate chosen on validation" + ("" if many else "; labels: learning rate")
    bars = f"; bars: min–max over {seeds} seeds" if seeds > 1 else ""
    for ax, title in zip(axes, ("Perplexity increase", "Average forgetting")):
        ax.set_xlabel("plasticity (mean accuracy right after learning each task)", fontsize=8)
        ax.set_ylabel(title.lower(), fontsize=8)
        ax.set_title(f"{title} vs plasticity\n({how}{bars})", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("symlog", linthresh=1.0)  # a diverged rate would flatten every other point
    note = ""
    if dropped:
        named = ", ".join(f"{plain(point_name(p))} ({p['ppl_increase']:+.0f})" for p in dropped)
        note = textwrap.fill(f"Left out, perplexity over {OFF_SCALE_FACTOR:g}× the base model's: {named}",
                             180 if many else 150)
        fig.text(0.5, 0.005, note, ha="center", va="bottom", fontsize=8)
    note_height = 0.18 * (note.count("\n") + 1) / fig.get_figheight() if note else 0.0  # 8-pt lines
    handles, names = axes[0].get_legend_handles_labels()
    fig.tight_layout(rect=(0, (0.12 if many else 0.08) + note_height, 1, 1))
    fig.legend(handles, names, loc="lower center", bbox_to_anchor=(0.5, note_height), ncol=min(len(names), 6),
               fontsize=8, frameon=False)
    for texts in labels:
        declutter(fig, texts)
    save_figure(fig, path)
    return dropped


def _smooth(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over up to ``window`` steps: the trend of a noisy per-batch loss, without lag
    at the start of a task."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def plot_loss_curves(results: Mapping[str, Any], path: Path) -> bool:
    """Training loss per optimizer step, one panel per task, each method × rank at the rate chosen on
    validation (the rate its headline numbers come from): seeds averaged step by step, a faint raw
    line and a trailing-mean trend. Shows whether a method learned at its rate (a flat loss is the
    "learned nothing, so forgot nothing" case) or diverged. The rates are chosen as the report chooses
    them (among all runs of the seeds that chose, ``frontier.selection_seeds``); a
    chosen run without a loss (written before runs kept ``train_loss``, or a method that trains
    nothing: the generative floors) is left out. False when no chosen run has one."""
    finished = [r for r in results.get("runs") or [] if r.get("status") == "ok" and "validation_accuracy" in r]
    chosen = chosen_rates(select_learning_rates(finished, selection_seeds(results.get("config") or {})))
    at_choice = [r for r in finished if chosen.get((r["method"], r.get("rank"))) == r.get("lr")]
    runs = [r for r in at_choice if any(r.get("train_loss") or ())]
    if not runs:
        return False
    curves: dict[tuple, list[list[list[float]]]] = {}
    together = {r["method"] for r in runs if r.get("sequential") is False}  # learns every task at step one
    for run in runs:
        # Panel j is task j as listed: a run in another order learned it at another step. A method
        # that learns every task at once keeps its one list of steps in the first panel in any order.
        losses = run["train_loss"] if run["method"] in together else in_listed_order(run, run["train_loss"])
        curves.setdefault((run["method"], run.get("rank"), run.get("lr")), []).append(losses)
    task_names = [t["name"] for t in results.get("tasks") or []] or [f"task {i}" for i in range(len(runs[0]["train_loss"]))]
    # A panel per task some curve has (multitask alone fills only the first): no empty axes.
    shown = [j for j in range(len(task_names))
             if any(j < len(losses) and losses[j] for members in curves.values() for losses in members)]
    fig = new_figure((1.5 + 3.6 * len(shown), 4.2))
    axes = fig.subplots(1, len(shown), sharey=True, squeeze=False)[0]
    colours = palette(len(curves))
    # Runs at the chosen rate per curve: older ones without losses leave a curve out, or thin it.
    totals = Counter((r["method"], r.get("rank"), r.get("lr")) for r in at_choice)
    older = sorted(_curve_label(*key) for key in totals if key not in curves)
    runs_drawn = max(len(members) for members in curves.values())
    drawn: list[float] = []
    for c, ((method, rank, lr), members) in enumerate(curves.items()):
        thinned = f", {len(members)} of its {totals[method, rank, lr]} runs" if len(members) < totals[method, rank, lr] else ""
        label = plain(_curve_label(method, rank, lr) + thinned
                      + (": every task, in the first panel" if method in together else ""))
        for j, ax in zip(shown, axes):
            per_seed = [losses[j] for losses in members if j < len(losses) and losses[j]]
            if not per_seed:
                continue
            steps = min(len(x) for x in per_seed)  # seeds take the same steps; a shorter one truncates
            mean = [math.fsum(x[k] for x in per_seed) / len(per_seed) for k in range(steps)]
            drawn += mean
            colour = colours(c % colours.N)
            ax.plot(range(1, steps + 1), mean, color=colour, alpha=0.25, linewidth=0.7)
            ax.plot(range(1, steps + 1), _smooth(mean, max(1, steps // 6)), color=colour, linewidth=1.6,
                    label=label if j == 0 else None)
    for ax, name in zip(axes, [task_names[j] for j in shown]):
        if ax.lines:  # ticks only inside the steps taken (the default ones run past both ends)
            last = max(len(line.get_xdata()) for line in ax.lines)
            ax.set_xlim(1, max(last, 2))
            ax.set_xticks([t for t in ax.get_xticks() if 1 <= t <= last])
        ax.set_title(wrap(plain(name), 28), fontsize=9)
        ax.set_xlabel("optimizer step", fontsize=8)
        ax.grid(alpha=0.3)
    if min(drawn) > 0 and max(drawn) / min(drawn) > 20:  # a diverging curve would flatten every other one
        axes[0].set_yscale("log")
    axes[0].set_ylabel("training loss", fontsize=8)
    orders = {r.get("order") for r in runs} - {None}
    unit = f"runs (seeds × {len(orders)} orders)" if len(orders) > 1 else "seeds"
    uneven = any(len(members) < max(runs_drawn, totals[key]) for key, members in curves.items())
    seed_note = f"mean of {'up to ' if uneven else ''}{runs_drawn} {unit}; " if runs_drawn > 1 else ""
    fig.suptitle(f"Training loss at each method's chosen rate ({seed_note}faint: per step, solid: trailing mean)",
                 fontsize=9)
    handles, names = axes[0].get_legend_handles_labels()
    bottom = 0.07 + 0.04 * ((len(names) - 1) // 4) + (0.06 if older else 0.0)
    fig.tight_layout(rect=(0, bottom, 1, 1))
    fig.legend(handles, names, loc="lower center", bbox_to_anchor=(0.5, 0.06 if older else 0.0),
               ncol=min(len(names), 4), fontsize=8, frameon=False)
    if older:
        fig.text(0.5, 0.01, plain("Not drawn, their runs predate per-step losses: " + ", ".join(older)),
                 ha="center", fontsize=8, wrap=True)
    save_figure(fig, path)
    return True


def _curve_label(method: str, rank: Any, lr: Any) -> str:
    return method + ("" if rank is None else f" r{rank}") + ("" if lr is None else f" (lr {lr:g})")
