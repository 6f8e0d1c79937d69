import math

import pytest

from curlora.continual.metrics import (
    aggregate_runs,
    average_forgetting,
    backward_transfer,
    final_accuracy,
    interpolate_at_accuracy,
    mean_std,
    plasticity,
    run_metrics,
    summarize,
)

# Forgets: each task drops after later training. Before-row has untrained/unseen entries.
FORGET = [
    [0.5, None, None],
    [0.9, 0.4, None],
    [0.7, 0.8, 0.3],
    [0.6, 0.7, 0.9],
]
# Improves: training task 2 helps task 1.
IMPROVE = [
    [0.5, 0.5],
    [0.6, 0.5],
    [0.8, 0.9],
]


def test_forgetting_matrix_by_hand():
    assert final_accuracy(FORGET) == pytest.approx((0.6 + 0.7 + 0.9) / 3)
    # BWT: mean(0.6-0.9, 0.7-0.8) = -0.2 -> negative means forgetting.
    assert backward_transfer(FORGET) == pytest.approx(-0.2)
    # Forgetting: task0 max(0.9, 0.7)-0.6 = 0.3; task1 0.8-0.7 = 0.1 -> 0.2, positive.
    assert average_forgetting(FORGET) == pytest.approx(0.2)
    assert plasticity(FORGET) == pytest.approx((0.9 + 0.8 + 0.9) / 3)


def test_improving_matrix_has_positive_bwt_and_negative_forgetting():
    assert backward_transfer(IMPROVE) == pytest.approx(0.2)
    assert average_forgetting(IMPROVE) == pytest.approx(-0.2)
    assert plasticity(IMPROVE) == pytest.approx(0.75)


def test_forgetting_measures_drop_from_peak_not_from_learning_time():
    # Task 0 learned at 0.6, peaks at 0.9 after task 1, ends at 0.7.
    R = [[0.5, 0.5, 0.5], [0.6, 0.1, 0.1], [0.9, 0.8, 0.1], [0.7, 0.8, 0.9]]
    assert backward_transfer(R) == pytest.approx((0.1 + 0.0) / 2)
    assert average_forgetting(R) == pytest.approx((0.2 + 0.0) / 2)


def test_single_task_defines_bwt_and_forgetting_as_zero():
    R = [[None], [0.8]]
    assert backward_transfer(R) == 0.0
    assert average_forgetting(R) == 0.0
    assert final_accuracy(R) == pytest.approx(0.8)
    assert plasticity(R) == pytest.approx(0.8)


@pytest.mark.parametrize(
    "R, match",
    [
        (None, "sequence of rows"),
        ([], "T\\+1 >= 2 rows"),
        ([[0.5]], "T\\+1 >= 2 rows"),
        ([[0.5, 0.5], [0.6, 0.5]], "row 0 has 2 entries"),  # T x T instead of (T+1) x T
        ([[0.5, 0.5], [0.6], [0.7, 0.8]], "row 1 has 1 entries"),
        ([[0.5, 0.5], [None, None], [0.7, 0.8]], r"entry \[1\]\[0\]"),  # seen task missing
        ([[0.5, 0.5], [0.6, None], [0.7, None]], r"entry \[2\]\[1\]"),  # last row incomplete
        ([[0.5, 0.5], [0.6, 0.5], [math.nan, 0.8]], r"entry \[2\]\[0\]"),
        ([[0.5, 0.5], "ab", [0.7, 0.8]], "row 1 is not a sequence"),
    ],
)
def test_bad_matrices_raise(R, match):
    with pytest.raises(ValueError, match=match):
        final_accuracy(R)


def test_mean_std():
    assert mean_std([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1.0))  # ddof=1
    assert mean_std([5.0]) == (5.0, 0.0)
    with pytest.raises(ValueError):
        mean_std([])


def _run(method, rank, seed, R, status="ok", lr=1e-3, ppl=(30.0, [31.0, 32.0], 32.0)):
    return {
        "method": method, "rank": rank, "seed": seed, "lr": lr, "status": status,
        "error": None if status == "ok" else "boom", "accuracy_matrix": R,
        "perplexity": {"before": ppl[0], "after_task": ppl[1], "final": ppl[2]},
        "trainable_params": {"adapter": 100, "heads": 10},
        "wall_time_s": 10.0 + seed, "peak_memory_mb": 500.0,
    }


def test_aggregate_runs_groups_and_skips_failed():
    runs = [
        _run("lora", 8, 0, [[0.5, None], [0.8, 0.5], [0.6, 0.9]]),
        _run("lora", 8, 1, [[0.5, None], [0.9, 0.5], [0.8, 0.7]]),
        _run("lora", 8, 2, None, status="failed"),  # no matrix: must not be touched
        _run("head", None, 0, [[0.5, None], [0.7, 0.5], [0.7, 0.6]]),
    ]
    lora, head = aggregate_runs(runs)
    assert (lora["method"], lora["rank"], lora["n_runs"], lora["seeds"]) == ("lora", 8, 2, [0, 1])
    assert lora["acc"]["mean"] == pytest.approx((0.75 + 0.75) / 2)
    assert lora["acc"]["std"] == pytest.approx(0.0)
    # BWT per run: -0.2, -0.1
    assert lora["bwt"]["mean"] == pytest.approx(-0.15)
    assert lora["bwt"]["std"] == pytest.approx(math.sqrt(0.005))
    assert lora["forgetting"]["mean"] == pytest.approx(0.15)
    assert [s["mean"] for s in lora["task_accuracy"]] == pytest.approx([0.7, 0.8])
    assert lora["ppl_increase"] == {"mean": 2.0, "std": 0.0, "n": 2, "ci95": [2.0, 2.0]}
    assert lora["wall_time_s"]["mean"] == pytest.approx(10.5)
    assert lora["accuracy_matrix"][0][1] is None  # unseen in every run
    assert head["n_runs"] == 1 and head["acc"]["std"] == 0.0 and head["acc"]["n"] == 1


def test_aggregate_missing_perplexity_is_none_and_final_falls_back():
    run = _run("lora", 8, 0, [[0.5], [0.8]], ppl=(None, [31.0], None))
    m = run_metrics(run)
    assert m["ppl_final"] == 31.0 and m["ppl_increase"] is None
    (g,) = aggregate_runs([run])
    assert g["ppl_before"] is None and g["ppl_final"]["mean"] == 31.0


def test_aggregate_tolerates_partial_perplexity_but_not_task_count_mismatch():
    full = _run("lora", 8, 0, [[0.5, None], [0.8, 0.5], [0.6, 0.9]])
    partial = _run("lora", 8, 1, [[0.5, None], [0.8, 0.5], [0.6, 0.9]], ppl=(30.0, [], None))
    (g,) = aggregate_runs([full, partial])
    assert [s["n"] for s in g["ppl_after_task"]] == [1, 1]
    other_t = _run("lora", 8, 2, [[0.5], [0.8]])
    with pytest.raises(ValueError, match="number of tasks"):
        aggregate_runs([full, other_t])


def test_bad_run_matrix_names_the_run():
    with pytest.raises(ValueError, match="method=lora rank=8 seed=3"):
        aggregate_runs([_run("lora", 8, 3, [[0.5, 0.5]])])


def test_summarize_keeps_lrs_apart():
    R = [[0.5], [0.8]]
    runs = [_run("lora", 8, 0, R, lr=1e-3), _run("lora", 8, 0, R, lr=1e-4)]
    assert [g["lr"] for g in summarize({"runs": runs})] == [1e-3, 1e-4]
    assert len(aggregate_runs(runs)) == 1


def test_interpolate_at_accuracy():
    pts = [(0.9, 50.0), (0.5, 10.0), (0.7, 30.0)]  # unsorted on purpose
    assert interpolate_at_accuracy(pts, 0.6) == pytest.approx(20.0)
    assert interpolate_at_accuracy(pts, 0.9) == pytest.approx(50.0)
    assert interpolate_at_accuracy(pts, 0.5) == pytest.approx(10.0)
    assert interpolate_at_accuracy(pts, 0.95) is None
    assert interpolate_at_accuracy(pts, 0.4) is None
    assert interpolate_at_accuracy([], 0.5) is None
    assert interpolate_at_accuracy([(0.7, 3.0)], 0.7) == 3.0
    # Duplicate accuracy collapses to the cheaper cost.
    assert interpolate_at_accuracy([(0.5, 10.0), (0.5, 4.0), (0.7, 8.0)], 0.5) == 4.0
    with pytest.raises(ValueError):
        interpolate_at_accuracy([(math.nan, 1.0)], 0.5)


def test_t_interval_matches_tables_and_separation_needs_two_seeds():
    from curlora.continual.metrics import constant, interval95, seed_stat, separated, t_quantile_975

    assert t_quantile_975(1) == 12.706 and t_quantile_975(2) == 4.303 and t_quantile_975(30) == 2.042
    assert t_quantile_975(60) == pytest.approx(2.000, abs=1e-3)  # tabulated t(0.975, 60) = 2.000
    assert t_quantile_975(120) == pytest.approx(1.980, abs=1e-3)
    assert interval95(1.0, 0.5, 1) is None
    lo, hi = interval95(1.0, 0.5, 4)
    assert (lo, hi) == pytest.approx((1.0 - 3.182 * 0.25, 1.0 + 3.182 * 0.25))
    a, b = seed_stat([0.50, 0.51, 0.52]), seed_stat([0.60, 0.61, 0.62])
    assert separated(a, b) is True
    assert separated(a, seed_stat([0.40, 0.55, 0.70])) is False
    assert separated(seed_stat([0.5]), b) is None  # one seed: nothing is resolved
    assert separated(a, constant(0.3)) is True and separated(a, constant(0.51)) is False


def test_run_metrics_reads_every_field_of_a_run():
    run = _run("lora", 8, 3, FORGET, ppl=(30.0, [31.0, 32.0, 33.5], 34.0))
    run.update(trainable_params={"adapter": 123, "heads": 45}, stored_per_task=7, wall_time_s=9.5,
               peak_memory_mb=512.0)
    m = run_metrics(run)
    assert (m["ppl_before"], m["ppl_final"], m["ppl_increase"]) == (30.0, 34.0, 4.0)
    assert (m["adapter_params"], m["head_params"], m["stored_per_task"]) == (123, 45, 7)
    assert (m["wall_time_s"], m["peak_memory_mb"]) == (9.5, 512.0)
    assert m["task_accuracy"] == [0.6, 0.7, 0.9] and m["ppl_after_task"] == [31.0, 32.0, 33.5]
    assert m["accuracy_matrix"] == [list(row) for row in FORGET]
    bare = {"accuracy_matrix": [[0.5], [0.8]], "method": "head"}
    m = run_metrics(bare)  # nothing but the matrix: every other number is None, stored_per_task 0
    assert m["stored_per_task"] == 0 and m["adapter_params"] is None and m["head_params"] is None
    assert m["ppl_final"] is None and m["ppl_increase"] is None and m["peak_memory_mb"] is None


def test_summarize_groups_by_method_rank_and_lr():
    R = [[0.5], [0.8]]
    runs = [_run("lora", 8, 0, R), _run("lora", 4, 0, R), _run("curlora", 8, 0, R), _run("lora", 8, 1, R)]
    groups = summarize({"runs": runs})
    assert [(g["method"], g["rank"], g["lr"], g["n_runs"]) for g in groups] == [
        ("lora", 8, 1e-3, 2), ("lora", 4, 1e-3, 1), ("curlora", 8, 1e-3, 1)]
    assert summarize({}) == []


@pytest.mark.parametrize("R, match", [
    ("not rows", "sequence of rows, got str"),
    (None, "sequence of rows, got NoneType"),
    ([[0.5, None], [0.8, None], [0.8]], r"\(T\+1\) x T = 3 x 2; row 2 has 1 entries"),
    ([[0.5, 0.5], [0.8]], r"\(T\+1\) x T = 2 x 1; row 0 has 2 entries"),
    ([[None, None, None], [0.8, None, None], [0.8, 0.5, None], [0.7, 0.6, float("nan")]], r"entry \[3\]\[2\]"),
])
def test_bad_matrices_name_the_shape_or_entry(R, match):
    with pytest.raises(ValueError, match=match):
        final_accuracy(R)


def test_a_missing_entry_before_the_diagonal_is_refused_after_an_allowed_one():
    # Row 1 may miss task 1 (unseen) but not task 0; the before-row may miss any entry, and the check
    # goes on past an allowed None to the entry after it.
    with pytest.raises(ValueError, match=r"entry \[2\]\[0\]"):
        final_accuracy([[None, None], [0.8, None], [None, 0.7]])
    with pytest.raises(ValueError, match=r"entry \[0\]\[1\] must be a finite number, got 'bad'"):
        final_accuracy([[None, "bad"], [0.8, None], [0.6, 0.7]])


def test_mean_std_and_t_quantile_errors_say_what_is_wrong():
    with pytest.raises(ValueError, match="^mean_std needs at least one value$"):
        mean_std([])
    from curlora.continual.metrics import t_quantile_975

    with pytest.raises(ValueError, match="^degrees of freedom must be >= 1, got 0$"):
        t_quantile_975(0)


@pytest.mark.parametrize("df", [31, 40, 45, 100, 1000])
def test_t_quantile_beyond_the_table_is_the_second_order_cornish_fisher_expansion(df):
    from curlora.continual.metrics import t_quantile_975

    z = 1.959964  # the normal 97.5 % quantile
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    assert t_quantile_975(df) == pytest.approx(z + g1 / df + g2 / df**2, rel=1e-12)
    exact = {31: 2.039513, 40: 2.021075, 45: 2.014103, 100: 1.983972, 1000: 1.962339}[df]
    assert t_quantile_975(df) == pytest.approx(exact, abs=1e-4)


def test_interval_half_width_is_t_times_std_over_root_n():
    from curlora.continual.metrics import interval95

    lo, hi = interval95(2.0, 0.3, 9)
    assert (lo, hi) == pytest.approx((2.0 - 2.306 * 0.3 / 3, 2.0 + 2.306 * 0.3 / 3))


def test_separated_at_touching_intervals_and_missing_sides():
    from curlora.continual.metrics import constant, separated

    assert constant(0.4) == {"mean": 0.4, "std": 0.0, "n": 0, "ci95": None}
    a = {"mean": 0.5, "std": 0.1, "n": 3, "ci95": [0.4, 0.6]}
    touching_above = {"mean": 0.7, "std": 0.1, "n": 3, "ci95": [0.6, 0.8]}
    assert separated(a, touching_above) is False and separated(touching_above, a) is False
    assert separated(a, constant(0.6)) is False and separated(constant(0.4), a) is False
    assert separated(a, None) is None and separated(None, a) is None


def test_interpolation_between_neighbours_and_at_the_ends():
    pts = [(0.5, 10.0), (0.6, 20.0), (0.8, 60.0)]
    assert interpolate_at_accuracy(pts, 0.7) == pytest.approx(40.0)  # between the 2nd and 3rd points
    assert interpolate_at_accuracy(pts, 0.6) == pytest.approx(20.0)
    assert interpolate_at_accuracy([(0.5, 10.0), (0.5, 4.0)], 0.5) == 4.0
    with pytest.raises(ValueError, match=r"finite \(accuracy, cost\) pairs"):
        interpolate_at_accuracy([(0.5, math.inf)], 0.5)


def test_duplicate_accuracies_keep_the_cheapest_cost_in_any_order():
    assert interpolate_at_accuracy([(0.5, 4.0), (0.5, 10.0), (0.7, 8.0)], 0.5) == 4.0
    assert interpolate_at_accuracy([(0.5, 10.0), (0.5, 4.0), (0.7, 8.0)], 0.6) == pytest.approx(6.0)
