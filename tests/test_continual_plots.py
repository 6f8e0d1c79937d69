"""The report's plots are readable at the size they are written: no two labels overlap."""

import itertools

import matplotlib.figure
from matplotlib.text import Text
import pytest

from curlora.continual import plots

TASKS = ["rotten_tomatoes", "vader_tweets", "a_task_with_a_rather_long_descriptive_name"]


@pytest.fixture
def captured(monkeypatch):
    """Every figure a plot function saves, drawn, instead of only its PNG bytes."""
    figures = []
    real_save = plots.save_figure

    def keep(fig, path):
        real_save(fig, path)
        figures.append(fig)

    monkeypatch.setattr(plots, "save_figure", keep)
    return figures


def text_boxes(fig: matplotlib.figure.Figure):
    renderer = fig.canvas.get_renderer()
    boxes = []
    for ax in fig.axes:
        labels = [*ax.get_xticklabels(), *ax.get_yticklabels(), *ax.texts]
        boxes += [(t.get_text(), Text.get_window_extent(t, renderer)) for t in labels if t.get_text() and t.get_visible()]
    return boxes


def assert_no_overlap(fig):
    fig.canvas.draw()
    for (a, box_a), (b, box_b) in itertools.combinations(text_boxes(fig), 2):
        overlaps = box_a.x0 < box_b.x1 and box_b.x0 < box_a.x1 and box_a.y0 < box_b.y1 and box_b.y0 < box_a.y1
        assert not overlaps, f"labels {a!r} and {b!r} overlap"


def stat(mean, half=0.5):
    return {"mean": mean, "std": half, "n": 3, "ci95": [mean - half, mean + half]}


def test_perplexity_and_matrix_labels_do_not_collide(tmp_path, captured):
    series = [("curlora r16", [stat(14.5), stat(14.6), stat(14.8), stat(15.0)]),
              ("lora r16", [stat(14.5), stat(15.5), stat(17.0), stat(19.2)])]
    assert plots.plot_perplexity(series, TASKS, tmp_path / "perplexity.png")
    grid = [[0.5, 0.4, 0.3], [0.7, float("nan"), float("nan")], [0.69, 0.55, float("nan")], [0.68, 0.52, 0.6]]
    plots.plot_accuracy_matrix(grid, TASKS, "curlora r16 accuracy", tmp_path / "matrix.png")
    for fig in captured:
        assert_no_overlap(fig)
    assert (tmp_path / "perplexity.png").stat().st_size > 1000


def test_frontier_learning_rate_labels_are_moved_apart(tmp_path, captured):
    points = []
    # Rates that land almost on top of each other and of the head-only point, and one diverged rate.
    for method, xs in (("curlora", (0.573, 0.575, 0.58, 0.604)), ("lora", (0.574, 0.59, 0.651, 0.40))):
        for lr, x in zip((3e-4, 1e-3, 3e-3, 1e-2), xs):
            points.append({"method": method, "rank": 16, "lr": lr, "n_seeds": 1, "plasticity": x,
                           "ppl_increase": 7757.0 if x == 0.40 else (x - 0.57) * 100, "forgetting": (x - 0.57) / 5})
    points.append({"method": "head", "rank": None, "lr": None, "n_seeds": 1, "plasticity": 0.573,
                   "ppl_increase": 0.0, "forgetting": 0.0})
    plots.plot_frontier(points, tmp_path / "frontier.png")
    (fig,) = captured
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes[:2]:
        boxes = [Text.get_window_extent(t, renderer) for t in ax.texts]  # labels, not leader lines
        assert len(boxes) == 8
        for a, b in itertools.combinations(boxes, 2):
            assert not (a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1)


def test_a_crowded_frontier_drops_rate_labels_rings_the_chosen_rate_and_bars_span_the_seeds(tmp_path, captured):
    points = []
    for m in range(8):
        for lr, x in zip((1e-3, 3e-3, 1e-2), (0.56, 0.60, 0.64)):
            seeds = {str(s): {"plasticity": x + 0.01 * s, "ppl_increase": 10 * x + s, "forgetting": x / 10}
                     for s in range(3)}
            points.append({"method": f"m{m}", "rank": 16, "lr": lr, "n_seeds": 3, "per_seed": seeds,
                           "plasticity": x + 0.01, "ppl_increase": 10 * x + 1, "forgetting": x / 10})
    plots.plot_frontier(points, tmp_path / "frontier.png", {(f"m{m}", 16): 3e-3 for m in range(8)})
    (fig,) = captured
    left = fig.axes[0]
    assert not left.texts  # eight curves: the rates are in the report's table, not on the points
    assert len(fig.legends[0].get_texts()) == 8
    rings = [line for line in left.lines if line.get_markerfacecolor() == "none" and len(line.get_xdata())]
    assert len(rings) == 8 and all(list(line.get_xdata()) == [0.61] for line in rings)
    # The y error bars reach exactly the lowest and highest seed (ppl 10x + 0 … 10x + 2 around 10x + 1).
    segments = [seg for coll in left.collections for seg in coll.get_segments()]
    spans = {(round(seg[0][1], 6), round(seg[1][1], 6)) for seg in segments if seg[0][0] == seg[1][0]}
    assert (5.6, 7.6) in spans and "min–max over 3 seeds" in left.get_title()


def test_a_rate_that_broke_the_language_model_is_named_beneath_the_frontier_not_drawn(tmp_path, captured):
    points = [{"method": "curlora-wide", "rank": 16, "lr": lr, "n_seeds": 1, "plasticity": x,
               "ppl_increase": inc, "forgetting": 0.05}
              for lr, x, inc in ((1e-3, 0.60, 3.0), (3e-3, 0.44, 4211.3))]
    plots.plot_frontier(points, tmp_path / "frontier.png", base_ppl=14.53)
    (fig,) = captured
    drawn = [y for ax in fig.axes[:2] for line in ax.lines for y in line.get_ydata()]
    assert drawn and max(drawn) < 100  # the 4211 point does not stretch the axis
    assert [p["lr"] for p in plots.off_scale(points, 14.53)] == [3e-3]
    (note,) = [t.get_text() for t in fig.texts if "Left out" in t.get_text()]
    assert "curlora-wide r16 lr 0.003 (+4211)" in note and "10× the base model" in note
    # Without the base perplexity nothing is left out.
    plots.plot_frontier(points, tmp_path / "frontier.png")
    assert max(y for ax in captured[-1].axes[:2] for line in ax.lines for y in line.get_ydata()) > 4000


def test_the_perplexity_plot_claims_interval_bars_only_where_seeds_gave_them(tmp_path, captured):
    one_seed = [("lora r16", [{"mean": 14.5, "std": 0.0, "n": 1, "ci95": None}] * 4)]
    plots.plot_perplexity(one_seed, TASKS, tmp_path / "perplexity.png")
    plots.plot_perplexity([("lora r16", [stat(14.5)] * 4)], TASKS, tmp_path / "perplexity.png")
    assert ["95 %" in fig.axes[0].get_title() for fig in captured] == [False, True]


def test_the_perplexity_plot_draws_no_trajectory_through_stages_never_scored(tmp_path, captured):
    """A sweep run scores before and after the last task only: the two points are joined by a
    dotted line (and the title says so), a fully scored run by solid segments."""
    swept = ("curlora r8", [stat(24.8), None, None, stat(28.5)])
    scored = ("head", [stat(24.8)] * 4)
    plots.plot_perplexity([swept, scored], TASKS, tmp_path / "perplexity.png")
    (fig,) = captured
    ax = fig.axes[0]
    segments = [(line.get_linestyle(), len(line.get_xdata())) for line in ax.lines if len(line.get_xdata()) == 2]
    assert segments.count((":", 2)) == 1 and segments.count(("-", 2)) == 3
    assert "dotted: stages not scored" in ax.get_title()
    # Equal values of two series are drawn side by side, not on top of each other.
    first_x = sorted(line.get_xdata()[0] for line in ax.lines if len(line.get_xdata()) == 2)
    assert first_x[0] != first_x[-1]
    plots.plot_perplexity([scored], TASKS, tmp_path / "perplexity.png")
    assert "dotted" not in captured[-1].axes[0].get_title()


def test_a_rate_that_learned_nothing_stays_visible_on_the_head_only_floor(tmp_path, captured):
    """CURLoRA at a low rate lands exactly where head-only does: the floor's star is hollow, so the
    point (and whose rate label it is) is not hidden under it."""
    floor = {"method": "head", "rank": None, "lr": None, "n_seeds": 1, "plasticity": 0.487,
             "ppl_increase": 0.0, "forgetting": 0.0}
    low = {**floor, "method": "curlora", "rank": 16, "lr": 1e-3, "ppl_increase": 0.01}
    plots.plot_frontier([low, floor], tmp_path / "frontier.png")
    (fig,) = captured
    (star,) = [line for line in fig.axes[0].lines if line.get_marker() == "*"]
    assert star.get_markerfacecolor() == "none"
    (dot,) = [line for line in fig.axes[0].lines if line.get_marker() == "o" and len(line.get_xdata())]
    assert list(dot.get_xdata()) == [0.487] and dot.get_markerfacecolor() != "none"


def _loss_run(method, rank, lr, seed, validation, losses):
    """A finished run as results.json holds it, with ``train_loss``: per task, one loss per step."""
    return {"method": method, "base_method": method, "rank": rank, "seed": seed, "lr": lr, "head_lr": 1e-3,
            "status": "ok", "error": None, "accuracy_matrix": [[0.5, 0.3], [0.7, 0.3], [0.68, 0.6]],
            "validation_accuracy": [validation, validation], "final_train_loss": [x[-1] for x in losses],
            "train_loss": losses, "perplexity": {"before": 14.5, "after_task": [14.6, 14.9], "final": 14.9},
            "trainable_params": {"adapter": 0 if rank is None else 23040, "heads": 10},
            "diagnostics": [], "wall_time_s": 10.0, "peak_memory_mb": 900.0}


def _losses(start: float, slope: float, steps: int = 30) -> list[list[float]]:
    return [[start * (1 - slope * k / steps) + 0.05 * (k % 3) for k in range(steps)] for _ in TASKS[:2]]


def test_loss_curves_draw_each_method_at_its_chosen_rate_and_the_report_links_them(tmp_path, captured):
    from curlora.continual.report import write_report

    runs = [_loss_run(m, 16, lr, seed, val, _losses(1.1, slope))
            for seed in (0, 1)
            for m, lr, val, slope in (("curlora", 1e-3, 0.55, 0.0), ("curlora", 1e-2, 0.60, 0.5),
                                      ("lora", 3e-3, 0.65, 0.6), ("lora", 1e-2, 0.40, -3.0))]
    runs += [_loss_run("head", None, None, seed, 0.5, _losses(1.1, 0.2)) for seed in (0, 1)]
    results = {"schema_version": 1, "config": {}, "model": "SmolLM2-135M-Instruct", "runs": runs,
               "frontier": {}, "tasks": [{"name": name, "label_names": ["a", "b"], "n_train": 30, "n_eval": 20,
                                          "majority_accuracy": 0.5} for name in TASKS[:2]],
               "corpus": {"name": "wiki_summaries", "tokens_scored": 4095, "window": 512, "stride": 256}}
    report = write_report(results, tmp_path).read_text(encoding="utf-8")
    png = tmp_path / "train_loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "![training loss](train_loss.png)" in report
    (fig,) = [f for f in captured if f._suptitle is not None and "Training loss" in f._suptitle.get_text()]
    assert len(fig.axes) == 2 and "mean of 2 seeds" in fig._suptitle.get_text()
    names = [text.get_text() for text in fig.legends[0].get_texts()]
    assert names == ["curlora r16 (lr 0.01)", "lora r16 (lr 0.003)", "head"]  # the rejected rates are not drawn
    assert_no_overlap(fig)


def test_results_without_per_step_losses_say_so_instead_of_a_plot(tmp_path):
    from curlora.continual.report import write_report

    runs = [{k: v for k, v in _loss_run("curlora", 16, 1e-2, 0, 0.6, _losses(1.1, 0.5)).items() if k != "train_loss"}]
    results = {"schema_version": 1, "config": {}, "model": "m", "runs": runs, "frontier": None,
               "tasks": [{"name": name, "label_names": ["a", "b"], "n_train": 30, "n_eval": 20,
                          "majority_accuracy": 0.5} for name in TASKS[:2]], "corpus": {"name": "c"}}
    report = write_report(results, tmp_path).read_text(encoding="utf-8")
    assert not plots.plot_loss_curves(results, tmp_path / "train_loss.png")
    assert not (tmp_path / "train_loss.png").exists() and "training loss (`train_loss`;" in report


def test_a_generative_run_of_floors_alone_has_no_loss_plot_and_its_report_says_why(tmp_path):
    """zero-shot and k-shot train nothing: their runs keep an empty loss list per task (this crashed
    the report of a floors-only command)."""
    from curlora.continual.report import write_report

    runs = [{**_loss_run(m, None, None, 0, 0.5, _losses(1.1, 0.0)), "train_loss": [[], []],
             "final_train_loss": [None, None]} for m in ("zero-shot", "k-shot")]
    results = {"schema_version": 1, "config": {}, "model": "m", "runs": runs, "frontier": None,
               "tasks": [{"name": name, "label_names": ["a", "b"], "n_train": 30, "n_eval": 20,
                          "majority_accuracy": 0.5} for name in TASKS[:2]], "corpus": {"name": "c"}}
    assert not plots.plot_loss_curves(results, tmp_path / "train_loss.png")
    report = write_report(results, tmp_path).read_text(encoding="utf-8")
    assert not (tmp_path / "train_loss.png").exists() and "such as zero-shot and k-shot, have none" in report


def test_loss_curves_are_drawn_at_the_rate_chosen_among_all_runs_not_among_those_with_losses(tmp_path, captured):
    """Older runs without per-step losses still take part in the rate choice: a newer run at a
    rejected rate is not drawn as if it were the chosen one."""
    old = {k: v for k, v in _loss_run("curlora", 16, 1e-2, 0, 0.60, _losses(1.1, 0.5)).items() if k != "train_loss"}
    runs = [old, _loss_run("curlora", 16, 3e-2, 0, 0.40, _losses(1.1, 0.1)),
            _loss_run("lora", 16, 3e-3, 0, 0.65, _losses(1.1, 0.6))]
    results = {"runs": runs, "tasks": [{"name": name} for name in TASKS[:2]]}
    assert plots.plot_loss_curves(results, tmp_path / "train_loss.png")
    names = [text.get_text() for text in captured[0].legends[0].get_texts()]
    assert names == ["lora r16 (lr 0.003)"]  # curlora chose 1e-2, whose run has no losses
    assert not plots.plot_loss_curves({"runs": runs[:2], "tasks": results["tasks"]}, tmp_path / "none.png")


def test_loss_curves_take_the_rate_the_grid_seeds_chose_not_one_the_confirming_seeds_moved(tmp_path, captured):
    """With confirm_seeds, seed 0's grid chooses the rate and seeds 1-2 run only there: pooling every
    run would let one confirming seed's low validation move the plot to a rejected rate (the report's
    tables did not move: the generative frontier's plot had drawn lora-mica at 1e-3, its table 3e-3)."""
    runs = [_loss_run("lora", 16, 1e-3, 0, 0.60, _losses(1.1, 0.3)), _loss_run("lora", 16, 3e-3, 0, 0.65, _losses(1.1, 0.6)),
            _loss_run("lora", 16, 3e-3, 1, 0.50, _losses(1.1, 0.6))]
    results = {"runs": runs, "tasks": [{"name": name} for name in TASKS[:2]],
               "config": {"seeds": [0], "confirm_seeds": [1]}}
    assert plots.plot_loss_curves(results, tmp_path / "train_loss.png")
    assert [text.get_text() for text in captured[0].legends[0].get_texts()] == ["lora r16 (lr 0.003)"]


def test_a_ceiling_added_beside_older_runs_gets_its_one_panel_and_names_what_is_not_drawn(tmp_path, captured):
    """Gemma's heads experiment: its multitask ceiling ran with per-step losses, its older CURLoRA and
    LoRA runs without. The plot had drawn two empty task panels and said nothing of the missing methods."""
    older = [{k: v for k, v in _loss_run(m, 16, lr, 0, 0.6, _losses(1.1, 0.5)).items() if k != "train_loss"}
             for m, lr in (("curlora", 1e-1), ("lora", 1e-3))]
    multitask = {**_loss_run("multitask", 16, 1e-3, 0, 0.7, _losses(2.5, 0.7)), "sequential": False}
    multitask["train_loss"] = [multitask["train_loss"][0] * 3, []]  # every task's steps, in the first panel
    results = {"runs": [*older, multitask], "tasks": [{"name": name} for name in TASKS[:2]]}
    assert plots.plot_loss_curves(results, tmp_path / "train_loss.png")
    fig = captured[0]
    assert [ax.get_title() for ax in fig.axes] == [TASKS[0]]
    assert any(t.get_text() == "Not drawn, their runs predate per-step losses: curlora r16 (lr 0.1), lora r16 (lr 0.001)"
               for t in fig.texts)
    assert_no_overlap(fig)


def test_a_curve_some_of_whose_runs_lack_losses_is_drawn_from_the_rest_and_says_so(tmp_path, captured):
    """The orders experiment: the listed order's runs came from the frontier, older than per-step
    losses, the two new orders' runs have them. The plot had drawn those curves from the new runs yet
    named them "not drawn", and called nine runs over seeds and orders "9 seeds"."""
    runs = []
    for order in ("listed", "second-first"):
        for method, lr in (("curlora", 1e-2), ("lora", 3e-3)):
            run = {**_loss_run(method, 16, lr, 0, 0.6, _losses(1.1, 0.5)), "order": order}
            if order == "listed" and method == "curlora":
                del run["train_loss"]
            runs.append(run)
    # Multitask learns every task at once: its steps stay in the first panel whatever the order.
    for order, task_order in (("listed", [0, 1]), ("second-first", [1, 0])):
        multitask = {**_loss_run("multitask", 16, 3e-3, 0, 0.7, _losses(2.5, 0.7)), "sequential": False,
                     "order": order, "task_order": task_order}
        multitask["train_loss"] = [multitask["train_loss"][0] * 2, []]
        runs.append(multitask)
    for run in runs:
        run.setdefault("task_order", [0, 1] if run["order"] == "listed" else [1, 0])
    results = {"runs": runs, "tasks": [{"name": name} for name in TASKS[:2]]}
    assert plots.plot_loss_curves(results, tmp_path / "train_loss.png")
    fig = captured[0]
    assert sorted(t.get_text() for t in fig.legends[0].get_texts()) == [
        "curlora r16 (lr 0.01), 1 of its 2 runs", "lora r16 (lr 0.003)",
        "multitask r16 (lr 0.003): every task, in the first panel"]
    assert [len(ax.lines) for ax in fig.axes] == [6, 4]  # raw and trend per curve; multitask's only in the first
    assert "mean of up to 2 runs (seeds × 2 orders)" in fig._suptitle.get_text()
    assert not any("Not drawn" in t.get_text() for t in fig.texts)
    assert_no_overlap(fig)
