import struct

import pytest

from curlora.continual.report import format_table, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(method, rank, seed, R, ppl_after, status="ok", error=None):
    return {
        "method": method, "rank": rank, "seed": seed, "lr": 2.5e-4, "head_lr": 1e-3,
        "status": status, "error": error, "accuracy_matrix": R,
        "perplexity": {"before": 30.2, "after_task": ppl_after, "final": ppl_after[-1]},
        "trainable_params": {"adapter": 0 if method == "head" else 69120, "heads": 1730},
        "diagnostics": [], "wall_time_s": 100.0 + seed, "peak_memory_mb": 900.0,
    }


@pytest.fixture
def results():
    return {
        "schema_version": 1,
        "config": {"anything": True},
        "model": "SmolLM2-135M-Instruct",
        "tasks": [
            {"name": "sst2", "label_names": ["negative", "positive"], "n_train": 512,
             "n_eval": 300, "majority_accuracy": 0.51},
            {"name": "agnews", "label_names": ["w", "s", "b", "t"], "n_train": 512,
             "n_eval": 300, "majority_accuracy": 0.25},
        ],
        "corpus": {"name": "wikitext2", "tokens_scored": 12345, "window": 512, "stride": 256},
        "runs": [
            _run("curlora", 8, 0, [[0.5, None], [0.90, 0.25], [0.88, 0.80]], [30.3, 30.4]),
            _run("curlora", 8, 1, [[0.5, None], [0.92, 0.25], [0.90, 0.82]], [30.3, 30.6]),
            _run("lora", 8, 0, [[0.5, None], [0.93, 0.25], [0.60, 0.90]], [32.0, 33.4]),
            _run("lora", 8, 1, [[0.5, None], [0.91, 0.25], [0.64, 0.88]], [31.8, 33.6]),
            _run("head", None, 0, [[0.5, None], [0.80, 0.25], [0.80, 0.70]], [30.2, 30.2]),
            _run("head", None, 1, [[0.5, None], [0.82, 0.25], [0.82, 0.72]], [30.2, 30.2]),
            {**_run("curlora", 8, 2, [[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]], [99.0, 99.0]),
             "status": "failed", "error": "CUDA out of memory | step 12"},
        ],
        "summary": [],
    }


def test_write_report(results, tmp_path):
    path = write_report(results, tmp_path / "run")
    assert path == tmp_path / "run" / "report.md"
    md = path.read_text(encoding="utf-8")

    for section in ("## Table 1", "## Table 2", "## Continual-learning metrics", "## Runs",
                    "## Accuracy matrices per run", "## Reading"):
        assert section in md
    # Table 1: seed means over the two ok curlora runs only (failed run's zeros excluded).
    assert ("| curlora | 8 | 0.00025 | 2 | 0.890 ± 0.014 [0.763, 1.017] | 0.810 ± 0.014 [0.683, 0.937] "
            "| 0.850 ± 0.014 [0.723, 0.977] |") in md
    assert "| majority class | — | — | — | 0.510 | 0.250 | 0.380 |" in md
    assert ("| head | — | 0.00025 | 2 | 0.810 ± 0.014 [0.683, 0.937] | 0.710 ± 0.014 [0.583, 0.837] "
            "| 0.760 ± 0.014 [0.633, 0.887] |") in md
    # Table 2: before -> after each task -> final, increase.
    assert "| lora | 8 | 0.00025 | 2 | 30.20 ± 0.00 [30.20, 30.20] | 31.90 ± 0.14 [30.63, 33.17] " \
           "| 33.50 ± 0.14 [32.23, 34.77] | 33.50 ± 0.14 [32.23, 34.77] | +3.30 ± 0.14 [2.03, 4.57] |" in md
    # Metrics: lora BWT = mean(0.60-0.93, 0.64-0.91) = -0.30; params; memory.
    assert ("| lora | 8 | 0.00025 | 2 | 0.755 ± 0.007 [0.691, 0.819] | -0.300 ± 0.042 [-0.681, 0.081] "
            "| +0.300 ± 0.042 [-0.081, 0.681] |") in md
    assert "69,120" in md and "1,730" in md

    # Failed run is reported with its (escaped) error and not aggregated.
    assert "| curlora | 8 | 2 | 0.00025 | 0.001 | failed | 102.0 | CUDA out of memory \\| step 12 |" in md
    assert "1 run(s) did not finish with status ok" in md
    assert "99.00" not in md

    # Reading states facts either way.
    assert ("- curlora r8 (lr 0.00025): ACC 0.850 ± 0.014 [0.723, 0.977]; vs the floor (head) 0.760 ± 0.014 "
            "[0.633, 0.887] (+0.090, not resolved: intervals overlap), higher on 2/2 tasks (sst2 +0.080, "
            "agnews +0.100)") in md
    assert "vs majority class 0.380 (+0.470, resolved: intervals separate)" in md
    assert "lora r8 (lr 0.00025): ACC 0.755 ± 0.007 [0.691, 0.819]; vs the floor (head) 0.760 ± 0.014 " \
           "[0.633, 0.887] (-0.005, not resolved: intervals overlap), higher on 1/2 tasks (sst2 -0.190, agnews +0.180)" in md
    assert "BWT -0.300 ± 0.042 [-0.681, 0.081] (earlier tasks lost accuracy)" in md
    assert "perplexity +3.30 (30.20 → 33.50)" in md
    assert "BWT +0.000 ± 0.000 [0.000, 0.000] (no net change on earlier tasks)" in md
    assert "head (lr 0.00025) [floor]" in md and "perplexity +0.00 (30.20 → 30.20)" in md

    pngs = ["perplexity.png", "accuracy_matrix_curlora_r8.png", "accuracy_matrix_lora_r8.png",
            "accuracy_matrix_head.png"]
    for name in pngs:
        data = (tmp_path / "run" / name).read_bytes()
        assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
        width, height = struct.unpack(">II", data[16:24])
        assert width > 50 and height > 50
        assert f"]({name})" in md
    # Atomic writes leave no temp files behind.
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == sorted(pngs + ["report.md"])


def test_report_without_successful_runs(results, tmp_path):
    results["runs"] = [r for r in results["runs"] if r["status"] != "ok"]
    md = write_report(results, tmp_path).read_text(encoding="utf-8")
    assert "No successful runs" in md and "CUDA out of memory" in md


def test_report_rejects_unknown_schema(results, tmp_path):
    results["schema_version"] = 2
    with pytest.raises(ValueError, match="schema_version"):
        write_report(results, tmp_path)


def test_format_table():
    assert format_table([[1, None, "a|b"]], ["x", "y", "z"]) == (
        "| x | y | z |\n|---|---|---|\n| 1 | — | a\\|b |"
    )
    with pytest.raises(ValueError, match="row 0"):
        format_table([[1]], ["x", "y"])


def test_a_rate_chosen_at_the_grid_edge_is_named_with_its_rank(results, tmp_path):
    runs = []
    for rank, best in ((8, 1e-3), (16, 3e-3)):
        for lr in (1e-3, 3e-3):
            run = _run("curlora", rank, 0, [[0.5, None], [0.9, 0.25], [0.88, 0.8]], [30.3, 30.4])
            runs.append({**run, "lr": lr, "validation_accuracy": [0.7 if lr == best else 0.6] * 2})
    write_report({**results, "runs": runs, "frontier": {}}, tmp_path)
    text = (tmp_path / "report.md").read_text()
    assert "At the edge of the rate grid (the best rate may lie beyond it): curlora r8, curlora r16." in text


def test_valid_greedy_answers_are_reported_as_seed_means_only_when_measured(results, tmp_path):
    md = write_report(results, tmp_path / "heads").read_text(encoding="utf-8")
    assert "Valid answers" not in md  # the heads protocol generates nothing
    for run, rates in zip(results["runs"][:4], ([1.0, 0.5], [0.5, 0.5], [0.25, 1.0], [0.75, 1.0])):
        run["valid_answer_rate"] = rates
    md = write_report(results, tmp_path / "generative").read_text(encoding="utf-8")
    section = md.split("## Valid answers by greedy generation")[1].split("## ")[0]
    assert "| curlora | 8 | 0.00025 | 2 | 0.750 ± 0.354 [-2.426, 3.926] | 0.500 ± 0.000 [0.500, 0.500] |" in section
    assert "| lora | 8 | 0.00025 | 2 | 0.500 ± 0.354" in section and "| head | — | 0.00025 | 2 | — | — |" in section


def test_a_multitask_runs_matrix_rows_say_it_learned_every_task_at_once(results, tmp_path):
    results["runs"].append({**_run("multitask", 8, 0, [[0.5, None], [0.85, None], [0.85, 0.80]], [31.0, 31.0]),
                            "ceiling": True, "sequential": False})
    md = write_report(results, tmp_path).read_text(encoding="utf-8")
    multitask = md.split("### multitask r8, seed 0")[1].split("###")[0]
    assert "| after every task at once | 0.850 | — |" in multitask
    assert "| unchanged, + agnews scored | 0.850 | 0.800 |" in multitask
    assert "after sst2" not in multitask
    lora = md.split("### lora r8, seed 0")[1].split("###")[0]
    assert "| after sst2 | 0.930 | 0.250 |" in lora  # a sequential run's rows are unchanged
    assert (tmp_path / "accuracy_matrix_multitask_r8.png").read_bytes().startswith(PNG_MAGIC)
