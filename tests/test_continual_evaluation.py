"""Perplexity scores each token once, from logits kept only where tokens are scored."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import tiny_gpt2, tiny_llama

from curlora.continual import evaluation
from curlora.continual.evaluation import _batches, _windows, perplexity


def _by_hand(model: nn.Module, ids: torch.Tensor, window: int, stride: int) -> float:
    """Every window's full logits, one window at a time, the context positions masked by hand."""
    total, count = 0.0, 0
    with torch.no_grad():
        for begin, end, new in _windows(ids.numel(), window, stride):
            chunk = ids[begin:end][None]
            logits = model(input_ids=chunk).logits[0, :-1]
            targets = chunk[0, 1:]
            first = chunk.shape[1] - new  # predictions of positions first.. are new tokens
            nll = F.cross_entropy(logits[max(first - 1, 0):], targets[max(first - 1, 0):], reduction="sum")
            total, count = total + float(nll), count + targets[max(first - 1, 0):].numel()
    return math.exp(total / count)


class _NoLogitsToKeep(nn.Module):
    """A causal LM whose forward takes input_ids only (no logits_to_keep): the full-logits path."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids):
        return self.lm(input_ids=input_ids)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2, lambda: _NoLogitsToKeep(tiny_llama())])
def test_perplexity_with_kept_logits_equals_every_window_by_hand(make):
    model = make()
    ids = torch.randint(0, 128, (150,), generator=torch.Generator().manual_seed(0))
    # 150 tokens, window 64, stride 24: a first window scoring all, full windows, a short last one.
    result = perplexity(model, ids, window=64, stride=24, batch_size=3)
    assert result.tokens_scored == ids.numel() - 1
    assert result.perplexity == pytest.approx(_by_hand(model, ids, 64, 24), rel=1e-6)


def test_windows_share_a_forward_pass_only_while_their_logits_fit_the_budget():
    """WikiText-2's first 8,192 tokens in windows of 1,024: SmolLM2's 49k vocabulary keeps four
    windows per pass (as before the budget); Gemma-3's 262k gets one, not 11 GB of logits."""
    spans = _windows(8192, 1024, 512)
    assert [len(b) for b in _batches(spans, 4, 49_152)] == [4, 4, 4, 3]
    assert [len(b) for b in _batches(spans, 4, 262_144)] == [1] * len(spans)
    assert [s for b in _batches(spans, 4, 262_144) for s in b] == spans
    assert [len(b) for b in _batches(spans, 4, 0)] == [4, 4, 4, 3]  # no LM head found: batch_size alone


def test_a_budget_of_one_window_per_pass_scores_the_same(monkeypatch):
    model = tiny_llama()
    ids = torch.randint(0, 128, (150,), generator=torch.Generator().manual_seed(0))
    batched = perplexity(model, ids, window=64, stride=24, batch_size=3)
    monkeypatch.setattr(evaluation, "LOGITS_BUDGET", 1)  # every window alone
    alone = perplexity(model, ids, window=64, stride=24, batch_size=3)
    assert alone.tokens_scored == batched.tokens_scored
    assert alone.perplexity == pytest.approx(batched.perplexity, rel=1e-6)


def _per_token_reference(model: nn.Module, ids: torch.Tensor, window: int, stride: int) -> tuple[float, int]:
    """The specification written out token by token, without the module's window helpers: windows start
    at 0, stride, 2·stride, … and end at min(start + window, n); token t is scored once, in the first
    window that holds it and a token before it, from that window's tokens before it as its context (with
    stride = window, a window's first token has none there and is not scored, as in the HF guide)."""
    n = ids.numel()
    context_start = {}
    start = 0
    while True:
        end = min(start + window, n)
        for t in range(start + 1, end):
            context_start.setdefault(t, start)
        if end == n:
            break
        start += stride
    total = 0.0
    with torch.no_grad():
        for t in sorted(context_start):
            begin = context_start[t]
            logits = model(input_ids=ids[begin:t][None]).logits[0, -1].double()
            total -= float(torch.log_softmax(logits, dim=-1)[ids[t]])
    return total / len(context_start), len(context_start)


@pytest.mark.parametrize("window, stride", [(40, 16), (32, 32), (48, 7)])
def test_perplexity_over_several_windows_equals_per_token_log_probs_by_hand(window, stride):
    """Several windows, carried context, a short last window: every token's log-prob with the context the
    method specifies (a wrong context, a token scored twice or skipped all change the number)."""
    model = tiny_llama()
    ids = torch.randint(0, 128, (100,), generator=torch.Generator().manual_seed(1))
    nll, count = _per_token_reference(model, ids, window, stride)
    assert count == (ids.numel() - 1 if stride < window else ids.numel() - math.ceil(ids.numel() / stride))
    result = perplexity(model, ids, window=window, stride=stride, batch_size=2)
    assert result.tokens_scored == count
    assert result.nll == pytest.approx(nll, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(nll), rel=1e-5)
    # The context matters on this model: scoring every token from the start of its own window of
    # `stride` tokens (no carried context) gives a clearly different number.
    if stride < window:
        without_context = perplexity(model, ids, window=stride, stride=stride, batch_size=2)
        assert abs(without_context.nll - nll) > 1e-3
