"""The generative protocol: answer scoring, the answer-only loss, its floors, every method, resume."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import kill_after_first_task, save_tiny_llama, tiny_gpt2, tiny_llama
from test_architectures import tiny

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


def tiny_gemma():
    return tiny("gemma3_text")  # a sliding attention window of 16 tokens


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2, tiny_gemma])
@pytest.mark.parametrize("shared", [[], list(range(10, 22))], ids=["no-shared-prefix", "shared-prefix"])
def test_a_labels_score_is_the_sum_of_its_tokens_log_probabilities(factory, shared, monkeypatch):
    """With 12 tokens every prompt starts with, those run once and every answer continues from
    their cache (on Gemma, whose 16-token window the prompts and answers outgrow, each prompt alone
    from its own copy); without, each prompt runs whole. The scores are the same sums by hand."""
    model = factory()
    prompts = [shared + p for p in PROMPTS]
    ids, mask = _left_padded(prompts)
    windowed = factory is tiny_gemma
    assert forward.shares_prefix_exactly(model)  # the probes' own caches are not counted below
    assert forward.shares_prefix_past_window_exactly(model) == windowed
    caches, original = [], forward._prefix_cache
    monkeypatch.setattr(forward, "_prefix_cache", lambda lm, p, rows: caches.append(rows) or original(lm, p, rows))
    scores = answer_log_probs(model, ids, mask, ANSWERS)
    assert caches == ([1 if windowed else len(prompts)] if shared else [])
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
    runner, runs, base, collator = _run_beside_the_base(tmp_path, tiny_model_dir, data_dir, ["zero-shot", "k-shot", "curlora"])
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
    # Every evaluation row is predicted as some label (ties split): the counts add up to the rows.
    assert [round(sum(counts), 6) for counts in curlora["predicted_labels"]] == [len(t.eval) for t in runner.prepared.data.tasks]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["protocol"]["name"] == "generative" and saved["protocol"]["chat_template"] is True
    assert saved["protocol"]["prompts"]["mrpc"]["label_words"] == ["no", "yes"]
    assert saved["protocol"]["end_of_answer"] == ["<|im_end|>"]
    report = (tmp_path / "report.md").read_text()
    assert "zero-shot" in report and "k-shot" in report and "## Predicted labels" in report


def _run_beside_the_base(tmp_path, model_dir, data_dir, methods):
    """A generative run of ``methods``: the runner, its runs by method, the untouched base model and the collator."""
    runner = ContinualRunner(generative_config(model_dir, data_dir, methods=methods), tmp_path)
    runs = {r["method"]: r for r in runner.run()["runs"]}
    return runner, runs, _base_model(model_dir), runner.prepared.protocol.collator


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
        method = REGISTRY.get(name, REGISTRY["curlora"])
        trains = not method.frozen_backbone
        assert (run["trainable_params"]["adapter"] > 0) == trains, name
        # Every step learns, except a floor's (none) and multitask's after its first (all tasks at once).
        assert [bool(steps) for steps in run["train_loss"]] == [trains, trains and method.sequential], name
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


def test_k_shot_shows_k_training_rows_of_every_label_seeded(tmp_path, tiny_model_dir, data_dir):
    from curlora.continual.protocols import GenerativeProtocol
    from curlora.data import load_task

    bbc = load_task("bbc_news", "offline", None, seed=0, max_train=60, max_eval=4)
    protocol = GenerativeProtocol([bbc], _tokenizer(tiny_model_dir), generative_config(tiny_model_dir, data_dir),
                                  torch.device("cpu"), False)
    for seed in (0, 1, 2):
        for k in (1, 4):
            demos = protocol.start_run(seed, None).demonstrations(0, k)
            # Every one of the five topics, k times each (k = 4 used to show four topics, never "tech").
            assert sorted(d.label for d in demos) == sorted(list(range(5)) * k), (seed, k)
            assert all(d in bbc.train for d in demos)
    first, second = (protocol.start_run(seed, None).demonstrations(0, 4) for seed in (0, 1))
    assert first != second and first == protocol.start_run(0, None).demonstrations(0, 4)


def _tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def test_a_tie_between_labels_counts_one_over_n_not_for_the_first_label():
    from curlora.continual.protocols import credit

    scores = torch.tensor([[-1.0, -1.0, -3.0],   # labels 0 and 1 tie: half a point for either
                           [-2.0, -1.0, -1.0],   # 1 and 2 tie, gold 0: nothing
                           [-0.5, -0.5, -0.5],   # all tie: a third
                           [-3.0, -2.0, -1.0]])  # no tie: gold 2 right
    assert credit(scores, torch.tensor([1, 0, 2, 2])) == pytest.approx(0.5 + 0 + 1 / 3 + 1)
    assert credit(scores, torch.tensor([0, 1, 0, 0])) == pytest.approx(0.5 + 0.5 + 1 / 3 + 0)


def test_answers_scored_under_bf16_autocast_use_a_float32_lm_head(smollm2):
    from curlora.continual.training import autocast
    from curlora.data import PromptCollator, load_task

    model, tokenizer = smollm2
    bbc = load_task("bbc_news", "offline", None, seed=0, max_train=8, max_eval=16)
    collator = PromptCollator(tokenizer, 32, chat_template=False)  # one-token answers: one forward pass
    answers = collator.answers(bbc.prompt)
    batch = collator.prompt_batch(list(bbc.eval), bbc.prompt)
    fp32 = answer_log_probs(model, batch["input_ids"], batch["attention_mask"], answers)
    with autocast(torch.device("cpu"), True):
        bf16 = answer_log_probs(model, batch["input_ids"], batch["attention_mask"], answers)
    assert "forward" not in vars(model.get_output_embeddings())  # the head is itself again
    hidden = torch.randn(2, model.config.hidden_size)
    with autocast(torch.device("cpu"), True):
        assert model.get_output_embeddings()(hidden).dtype == torch.bfloat16
        with forward.float32_lm_head(model):
            assert model.get_output_embeddings()(hidden).dtype == torch.float32

    def ties(scores):
        top2 = scores.topk(2, -1).values
        return int((top2[:, 0] == top2[:, 1]).sum())

    # bf16 logits tied the top two labels on about one row in ten (one in 64 of these); float32 head
    # rows tie on none, and stay within the backbone's bf16 rounding of the float32 scores.
    assert ties(fp32) == 0 and ties(bf16) == 0
    assert (bf16 - fp32).abs().max() < 0.5
    assert bf16.dtype == torch.float32


def test_a_greedy_answer_is_valid_only_as_it_is_scored(tiny_model_dir, data_dir, monkeypatch):
    from curlora.continual.protocols import GenerativeProtocol
    from curlora.data import Example, Prompt

    config = generative_config(tiny_model_dir, data_dir, chat_template=True)
    tokenizer = _tokenizer(tiny_model_dir)
    task_prompt = Prompt("Review: {text}\nAnswer:", ("negative", "positive"))
    from curlora.data import TaskSplits

    task = TaskSplits("reviews", ["negative", "positive"], [Example("fine", 1)] * 4, [Example("fine", 1)] * 4,
                      prompt=task_prompt)
    protocol = GenerativeProtocol([task], tokenizer, config, torch.device("cpu"), False)
    end = protocol.collator.end_ids
    generated = [tokenizer("Positive", add_special_tokens=False).input_ids + end,  # as scored: valid
                 tokenizer("positive", add_special_tokens=False).input_ids + end,  # another case: not an answer
                 tokenizer(" Positive", add_special_tokens=False).input_ids + end,  # a stray space: not one
                 tokenizer("Negative", add_special_tokens=False).input_ids + end]

    def answering(model, input_ids, attention_mask, steps, stop_id):  # greedy decoding, as if the model wrote these
        assert stop_id == end[0]
        width = max(map(len, generated))
        return torch.tensor([row + end * (width - len(row)) for row in generated[: len(input_ids)]])

    from curlora.continual import protocols
    monkeypatch.setattr(protocols, "greedy_tokens", answering)
    run = protocol.start_run(0, None)
    assert run._valid_answers(torch.nn.Module(), task.eval, task_prompt, ()) == 2


def test_a_label_word_holding_a_special_token_is_refused_before_training(tiny_model_dir, data_dir):
    from curlora.continual.protocols import GenerativeProtocol
    from curlora.data import DataError, Example, Prompt, TaskSplits

    prompt = Prompt("Review: {text}\nAnswer:", ("bad<|im_end|>", "good"))
    task = TaskSplits("reviews", ["negative", "positive"], [Example("fine", 1)] * 2, [Example("fine", 1)] * 2,
                      prompt=prompt)
    with pytest.raises(DataError, match=r"task 'reviews': label word 'bad<\|im_end\|>' holds .*'<\|im_end\|>'"):
        GenerativeProtocol([task], _tokenizer(tiny_model_dir), generative_config(tiny_model_dir, data_dir),
                           torch.device("cpu"), False)


def test_a_calibrated_floor_divides_out_the_answers_prior_on_a_text_that_says_nothing(tmp_path, tiny_model_dir,
                                                                                      data_dir):
    from curlora.continual.protocols import CONTENT_FREE
    from curlora.data import Example

    runner, runs, base, collator = _run_beside_the_base(tmp_path, tiny_model_dir, data_dir,
                                                        ["zero-shot", "zero-shot-calibrated", "k-shot-calibrated"])
    task = runner.prepared.data.tasks[0]
    answers = collator.answers(task.prompt)
    pair = task.train[0].text_pair is not None
    empty = collator.prompt_batch([Example(t, 0, text_pair=t if pair else None) for t in CONTENT_FREE], task.prompt)
    prior = torch.logsumexp(answer_log_probs(base, empty["input_ids"], empty["attention_mask"], answers), 0) - math.log(2)
    correct = 0
    for example in task.eval:  # by hand: each row's scores less the prior, its argmax
        batch = collator.prompt_batch([example], task.prompt)
        scores = answer_log_probs(base, batch["input_ids"], batch["attention_mask"], answers)[0] - prior
        correct += int(scores.argmax()) == example.label
    assert runs["zero-shot-calibrated"]["accuracy_matrix"][1][0] == pytest.approx(correct / len(task.eval))
    assert runs["zero-shot-calibrated"]["frozen_backbone"] and runs["k-shot-calibrated"]["status"] == "ok"
    # The untouched model's predictions move once its prior is divided out.
    assert runs["zero-shot-calibrated"]["predicted_labels"] != runs["zero-shot"]["predicted_labels"]
