"""Evaluation: language-model perplexity with a strided sliding window.

The reference code scored one truncated forward pass; here the whole token stream (or its first
``max_tokens``) is scored, each token once, with up to ``window - stride`` tokens of context
carried over between windows (the Hugging Face perplexity guide's method).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


@dataclass(frozen=True)
class Perplexity:
    perplexity: float
    nll: float  # mean negative log-likelihood per scored token
    tokens_scored: int
    window: int
    stride: int


def _windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, number of new tokens to score) for each window; every token scored once."""
    spans, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + window, n_tokens)
        spans.append((begin, end, end - prev_end))
        prev_end = end
        if end == n_tokens:
            break
    return spans


# Bytes of float32 logits one forward pass may hold: 4 windows of 1,024 tokens for SmolLM2's 49k
# vocabulary, one for Gemma-3's 262k (4 of those, with the copies that logit soft-capping and the
# cross-entropy make, peaked at 11 GB per process and ran 3.6x slower per window).
LOGITS_BUDGET = 512 * 2**20


def _kept(span: tuple[int, int, int]) -> int:
    """Positions whose logits a window needs: its new tokens and the one before them."""
    begin, end, new = span
    return min(end - begin, new + 1)


def _batches(spans: list[tuple[int, int, int]], batch_size: int, vocab: int) -> list[list[tuple[int, int, int]]]:
    """Consecutive windows per forward pass: at most ``batch_size``, and beyond the first only while
    the logits they keep fit in :data:`LOGITS_BUDGET`."""
    batches: list[list[tuple[int, int, int]]] = []
    size = 0
    for span in spans:
        need = _kept(span) * vocab * 4
        if not batches or len(batches[-1]) == batch_size or size + need > LOGITS_BUDGET:
            batches.append([])
            size = 0
        batches[-1].append(span)
        size += need
    return batches


@torch.no_grad()
def perplexity(
    model: nn.Module,
    token_ids: torch.Tensor,
    window: int = 512,
    stride: int = 256,
    batch_size: int = 4,
    progress: bool = False,
) -> Perplexity:
    """Perplexity of ``model`` on a 1-D stream of token ids."""
    if not 0 < stride <= window:
        raise ValueError(f"Perplexity needs 0 < stride ≤ window, got stride={stride}, window={window}.")
    ids = token_ids.reshape(-1)
    if ids.numel() < 2:
        raise ValueError("Perplexity needs at least two tokens.")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    spans = _windows(ids.numel(), window, stride)
    keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
    total_nll, scored = 0.0, 0
    batches = _batches(spans, batch_size, _vocab_size(model))
    for batch in tqdm(batches, desc="perplexity", disable=not progress, leave=False):
        # Windows of one batch share a length except possibly the last one: group by length.
        for length in sorted({end - begin for begin, end, _ in batch}):
            group = [s for s in batch if s[1] - s[0] == length]
            inputs = torch.stack([ids[b:e] for b, e, _ in group]).to(device)
            # Logits only where a token is scored (the last `new` positions predict them): the LM head
            # is a large share of a forward pass (most of it for Gemma's 262k vocabulary).
            keep = max(_kept(s) for s in group)
            kwargs = {"logits_to_keep": keep} if keeps_logits else {}
            logits = model(input_ids=inputs, **kwargs).logits.float()[:, -keep:]
            labels = inputs[:, length - keep:].clone()
            for row, (_, _, new) in enumerate(group):
                labels[row, : keep - new] = -100  # context only, already scored
            nll = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                ignore_index=-100, reduction="sum",
            )
            total_nll += float(nll)
            scored += int((labels[:, 1:] != -100).sum())
    model.train(was_training)
    mean = total_nll / scored
    return Perplexity(math.exp(mean), mean, scored, window, stride)


def _vocab_size(model: nn.Module) -> int:
    """Rows of the LM head (0 if it cannot be found: then only ``batch_size`` bounds a batch)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if get is not None else None
    return int(head.weight.shape[0]) if head is not None else 0
