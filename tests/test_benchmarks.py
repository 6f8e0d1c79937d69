"""The benchmark scripts' machinery on a tiny random Llama: structure only, never timings."""

from __future__ import annotations

import importlib.util
import json
import re
import secrets
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def train_step():
    return _load("train_step")


@pytest.fixture(scope="module")
def init_cost():
    return _load("init_cost")


@pytest.mark.parametrize("path", sorted(BENCH.glob("*.yaml")), ids=lambda p: p.name)
def test_every_benchmark_config_is_accepted(path: Path) -> None:
    """The experiments' YAML files (their commands are in their headers) load as they are committed."""
    from curlora.continual import run_specs
    from curlora.continual.config import load_config

    assert run_specs(load_config(None, path, {}))


@pytest.mark.parametrize("path", sorted(BENCH.glob("*.yaml")), ids=lambda p: p.name)
def test_a_benchmark_config_matches_the_committed_run_directories_its_command_names(path: Path) -> None:
    """A config whose command (in its header) continues a committed run directory (``--output-dir
    docs/results/...``) or takes another's runs (``--reuse-runs-from docs/results/...``) computes its
    runs as those directories' did: else its command stops at once ("its config differs in ...")."""
    from curlora.continual.config import load_config
    from curlora.continual.rundir import RunDir

    config = load_config(None, path, {})
    header = path.read_text(encoding="utf-8")
    named = re.findall(r"--(?:output-dir|reuse-runs-from) (docs/results/[\w.-]+)", header)
    for directory in [ROOT / name for name in named if (ROOT / name / "config.yaml").is_file()]:
        assert RunDir(directory).differences(config)[1] == [], directory


def test_train_step_structure(train_step, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    results = train_step.main([
        "--model", "tiny-llama", "--layers", "3", "--batch-size", "2", "--seq-len", "16", "--ranks", "4,8",
        "--repeats", "2", "--warmup", "1", "--infer-repeats", "3", "--no-memory", "--json", str(out),
    ])
    saved = json.loads(out.read_text())
    assert set(saved) == {"meta", "train", "infer", "comparisons", "targets"}
    assert list(saved["train"]) == [
        "floor", "curlora-r4", "curlora-r8", "unfused-r8", "reference-r4", "reference-r8", "lora-r4", "lora-r8",
    ]
    assert saved["comparisons"]["r8"]["fused_over_unfused"] > 0
    assert list(saved["infer"]) == ["base", "curlora-unmerged", "curlora-merged"]
    assert saved["train"]["floor"]["ratio"] == pytest.approx(1.0)
    assert saved["train"]["floor"]["cpu_ratio"] == pytest.approx(1.0)
    assert saved["train"]["floor"]["trainable_params"] == 1
    # r × r per adapted layer: 3 layers (--layers) × q/k/v × 8².
    assert saved["meta"]["layers"] == 3
    assert saved["train"]["curlora-r8"]["trainable_params"] == 3 * 3 * 64
    assert saved["train"]["reference-r8"]["trainable_params"] == 3 * 3 * 64
    assert saved["train"]["lora-r8"]["trainable_params"] > 3 * 3 * 64
    for row in saved["train"].values():
        assert len(row["times_s"]) == 2 and row["median_s"] > 0
    assert all(len(row["times_s"]) == 3 for row in saved["infer"].values())
    assert set(saved["meta"]["cpu_steal"]) == {"train", "infer"}
    assert set(saved["comparisons"]) == {"r4", "r8"}
    assert all(isinstance(t["met"], bool) for t in saved["targets"].values())
    assert saved["meta"]["threads"]["torch_num_threads"] >= 1
    assert saved["meta"]["threads"]["OMP_WAIT_POLICY"] is not None
    table = train_step.format_table(results)
    for name in ("floor", "curlora-r8", "reference-r8", "lora-r8", "curlora-merged", "targets:"):
        assert name in table


def test_layers_only_shortens_random_shapes(train_step) -> None:
    import torch

    assert train_step.load_base("tiny-llama", torch.float32, layers=1).config.num_hidden_layers == 1
    with pytest.raises(ValueError, match="--layers applies to the random shapes"):
        train_step.load_base("smollm2", torch.float32, layers=1)


def test_floor_gradient_reaches_every_layer(train_step) -> None:
    """The floor trains one scalar, but its gradient needs backward through the whole model."""
    base = train_step.tiny_llama()
    v = train_step.build_train_variant(base, "floor", None)
    ids = train_step.make_batch(base.config.vocab_size, 2, 8)
    v.model(input_ids=ids, labels=ids).loss.backward()
    assert [p.numel() for p in v.params] == [1] and v.params[0].grad is not None
    assert all(p.grad is None for p in base.parameters())


def test_memory_probe_reports_peak(train_step) -> None:
    res = train_step.memory_probe("tiny-llama", train_step.torch.float32, "curlora", 4, 2, 16)
    assert set(res) == {"baseline_rss_mib", "peak_rss_mib", "peak_over_base_mib"}
    assert res["peak_rss_mib"] >= res["baseline_rss_mib"] > 0


def test_reference_matches_factored_forward(train_step) -> None:
    """The in-benchmark reference way computes the same function as the library's layer."""
    import torch

    base = train_step.tiny_llama()
    ours = train_step.build_train_variant(base, "curlora", 4)
    ref = train_step.build_train_variant(base, "reference", 4)
    with torch.no_grad():
        for p in ours.params:
            p.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
        for p in ref.params:
            p.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    ids = train_step.make_batch(base.config.vocab_size, 2, 8)
    torch.testing.assert_close(ours.model(input_ids=ids).logits, ref.model(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


def test_init_cost_structure(init_cost, tmp_path: Path) -> None:
    out = tmp_path / "i.json"
    results = init_cost.main(["--layers", "2", "--hidden", "64", "--kv-out", "32", "--r", "4", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert [r["dtype"] for r in saved["runs"]] == ["float32", "bfloat16"]
    assert all(r["layers"] == 6 and r["sample_s"] >= 0 and isinstance(r["met"], bool) for r in saved["runs"])
    assert "bfloat16" in init_cost.format_table(results)


def test_layer_overhead_structure(tmp_path: Path) -> None:
    layer_overhead = _load("layer_overhead")
    out = tmp_path / "l.json"
    results = layer_overhead.main([
        "--tokens", "8", "--in-features", "12", "--out-features", "12,4", "--r", "2", "--repeats", "2",
        "--json", str(out),
    ])
    saved = json.loads(out.read_text())
    assert set(saved["layers"]) == {"12->12", "12->4"}
    for rows in saved["layers"].values():
        assert set(rows) == {"floor", "curlora-fused", "curlora-op-by-op", "reference", "tiny-matmul"}
        assert rows["floor"]["added_ms"] == 0.0 and rows["tiny-matmul"]["added_ms"] is None
    assert "curlora-fused" in layer_overhead.format_table(results)


def test_sweep_time_runs_both_versions_and_compares_their_numbers(tmp_path: Path, smol_tokenizer, data_dir) -> None:
    from conftest import save_tiny_llama

    model = save_tiny_llama(tmp_path / "tiny", smol_tokenizer)
    out = tmp_path / "sweep_time.json"
    report = _load("sweep_time").main([
        "--lrs", "1e-2", "--eval-examples", "8", "--examples-per-task", "12", "--threads", "1",
        "--json", str(out), "--work-dir", str(tmp_path / "runs"), "--after-flags", "--workers 2", "--",
        # One precision for both: the old code's default was bf16 on CPUs with avx512_bf16.
        "--no-bf16", "--model", model, "--data-dir", str(data_dir), "--tasks", "sst2,mrpc", "--methods", "curlora,head",
        "--ranks", "4", "--max-length", "32", "--batch-size", "4",
        "--ppl-max-tokens", "96", "--ppl-window", "64", "--ppl-stride", "32",
    ])
    assert json.loads(out.read_text())["wall_ratio"] == report["wall_ratio"] > 0
    assert all(run["cpu_s"] > 0 for runs in report["timings"].values() for run in runs)
    before, after = report["headline"]["before"], report["headline"]["after"]
    assert set(before["runs"]) == {"curlora r=4 lr=0.01 seed=0", "head r=None lr=None seed=0"}
    assert report["meta"]["after_flags"] == "--workers 2" and report["meta"]["cpu"]
    # The speedups are exact: the old code and this tree (its runs in two workers) agree on every headline number.
    assert report["differences"] == [] and before == after
    assert before["chosen_lr"]["curlora r=4"] == 0.01


def test_protocol_cost_alternates_the_protocols_on_the_same_runs(tmp_path: Path, smol_tokenizer, data_dir) -> None:
    from conftest import save_tiny_llama

    model = save_tiny_llama(tmp_path / "tiny", smol_tokenizer)
    out = tmp_path / "protocol_cost.json"
    report = _load("protocol_cost").main([
        "--method-lrs", "curlora=1e-2", "--repeats", "1", "--threads", "1", "--json", str(out),
        "--work-dir", str(tmp_path / "runs"), "--", "--model", model, "--data-dir", str(data_dir),
        "--tasks", "sst2,mrpc", "--ranks", "4", "--examples-per-task", "12", "--eval-examples", "8",
        "--max-length", "32", "--batch-size", "4", "--ppl-max-tokens", "96", "--ppl-window", "64", "--ppl-stride", "32",
        "--generation-examples", "2",
    ])
    assert json.loads(out.read_text())["wall_ratio"] == report["wall_ratio"] > 0
    assert [list(run["runs"]) for run in report["timings"]["heads"]] == [["curlora lr=0.01"]]
    assert set(report["per_run_wall_ratio"]) == {"curlora lr=0.01"}
    saved = [json.loads((tmp_path / "runs" / f"{p}-0" / "results.json").read_text()) for p in ("heads", "generative")]
    assert [s["protocol"]["name"] for s in saved] == ["heads", "generative"]
    assert [s["config"]["methods"] for s in saved] == [["curlora"], ["curlora"]]
    assert report["wall_ratio_per_repeat"] == [report["wall_ratio"]]


def test_protocol_cost_summarises_stored_timings_with_the_median_of_an_even_count(tmp_path: Path) -> None:
    def timing(wall: float, run: float) -> dict:
        return {"wall_s": wall, "cpu_s": 2 * wall, "output_dir": "x", "runs": {"lora lr=0.001": run}}

    stored = tmp_path / "earlier.json"
    stored.write_text(json.dumps({"meta": {"repeats": 2}, "timings": {
        "heads": [timing(100.0, 40.0), timing(120.0, 60.0)], "generative": [timing(165.0, 75.0), timing(165.0, 75.0)]}}))
    out = tmp_path / "again.json"
    report = _load("protocol_cost").main(["--summarise", str(stored), "--json", str(out)])
    assert report["wall_ratio"] == report["cpu_ratio"] == 165.0 / 110.0  # not the upper middle value, 120
    assert report["wall_ratio_per_repeat"] == [1.65, 165.0 / 120.0]
    assert report["per_run_wall_ratio"] == {"lora lr=0.001": 1.5}
    assert json.loads(out.read_text()) == report and report["meta"] == {"repeats": 2}


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed: pip install 'curlora[ray]'")
def test_ray_overhead_times_both_executors_on_the_same_runs(tmp_path: Path, smol_tokenizer, data_dir,
                                                            monkeypatch) -> None:
    from conftest import save_tiny_llama

    # The Ray instance the command starts uses this token (Ray would otherwise write ~/.ray/auth_token).
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", secrets.token_hex(16))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    model = save_tiny_llama(tmp_path / "tiny", smol_tokenizer)
    out = tmp_path / "ray_overhead.json"
    report = _load("ray_overhead").main([
        "--lrs", "1e-2", "--eval-examples", "8", "--examples-per-task", "12", "--threads", "1",
        "--json", str(out), "--work-dir", str(tmp_path / "runs"), "--",
        "--model", model, "--data-dir", str(data_dir), "--tasks", "sst2,mrpc", "--methods", "curlora,head",
        "--ranks", "4", "--max-length", "32", "--batch-size", "4",
        "--ppl-max-tokens", "96", "--ppl-window", "64", "--ppl-stride", "32",
    ])
    assert json.loads(out.read_text())["wall_ratio"] == report["wall_ratio"] > 0
    assert [len(runs) for runs in report["timings"].values()] == [1, 1]
    assert report["runs"] == 2 and report["numbers_equal"] and report["differences"] == []
    saved = {e: json.loads((tmp_path / "runs" / f"{e}-0" / "results.json").read_text()) for e in ("local", "ray")}
    assert [saved[e]["config"]["executor"] for e in ("local", "ray")] == ["local", "ray"]
    assert saved["local"]["config"]["workers"] == 2


def test_prefix_sharing_compares_the_three_steps_on_real_prompts(tmp_path: Path, smol_tokenizer, data_dir) -> None:
    from conftest import save_tiny_llama

    model = save_tiny_llama(tmp_path / "tiny", smol_tokenizer)
    out = tmp_path / "prefix_sharing.json"
    report = _load("prefix_sharing").main(["--model", model, "--data-dir", str(data_dir), "--tasks",
                                          "rotten_tomatoes", "--batches", "1", "--repeats", "1", "--json", str(out)])
    (task,) = json.loads(out.read_text())["tasks"]
    assert task == report["tasks"][0] and task["train_batches"] == 1 and task["score_batches"] == 2
    assert set(task["train_s"]) == {"shared", "unshared", "heads"} and set(task["score_s"]) == {"shared", "unshared"}
    # The two paths compute the same numbers: rounding apart.
    assert task["loss_difference"] < 1e-3 and task["gradient_difference_relative"] < 1e-3 and task["score_difference"] < 1e-3


def test_greedy_check_times_both_decoders_on_real_prompts_and_compares_their_answers(tmp_path: Path, smol_tokenizer,
                                                                                      data_dir) -> None:
    from conftest import save_tiny_llama

    model = save_tiny_llama(tmp_path / "tiny", smol_tokenizer)
    out = tmp_path / "greedy_check.json"
    report = _load("greedy_check").main(["--model", model, "--data-dir", str(data_dir), "--tasks", "rotten_tomatoes",
                                        "--k-shot", "2", "--rows", "4", "--repeats", "1", "--json", str(out)])
    (task,) = json.loads(out.read_text())["tasks"]
    assert task == report["tasks"][0] and set(task) == {"task", "0-shot", "2-shot"}
    zero, two = task["0-shot"], task["2-shot"]
    assert zero["rows"] == two["rows"] == 4
    assert set(zero["seconds"]) == {"generate", "greedy_tokens", "scores_plain", "scores_shared"}
    assert two["prompt_tokens_mean"] > zero["prompt_tokens_mean"]  # the demonstrations are in the prompts
    assert zero["same_answers"] and two["same_answers"]
    # Scoring with the prefix shared gives the plain scores: rounding apart.
    assert two["max_score_difference"] < 1e-3 and two["same_predictions"]
