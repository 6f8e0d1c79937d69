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
