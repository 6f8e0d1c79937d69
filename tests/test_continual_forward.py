"""A batch's shared prefix run once: the plain batch's logits and gradients, on every architecture (its
answer scores: tests/test_continual_generative.py)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_llama
from test_architectures import ARCHITECTURES, tiny

from curlora.continual import forward

SHARED = list(range(10, 22))  # 12 tokens every row starts with (at least SHARE_PREFIX_FROM)


def _left_padded(rows, pad=0):
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def _rows(rest_lengths, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [SHARED + torch.randint(22, 128, (n,), generator=generator).tolist() for n in rest_lengths]


def _prefix_runs(monkeypatch, model):
    """Record the row count each shared-prefix cache is made for (1: the rest ran packed), after
    ``model``'s probe (which makes caches of its own) has run."""
    assert forward.shares_prefix_exactly(model)
    windowed = getattr(model.config, "sliding_window", None) is not None
    assert forward.shares_prefix_past_window_exactly(model) == windowed  # (a probe of its own, where it applies)
    calls, original = [], forward._prefix_cache
    monkeypatch.setattr(forward, "_prefix_cache", lambda lm, prefix, rows: calls.append(rows) or original(lm, prefix, rows))
    return calls


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
@pytest.mark.parametrize("rest, packed", [((3, 3, 3, 2), False), ((9, 1, 2, 1), True)], ids=["dense", "mostly-padding"])
def test_a_shared_prefix_gives_the_plain_answer_logits_on_every_architecture(model_type, rest, packed, monkeypatch):
    model = tiny(model_type)
    rows = _rows(rest)
    ids, mask = _left_padded(rows)
    wanted = torch.zeros_like(mask, dtype=torch.bool)
    wanted[:, -2:] = True  # each row's last two tokens (all real: every row is longer than the prefix)
    runs = _prefix_runs(monkeypatch, model)
    got = forward.lm_logits(model, ids, mask, wanted)
    # The prefix ran once, the rest padded or packed; but rows longer than a sliding attention window
    # (Gemma's 16 tokens here) run plain, where transformers' own masks apply the window.
    window = getattr(model.config, "sliding_window", None) or 10**9
    assert runs == ([] if len(rows[0]) > window else [1 if packed else len(rows)])
    with torch.no_grad():
        expected = torch.cat([model(torch.tensor([r])).logits[0, -2:] for r in rows])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_the_prefix_stops_before_the_first_wanted_position_and_keeps_a_token_of_each_row(monkeypatch):
    model = tiny_llama()
    row = _rows([4])[0]
    ids, mask = _left_padded([row, row, row])  # identical rows share everything
    wanted = torch.zeros_like(mask, dtype=torch.bool)
    wanted[:, 13:] = True  # from the second token after SHARED on
    assert forward._shareable_prefix(model, ids, mask, torch.tensor([13, 13, 13])) == 13
    got = forward.lm_logits(model, ids, mask, wanted)
    with torch.no_grad():
        expected = model(torch.tensor([row])).logits[0, 13:].repeat(3, 1)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # scoring: each prompt's last token is its own
        assert forward._shareable_prefix(model, ids, mask, mask.sum(-1) - 1) == len(row) - 1


def test_no_prefix_is_shared_under_dropout_or_when_too_short():
    model = tiny_llama()
    ids, mask = _left_padded(_rows((3, 5)))
    limit = mask.sum(-1) - 1
    assert forward._shareable_prefix(model, ids, mask, limit) == len(SHARED)
    model.config.attention_dropout = 0.1
    assert forward._shareable_prefix(model.train(), ids, mask, limit) == 0  # one dropout draw for every row
    assert forward._shareable_prefix(model.eval(), ids, mask, limit) == len(SHARED)
    short = [SHARED[: forward.SHARE_PREFIX_FROM - 1] + [30, 31], SHARED[: forward.SHARE_PREFIX_FROM - 1] + [40]]
    assert forward._shareable_prefix(model, *_left_padded(short), torch.tensor([8, 7])) == 0
    ragged = _left_padded(_rows((3, 5)))[0].flip(1), _left_padded(_rows((3, 5)))[1].flip(1)  # right padded
    assert forward._shareable_prefix(model, *ragged, limit) == 0


def test_the_prefix_probe_leaves_every_module_in_its_mode():
    model = tiny("llama").train()
    model.model.layers[0].eval()
    modes = {name: m.training for name, m in model.named_modules()}
    assert forward.shares_prefix_exactly(model)
    assert {name: m.training for name, m in model.named_modules()} == modes


@pytest.mark.smollm2
def test_shared_prefix_training_steps_match_plain_ones_on_smollm2(smollm2, data_dir, monkeypatch):
    """The real model and tokenizer, CURLoRA on q/k/v, a shuffled batch of real reviews as chat
    prompts: the instruction runs once, and the answer loss and every U's gradient are the plain
    batch's."""
    from curlora import CURLoRAConfig, get_curlora_model
    from curlora.data import PromptCollator, load_task
    from curlora.data.prompts import PROMPTS

    base, tokenizer = smollm2
    model = get_curlora_model(copy.deepcopy(base), CURLoRAConfig(r=4, seed=0)).train()
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.02)
    task = load_task("rotten_tomatoes", "offline", data_dir, seed=0, max_train=8, max_eval=1)
    batch = PromptCollator(tokenizer, 64).training_batch([(e, PROMPTS["rotten_tomatoes"]) for e in task.train])
    targets = batch["targets"]
    wanted = torch.zeros_like(targets, dtype=torch.bool)
    wanted[:, :-1] = targets[:, 1:] != -100
    # What runs once: the system turn, the user turn's start and the task's instruction.
    start = int(batch["attention_mask"][0].argmax())
    prefix = forward._shareable_prefix(model, batch["input_ids"], batch["attention_mask"], torch.full((8,), 40))
    shared_text = tokenizer.decode(batch["input_ids"][0, start: start + prefix])
    assert shared_text.endswith("<|im_start|>user\nIs the sentiment of this review negative or positive?\nReview:")
    results = []
    for share_from in (forward.SHARE_PREFIX_FROM, 10**9):
        monkeypatch.setattr(forward, "SHARE_PREFIX_FROM", share_from)
        runs = _prefix_runs(monkeypatch, model)
        model.zero_grad()
        logits = forward.lm_logits(model, batch["input_ids"], batch["attention_mask"], wanted)
        loss = F.cross_entropy(logits.float(), targets[:, 1:][wanted[:, :-1]], reduction="sum")
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad], runs))
    (shared_loss, shared_grads, shared_runs), (plain_loss, plain_grads, plain_runs) = results
    assert shared_runs and not plain_runs
    torch.testing.assert_close(shared_loss, plain_loss, atol=1e-3, rtol=1e-4)
    for got, want in zip(shared_grads, plain_grads):
        torch.testing.assert_close(got, want, atol=1e-3 * want.abs().max().item(), rtol=1e-3)


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_greedy_tokens_after_a_shared_prefix_are_what_generate_writes_for_each_prompt_alone(model_type, monkeypatch):
    model = tiny(model_type).eval()
    rows = _rows((3, 1, 4, 2), seed=1)
    ids, mask = _left_padded(rows)
    runs = _prefix_runs(monkeypatch, model)
    got = forward.greedy_tokens(model, ids, mask, steps=5, stop_id=-1)  # a stop id never written: all 5 steps
    window = getattr(model.config, "sliding_window", None) or 10**9
    # The prefix ran once for all four rows; where a row would outgrow a sliding window (Gemma's 16
    # tokens), once for each row to continue from alone
    assert runs == ([1] if len(rows[2]) + 4 > window else [len(rows)])
    for row, tokens in zip(rows, got.tolist()):
        alone = model.generate(torch.tensor([row]), max_new_tokens=5, do_sample=False, min_new_tokens=5,
                               pad_token_id=0, eos_token_id=None)
        assert tokens == alone[0, len(row):].tolist()


def test_greedy_tokens_end_once_every_row_has_written_the_stop_token():
    model = tiny_llama().eval()
    ids, mask = _left_padded(_rows((2, 3), seed=2))
    first = forward.greedy_tokens(model, ids, mask, steps=6, stop_id=-1)
    stop = int(first[0, 1])  # row 0 writes it at its second step, row 1 wherever it does (or never)
    got = forward.greedy_tokens(model, ids, mask, steps=6, stop_id=stop)
    written_by_both = max(min([*(i for i, t in enumerate(r) if t == stop), 5]) for r in first.tolist())
    assert got.shape == (2, written_by_both + 1)
    assert torch.equal(got, first[:, : written_by_both + 1])
