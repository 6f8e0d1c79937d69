"""The generative protocol: answer scoring, the answer-only loss, its floors, every method, resume."""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import kill_after_first_task, save_tiny_llama, tiny_gpt2, tiny_llama

from curlora.continual import ContinualRunner
from curlora.continual.config import ContinualConfig
from curlora.continual.methods import REGISTRY
from curlora.continual import forward
from curlora.continual.forward import answer_log_probs, lm_logits

PROMPTS = [[5, 9, 17, 3], [40, 2], [7, 7, 7, 8, 100, 11]]
ANSWERS = [[21], [33, 4], [50, 60, 70]]  # one, two and three tokens


def _left_padded(rows, pad=0):
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize("shared", [[], list(range(10, 22))], ids=["no-shared-prefix", "shared-prefix"])
def test_a_labels_score_is_the_sum_of_its_tokens_log_probabilities(factory, shared, monkeypatch):
    """With 12 tokens every prompt starts with, those run once and every answer continues from
    their cache; without, each prompt runs whole. The scores are the same sums by hand."""
    model = factory()
    prompts = [shared + p for p in PROMPTS]
    ids, mask = _left_padded(prompts)
    assert forward.shares_prefix_exactly(model)  # the probe's own caches are not counted below
    caches, original = [], forward._prefix_cache
    monkeypatch.setattr(forward, "_prefix_cache", lambda lm, p, rows: caches.append(rows) or original(lm, p, rows))
    scores = answer_log_probs(model, ids, mask, ANSWERS)
    assert caches == ([len(prompts)] if shared else [])
    with torch.no_grad():
        for i, prompt in enumerate(prompts):
            for k, answer in enumerate(ANSWERS):
                # By hand: the unpadded prompt + answer in one forward, each answer token's log-probability.
                logp = F.log_softmax(model(torch.tensor([prompt + answer])).logits[0].double(), -1)
                expected = sum(float(logp[len(prompt) - 1 + t, a]) for t, a in enumerate(answer))
                assert abs(float(scores[i, k]) - expected) < 1e-4, (i, k)


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2])
def test_answer_logits_packed_or_padded_are_those_of_a_plain_forward(factory):
    model = factory()
    rows = [p + a for p, a in zip(PROMPTS, ANSWERS)]
    ids, mask = _left_padded(rows)
    wanted = torch.zeros_like(ids, dtype=torch.bool)
    for i, (p, a) in enumerate(zip(PROMPTS, ANSWERS)):
        wanted[i, ids.shape[1] - len(a) - 1: ids.shape[1] - 1] = True  # positions predicting the answer
    got = lm_logits(model, ids, mask, wanted)  # 13 of 27 slots real: runs packed on these models
    with torch.no_grad():
        expected = torch.cat([model(torch.tensor([r])).logits[0, len(p) - 1: len(r) - 1]
                              for r, p in zip(rows, PROMPTS)])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    dense = torch.ones_like(mask)
    torch.testing.assert_close(lm_logits(model, ids, dense, wanted),
                               model(ids).logits[wanted], rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, smol_tokenizer):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama-gen"), smol_tokenizer)


def generative_config(model_dir, data_dir, **overrides):
    settings = dict(
        model=model_dir, protocol="generative", tasks=["sst2", "mrpc"], corpus="wikitext2", data_dir=str(data_dir),
        ranks=[4], examples_per_task=16, eval_examples=12, batch_size=8, max_length=24, lr=1e-2, head_lr=1e-2,
        ppl_max_tokens=96, ppl_window=64, ppl_stride=32, progress=False, k_shot=2, generation_examples=4,
        corda_samples=8, corda_sample_tokens=64,
    )
    settings.update(overrides)
    return ContinualConfig(**settings)


def test_defaults_and_floors_belong_to_the_protocol(tiny_model_dir, data_dir):
    config = generative_config(tiny_model_dir, data_dir)
    assert config.methods == ["curlora", "lora", "zero-shot", "k-shot"]
    assert ContinualConfig().methods == ["curlora", "lora", "head"]
    with pytest.raises(ValueError, match=r"\['head'\] are floors of another protocol.*'zero-shot', 'k-shot'"):
        generative_config(tiny_model_dir, data_dir, methods=["curlora", "head"])
    with pytest.raises(ValueError, match=r"'heads' protocol's floors are \['head'\]"):
        ContinualConfig(methods=["zero-shot"])
    with pytest.raises(ValueError, match="Unknown protocol"):
        ContinualConfig(protocol="heads-and-tails")


def test_zero_shot_row_is_the_untouched_model_scored_and_k_shot_shows_training_rows(tmp_path, tiny_model_dir,
                                                                                      data_dir):
    config = generative_config(tiny_model_dir, data_dir, methods=["zero-shot", "k-shot", "curlora"])
    runner = ContinualRunner(config, tmp_path)
    results = runner.run()
    runs = {r["method"]: r for r in results["runs"]}
    base = _base_model(tiny_model_dir)
    collator = runner.prepared.protocol.collator
    by_hand = []
    for task in runner.prepared.data.tasks:
        correct = 0
        for example in task.eval:
            batch = collator.prompt_batch([example], task.prompt)
            scores = answer_log_probs(base, batch["input_ids"], batch["attention_mask"], collator.answers(task.prompt))
            correct += int(scores.argmax()) == example.label
        by_hand.append(correct / len(task.eval))
    zero = runs["zero-shot"]
    # Before, after task 1 (task 2 not yet seen), after task 2: nothing trains, nothing moves.
    assert zero["accuracy_matrix"] == [by_hand, [by_hand[0], None], by_hand]
    assert runs["curlora"]["accuracy_matrix"][0] == by_hand  # every method's before row is zero-shot
    assert zero["trainable_params"] == {"adapter": 0, "heads": 0} and zero["train_loss"] == [[], []]
    assert zero["perplexity"]["final"] == zero["perplexity"]["before"]
    state = runner.prepared.protocol.start_run(0, base)
    demos = state.demonstrations(0, 2)
    train = runner.prepared.data.tasks[0].train
    assert all(d in train for d in demos) and {d.label for d in demos} == {0, 1}
    assert state.demonstrations(0, 2) == demos  # seeded
    assert runs["k-shot"]["accuracy_matrix"][1] != [None, None]
    curlora = runs["curlora"]
    assert [len(steps) for steps in curlora["train_loss"]] == [2, 2]  # 16 rows, batch 8
    assert curlora["trainable_params"]["heads"] == 0 and len(curlora["valid_answer_rate"]) == 2
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["protocol"]["name"] == "generative" and saved["protocol"]["chat_template"] is True
    assert saved["protocol"]["prompts"]["mrpc"]["label_words"] == ["no", "yes"]
    assert saved["protocol"]["end_of_answer"] == ["<|im_end|>"]
    report = (tmp_path / "report.md").read_text()
    assert "zero-shot" in report and "k-shot" in report


def _base_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def test_every_registered_method_runs_a_two_task_generative_sequence(tmp_path, tiny_model_dir, data_dir):
    methods = [name for name, m in REGISTRY.items() if name != "head"] + ["curlora+replay", "lora+ewc"]
    config = generative_config(tiny_model_dir, data_dir, methods=methods, replay_per_task=4, ewc_fisher_examples=4,
                               tasks=["rotten_tomatoes", "sst2"], source=None, generation_examples=2)
    results = ContinualRunner(config, tmp_path).run()
    runs = {r["method"]: r for r in results["runs"]}
    assert set(runs) == set(methods)
    for name, run in runs.items():
        assert run["status"] == "ok", (name, run.get("error"))
        assert len(run["accuracy_matrix"]) == 3 and None not in run["accuracy_matrix"][2], name
        trains = not REGISTRY.get(name, REGISTRY["curlora"]).frozen_backbone
        assert (run["trainable_params"]["adapter"] > 0) == trains, name
        assert all(steps for steps in run["train_loss"]) == trains, name
        assert all(0 <= rate <= 1 for rate in run["valid_answer_rate"]), name
    # The replayed rows are the first task's prompt -> answer pairs: the second task's epoch grew by 4 rows.
    assert len(runs["curlora+replay"]["train_loss"][1]) == 3 and len(runs["curlora"]["train_loss"][1]) == 2


def test_a_killed_generative_run_resumes_to_identical_numbers(tmp_path, tiny_model_dir, data_dir, monkeypatch):
    config = generative_config(tiny_model_dir, data_dir, methods=["curlora+replay", "k-shot"], replay_per_task=4)
    uninterrupted = ContinualRunner(config, tmp_path / "a").run()
    trained = []
    kill_after_first_task(monkeypatch, trained)
    with pytest.raises(KeyboardInterrupt):
        ContinualRunner(config, tmp_path / "b").run()
    trained.clear()
    resumed = ContinualRunner(config, tmp_path / "b", resume=True).run()
    # The finished task came from its checkpoint: only the second task and the k-shot run were trained.
    assert ("curlora+replay_r4_lr0.01_s0", 1) not in trained and ("curlora+replay_r4_lr0.01_s0", 2) in trained

    def comparable(results):
        return [{k: v for k, v in r.items() if k not in ("wall_time_s", "peak_memory_mb")} for r in results["runs"]]

    assert comparable(resumed) == comparable(uninterrupted)


def test_greedy_answers_of_a_bank_use_each_tasks_own_u(tmp_path, tiny_model_dir, data_dir, monkeypatch):
    from curlora.continual import protocols

    active = []
    original = protocols.GenerativeRun._valid_answers

    def recording(self, model, rows, prompt, demos):
        active.append(model.active_adapter)
        return original(self, model, rows, prompt, demos)

    monkeypatch.setattr(protocols.GenerativeRun, "_valid_answers", recording)
    ContinualRunner(generative_config(tiny_model_dir, data_dir, methods=["curlora-bank"]), tmp_path).run()
    assert active == ["default", "task1"]
