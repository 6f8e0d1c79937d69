"""The harness's speedups give the numbers of the work they skip: exactly, or (packed batches)
up to float rounding."""

import copy
import dataclasses
import json

import pytest
import torch

from conftest import save_tiny_llama
from test_architectures import ARCHITECTURES, tiny
from test_continual import _comparable, tiny_config

from curlora.continual import ContinualRunner, forward
from curlora.continual.plan import RunSpec
from curlora.continual.worker import Worker
from curlora.continual import protocols


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, smol_tokenizer):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), smol_tokenizer)


def _counting_feature_calls(monkeypatch) -> list[int]:
    calls = []
    original = protocols.split_features

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(protocols, "split_features", counted)
    return calls


@pytest.mark.parametrize("bf16", [False, True])
def test_head_only_cached_features_give_the_uncached_results(tmp_path, tiny_model_dir, data_dir, monkeypatch, bf16):
    config = tiny_config(tiny_model_dir, data_dir, methods=["head"], seeds=[0, 1], bf16=bf16)
    calls = _counting_feature_calls(monkeypatch)
    cached = ContinualRunner(config, tmp_path / "cached").run()
    # Both seeds share one pass per split: 2 evaluation splits + 2 validation splits.
    assert len(calls) == 4
    original = protocols.Protocol._cached
    monkeypatch.setattr(protocols.Protocol, "_cached", lambda self, key, base, compute: original(self, key, False, compute))
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


def test_a_worker_scores_a_frozen_backbone_on_the_features_the_parent_computed(tmp_path, tiny_model_dir, data_dir,
                                                                             monkeypatch):
    """The pool's parent computed the base features for the before row; a worker's head-only run
    computes only its validation splits, and ends on the numbers of one process."""
    config = tiny_config(tiny_model_dir, data_dir, methods=["head"])
    ContinualRunner(config, tmp_path / "alone").run()
    parent = ContinualRunner(config, tmp_path / "pooled")
    base = Worker.for_job(parent.job).base([0])
    parent.run_dir.create(config)
    calls = _counting_feature_calls(monkeypatch)
    spec = RunSpec("head", None, None, 0.0, 0)
    parent.run_dir.save_result(spec.key, Worker.for_job(parent.job.elsewhere(threads=1)).train(spec, base))
    assert len(calls) == 2  # the two validation splits
    pooled = json.loads((tmp_path / "pooled" / "runs" / "head_s0.json").read_text())
    one_process = json.loads((tmp_path / "alone" / "runs" / "head_s0.json").read_text())
    assert _numbers({"runs": [pooled]}) == _numbers({"runs": [one_process]})


def test_confirm_seeds_after_a_pool_train_in_this_process_when_one_run_is_left(tmp_path, tiny_model_dir, data_dir):
    """Two grid runs in two workers, then the one confirming run in this process (whose model the
    pool's workers had instead)."""
    config = tiny_config(tiny_model_dir, data_dir, methods=["curlora"], lrs=[1e-2, 1e-3], confirm_seeds=[1],
                         workers=2)
    results = ContinualRunner(config, tmp_path).run()
    assert [(run["seed"], run["status"]) for run in results["runs"]] == [(0, "ok"), (0, "ok"), (1, "ok")]
    assert results["runs"][2]["lr"] == results["frontier"]["selection"][0]["lr"]


def test_a_pool_resumes_the_runs_it_had_not_finished(tmp_path, tiny_model_dir, data_dir):
    config = tiny_config(tiny_model_dir, data_dir, methods=["curlora", "head"], lrs=[1e-2, 3e-3], workers=2)
    first = ContinualRunner(config, tmp_path / "run").run()
    # As if killed before two runs were written: --resume (with another worker count) redoes just those.
    written = sorted((tmp_path / "run" / "runs").glob("*.json"))
    for path in written[:2]:
        path.unlink()
    resumed = ContinualRunner(dataclasses.replace(config, workers=1), tmp_path / "run", resume=True).run()
    assert _numbers(resumed) == _numbers(first)


_ORPHAN_PARENT = """
import sys, time
import multiprocessing
from curlora.continual.executors.local import exit_when_orphaned

def child(parent):
    import threading
    threading.Thread(target=exit_when_orphaned, args=(parent, 0.1), daemon=True).start()
    time.sleep(120)  # a run in progress

if __name__ == "__main__":
    import os
    process = multiprocessing.get_context("spawn").Process(target=child, args=(os.getpid(),))
    process.start()
    print(process.pid, flush=True)
    time.sleep(120)
"""


def test_a_worker_ends_mid_run_when_its_command_is_killed(tmp_path):
    """A command killed by SIGKILL (no handler runs) leaves no worker training on beside the command
    that resumes the experiment."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "parent.py"
    script.write_text(_ORPHAN_PARENT)
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    os.kill(child, 0)  # training
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(child, signal.SIGKILL)
    pytest.fail("the worker went on after its command was killed")


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


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_packed_batches_give_the_padded_states_on_every_architecture(model_type):
    model = tiny(model_type)
    ids = torch.randint(1, 100, (4, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    for row, padding in enumerate((7, 5, 9, 0)):  # 25 of 48 slots real: packed where the model allows
        mask[row, :padding] = 0
    padded = forward._padded_last_hidden(model, ids, mask)
    got = forward.last_hidden(model, ids, mask)
    # OPT reads positions from the 2-D mask, not from position ids: the probe finds packed texts
    # reading each other there, and its batches stay padded (the very same computation).
    assert forward.packs_exactly(model) == (model_type != "opt")
    if model_type == "opt":
        assert torch.equal(got, padded)
    else:
        torch.testing.assert_close(got, padded, atol=1e-5, rtol=1e-5)


def test_a_dense_batch_stays_padded(monkeypatch):
    model = tiny("llama")
    packed = []
    monkeypatch.setattr(forward, "_packed_last_hidden", lambda *a: packed.append(1))
    ids = torch.randint(1, 100, (4, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # 45 of 48 slots real: the packed row's attention would cost more than it saves
    forward.last_hidden(model, ids, mask)
    assert not packed


def test_packed_training_steps_match_padded_ones_on_smollm2(smollm2, data_dir):
    """The real model, CURLoRA on q/k/v, a shuffled batch of real short texts (mostly padding):
    packed and padded give the same features and the same gradient of every U."""
    from curlora import CURLoRAConfig, get_curlora_model
    from curlora.data import ClassificationCollator, load_task

    base, tokenizer = smollm2
    model = get_curlora_model(copy.deepcopy(base), CURLoRAConfig(r=4, seed=0))
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.02)
    task = load_task("rotten_tomatoes", "offline", data_dir, seed=0, max_train=8, max_eval=1)
    batch = ClassificationCollator(tokenizer, 64)(task.train)
    assert batch["attention_mask"].float().mean() <= forward.PACK_BELOW_DENSITY
    results = []
    for run in (forward._padded_last_hidden, forward.last_hidden):
        model.zero_grad()
        features = run(model, batch["input_ids"], batch["attention_mask"])
        features.square().sum().backward()
        results.append((features.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    (padded, padded_grads), (packed, packed_grads) = results
    assert forward.packs_exactly(model)
    torch.testing.assert_close(packed, padded, atol=1e-4, rtol=1e-4)
    for got, want in zip(packed_grads, padded_grads):
        torch.testing.assert_close(got, want, atol=1e-3 * want.abs().max().item(), rtol=1e-3)


def test_evaluation_batches_hold_similar_token_counts(smol_tokenizer, data_dir, monkeypatch):
    """Evaluation batches are cut from the split sorted by token count, so each batch pads little."""
    from curlora.data import ClassificationCollator, load_task

    task = load_task("rotten_tomatoes", "offline", data_dir, seed=0, max_train=8, max_eval=96)
    collator = ClassificationCollator(smol_tokenizer, 64)
    seen = []
    monkeypatch.setattr(protocols, "last_hidden", lambda model, ids, mask: seen.append(mask.sum(-1)) or ids[:, :1].float())
    features = protocols.split_features(torch.nn.Linear(1, 1), task.eval, collator, batch_size=32)
    counts = torch.cat(seen)
    assert torch.equal(counts, counts.sort().values) and len(counts) == len(task.eval)
    assert sorted(torch.cat(features.labels).tolist()) == sorted(e.label for e in task.eval)


def test_the_packing_probe_leaves_every_module_in_its_mode():
    model = tiny("llama").train()
    model.model.layers[0].eval()  # e.g. a frozen block kept in eval mode while the rest trains
    modes = {name: m.training for name, m in model.named_modules()}
    assert forward.packs_exactly(model)
    assert {name: m.training for name, m in model.named_modules()} == modes
