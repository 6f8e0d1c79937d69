import pytest

from curlora.continual.frontier import analyse, default_targets, matched_accuracy, pareto, select_learning_rates


def _run(method, lr, seed, test_acc, val_acc, ppl_after, rank=16):
    return {
        "method": method, "rank": rank, "lr": lr, "seed": seed, "status": "ok",
        "accuracy_matrix": [[0.5, 0.5], [test_acc, None], [test_acc, test_acc]],
        "validation_accuracy": [val_acc, val_acc],
        "perplexity": {"before": 10.0, "after_task": [ppl_after, ppl_after], "final": ppl_after},
    }


def test_selection_reads_only_validation_rows():
    # Evaluation accuracy favours lr 1e-2, validation favours 1e-3: selection must follow validation.
    runs = [
        _run("curlora", 1e-3, 0, test_acc=0.6, val_acc=0.8, ppl_after=11.0),
        _run("curlora", 1e-2, 0, test_acc=0.9, val_acc=0.7, ppl_after=15.0),
        _run("curlora", 1e-3, 1, test_acc=0.6, val_acc=0.8, ppl_after=11.0),
        _run("curlora", 1e-2, 1, test_acc=0.9, val_acc=0.7, ppl_after=15.0),
    ]
    (choice,) = select_learning_rates(runs)
    assert choice["lr"] == 1e-3 and choice["at_grid_edge"]  # the smallest of the rates tried
    # Changing every evaluation number leaves the choice alone.
    for run in runs:
        run["accuracy_matrix"] = [[0.0, 0.0], [1.0, None], [1.0, 1.0]] if run["lr"] == 1e-2 else run["accuracy_matrix"]
    assert select_learning_rates(runs)[0]["lr"] == 1e-3


def test_ties_go_to_the_smaller_rate_and_failed_runs_are_ignored():
    runs = [_run("lora", 1e-2, 0, 0.7, 0.7, 12.0), _run("lora", 1e-3, 0, 0.7, 0.7, 11.0),
            {"method": "lora", "rank": 16, "lr": 1e-4, "seed": 0, "status": "failed", "error": "nan"}]
    assert select_learning_rates(runs)[0]["lr"] == 1e-3


def test_frontier_and_matched_accuracy():
    runs = [
        _run("curlora", 1e-3, 0, 0.6, 0.6, 10.5), _run("curlora", 1e-2, 0, 0.8, 0.8, 12.5),
        _run("lora", 1e-4, 0, 0.65, 0.65, 11.0), _run("lora", 1e-3, 0, 0.85, 0.85, 20.0),
    ]
    result = analyse(runs)
    assert [r["selected"] for r in runs] == [False, True, False, True]
    assert default_targets(result["points"], n=2) == [0.65, 0.8]
    rows = {(m["target"], m["method"]): m for m in matched_accuracy(result["points"], [0.7])}
    assert rows[(0.7, "curlora")]["ppl_increase"] == pytest.approx(1.5)
    assert rows[(0.7, "lora")]["ppl_increase"] == pytest.approx(1.0 + 9.0 * 0.25)
    assert matched_accuracy(result["points"], [0.95])[0]["ppl_increase"] is None
    # Below a method's lowest rate, that rate already reaches the target: its cost is the answer.
    assert matched_accuracy(result["points"], [0.5])[0]["ppl_increase"] == pytest.approx(0.5)


def test_dominated_rates_do_not_bend_the_frontier():
    runs = [
        _run("lora", 1e-4, 0, 0.6, 0.6, 10.5), _run("lora", 1e-3, 0, 0.8, 0.8, 12.5),
        _run("lora", 1e-2, 0, 0.4, 0.4, 900.0),  # diverged: learned less, cost more
    ]
    points = analyse(runs)["points"]
    (row,) = matched_accuracy(points, [0.7])
    assert row["ppl_increase"] == pytest.approx(1.5)
    assert default_targets(points, n=2) == [0.6, 0.8]
    assert pareto([(0.4, 9.0), (0.6, 1.0), (0.8, 3.0), (0.7, 5.0)]) == [(0.6, 1.0), (0.8, 3.0)]


def test_report_states_which_method_forgot_least_at_matched_accuracy():
    from curlora.continual.report import _matched_reading

    rows = [{"target": 0.7, "method": "curlora", "rank": 16, "ppl_increase": 3.0},
            {"target": 0.7, "method": "lora", "rank": 16, "ppl_increase": 1.0}]
    (line,) = _matched_reading(rows)
    assert "lora r16 +1.00, curlora r16 +3.00" in line
    assert line.endswith("lora r16 raised it least at that accuracy (one seed: not resolved against curlora r16).")


def _seed_run(method, lr, seed, plasticity, ppl_increase):
    """A two-task run whose plasticity and perplexity increase are the given numbers."""
    return {"method": method, "rank": 16, "lr": lr, "seed": seed, "status": "ok",
            "accuracy_matrix": [[None, None], [plasticity, None], [plasticity, plasticity]],
            "validation_accuracy": [plasticity, plasticity],
            "perplexity": {"before": 10.0, "after_task": [10.0, 10.0 + ppl_increase],
                           "final": 10.0 + ppl_increase}}


def test_matched_costs_carry_intervals_over_the_seeds_own_curves():
    from curlora.continual.report import _matched_reading

    runs = []
    for seed, jitter in enumerate((0.0, 0.02, -0.02)):
        runs += [_seed_run("lora", 1e-3, seed, 0.6, 0.1 + jitter), _seed_run("lora", 1e-2, seed, 0.8, 0.3 + jitter),
                 _seed_run("curlora", 1e-3, seed, 0.6, 2.0 + jitter), _seed_run("curlora", 1e-2, seed, 0.8, 4.0 + jitter)]
    frontier = analyse(runs)
    point = next(p for p in frontier["points"] if p["method"] == "lora" and p["lr"] == 1e-2)
    assert point["n_seeds"] == 3 and point["ppl_increase"] == pytest.approx(0.3)
    # 95 % t interval, 2 degrees of freedom: mean ± 4.303 · s / √3 with s = 0.02.
    half = 4.303 * 0.02 / 3 ** 0.5
    assert point["ppl_increase_ci95"] == pytest.approx([0.3 - half, 0.3 + half])
    row = next(m for m in frontier["matched"] if m["method"] == "lora" and m["target"] == 0.7)
    assert row["ppl_increase"] == pytest.approx(0.2)
    assert row["ppl_increase_stat"]["n"] == 3
    assert row["ppl_increase_stat"]["ci95"] == pytest.approx([0.2 - half, 0.2 + half])
    (line, *_) = _matched_reading([m for m in frontier["matched"] if m["target"] == 0.7])
    assert "lora r16 raised it least" in line and "resolved: intervals separate" in line


def test_a_rate_inside_the_grid_is_not_at_its_edge():
    runs = [_run("lora", lr, 0, 0.7, val, 12.0) for lr, val in ((1e-4, 0.6), (1e-3, 0.8), (1e-2, 0.7))]
    assert select_learning_rates(runs)[0]["at_grid_edge"] is False


def test_one_narrow_method_among_many_does_not_empty_the_matched_targets():
    runs = []
    for method in ("a", "b", "c", "d"):
        runs += [_run(method, 1e-3, 0, 0.6, 0.6, 11.0), _run(method, 1e-2, 0, 0.8, 0.8, 13.0)]
    runs += [_run("narrow", 1e-3, 0, 0.9, 0.9, 11.0), _run("narrow", 1e-2, 0, 0.95, 0.95, 12.0)]
    targets = default_targets(analyse(runs)["points"], n=2)
    assert targets == [0.6, 0.8]  # the four that overlap; "narrow" reads as a dash there


def test_a_ceiling_above_two_methods_does_not_empty_the_matched_levels():
    """Gemma's heads experiment with its multitask ceiling: CURLoRA, LoRA and multitask, whose plasticity
    (its ACC) lies above both, had no level all three reached, so no matched comparison at all."""
    runs = []
    for method in ("curlora", "lora"):
        runs += [_run(method, 1e-3, 0, 0.6, 0.6, 11.0), _run(method, 1e-2, 0, 0.7, 0.7, 13.0)]
    ceiling = [{**_run("multitask", lr, 0, acc, acc, 12.0), "ceiling": True} for lr, acc in ((1e-3, 0.75), (3e-3, 0.8))]
    result = analyse(runs + ceiling)
    assert result["targets"] == [0.6, 0.65, 0.7]
    assert {m["method"] for m in result["matched"]} == {"curlora", "lora", "multitask"}  # still read at them
    assert default_targets([p for p in result["points"] if p["method"] != "multitask"]) == result["targets"]
