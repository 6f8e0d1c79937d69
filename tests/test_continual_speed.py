"""The harness's exact speedups give exactly the numbers of the work they skip."""

import dataclasses

import pytest
import torch

from conftest import save_tiny_llama

from curlora.continual import ContinualRunner
from curlora.continual import runner as runner_module
from test_continual import _comparable, tiny_config


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, smol_tokenizer):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), smol_tokenizer)


def _counting_feature_calls(monkeypatch) -> list[int]:
    calls = []
    original = runner_module.split_features

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(runner_module, "split_features", counted)
    return calls


@pytest.mark.parametrize("bf16", [False, True])
def test_head_only_cached_features_give_the_uncached_results(tmp_path, tiny_model_dir, data_dir, monkeypatch, bf16):
    config = tiny_config(tiny_model_dir, data_dir, methods=["head"], seeds=[0, 1], bf16=bf16)
    calls = _counting_feature_calls(monkeypatch)
    cached = ContinualRunner(config, tmp_path / "cached").run()
    # Both seeds share one pass per split: 2 evaluation splits + 2 validation splits.
    assert len(calls) == 4
    original = ContinualRunner._features
    monkeypatch.setattr(ContinualRunner, "_features",
                        lambda self, model, splits, j, base: original(self, model, splits, j, False))
    calls.clear()
    uncached = ContinualRunner(config, tmp_path / "uncached").run()
    # Per seed: before row 2, after task 1: 1, after task 2: 2, validation 2.
    assert len(calls) == 2 * 7
    assert _comparable(cached) == _comparable(uncached)


def test_sweep_scores_perplexity_after_the_last_task_only(tmp_path, tiny_model_dir, data_dir):
    sweep = ContinualRunner(tiny_config(tiny_model_dir, data_dir, methods=["curlora", "head"], lrs=[1e-2, 3e-3]),
                            tmp_path / "sweep").run()
    single = ContinualRunner(tiny_config(tiny_model_dir, data_dir, methods=["curlora"], lr=1e-2),
                             tmp_path / "single").run()
    swept = {(run["method"], run["lr"]): run for run in sweep["runs"]}
    for lr in (1e-2, 3e-3):
        ppl = swept["curlora", lr]["perplexity"]
        assert ppl["after_task"][0] is None and ppl["final"] == ppl["after_task"][1] is not None
    # The head is not swept over rates (and costs nothing to score): it keeps its curve.
    assert None not in swept["head", None]["perplexity"]["after_task"]
    # A single rate keeps the whole curve, and the sweep's run at that rate ends on the same numbers.
    (alone,) = single["runs"]
    assert None not in alone["perplexity"]["after_task"]
    assert alone["perplexity"]["final"] == swept["curlora", 1e-2]["perplexity"]["final"]
    assert alone["accuracy_matrix"] == swept["curlora", 1e-2]["accuracy_matrix"]
    # Asked for, a single rate scores only the end too (more seeds beside a sweep's runs) and ends the same.
    (last,) = ContinualRunner(tiny_config(tiny_model_dir, data_dir, methods=["curlora"], lr=1e-2,
                                          ppl_after_every_task=False), tmp_path / "last").run()["runs"]
    assert last["perplexity"]["after_task"][0] is None and last["perplexity"]["final"] == alone["perplexity"]["final"]


def _numbers(results):
    """What a run measured (not how long it took, nor how many threads it had)."""
    return [{k: v for k, v in run.items() if k not in ("wall_time_s", "peak_memory_mb", "threads")}
            for run in results["runs"]]


def test_runs_in_worker_processes_give_the_numbers_of_one_process(tmp_path, tiny_model_dir, data_dir):
    config = tiny_config(tiny_model_dir, data_dir, methods=["curlora", "lora", "head"], lrs=[1e-2, 3e-3])
    alone = ContinualRunner(config, tmp_path / "alone").run()
    pooled = ContinualRunner(dataclasses.replace(config, workers=2), tmp_path / "pooled").run()
    assert _numbers(pooled) == _numbers(alone)
    assert {run["threads"] for run in pooled["runs"]} == {max(1, torch.get_num_threads() // 2)}
    assert pooled["frontier"] == alone["frontier"]


def test_a_pool_resumes_the_runs_it_had_not_finished(tmp_path, tiny_model_dir, data_dir):
    config = tiny_config(tiny_model_dir, data_dir, methods=["curlora", "head"], lrs=[1e-2, 3e-3], workers=2)
    first = ContinualRunner(config, tmp_path / "run").run()
    # As if killed before two runs were written: --resume (with another worker count) redoes just those.
    written = sorted((tmp_path / "run" / "runs").glob("*.json"))
    for path in written[:2]:
        path.unlink()
    resumed = ContinualRunner(dataclasses.replace(config, workers=1), tmp_path / "run", resume=True).run()
    assert _numbers(resumed) == _numbers(first)


def test_workers_are_refused_off_the_cpu():
    with pytest.raises(ValueError, match="workers=2"):
        tiny_config("x", ".", workers=2, device="mps")


def test_a_failing_worker_is_reported_and_the_other_runs_are_kept(tmp_path, tiny_model_dir, data_dir):
    # PEFT refuses this initialisation when the run builds it, inside a worker process.
    config = tiny_config(tiny_model_dir, data_dir, methods=["head", "lora-broken"], workers=2,
                         method_variants={"lora-broken": {"base": "lora", "init_lora_weights": "no-such-init"}})
    with pytest.raises(ChildProcessError, match="rerun with --resume"):
        ContinualRunner(config, tmp_path / "run").run()
    assert [p.name for p in (tmp_path / "run" / "runs").glob("*.json")] == ["head_s0.json"]
