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
