"""Batching for sequence classification with a causal LM.

The classifier reads the hidden state of each sequence's LAST real token, so batches
are LEFT-padded: the last real token then sits at position -1 for every row, and with
rotary position embeddings (relative positions) a left-padded row gives the same
hidden states as the unpadded sequence. ``last_token_index`` works for either padding
side anyway, so code that receives right-padded batches stays correct.

Sentence pairs are tokenized as ``tokenizer(text, text_pair, ...)``, exactly the
paper's call. Tokenizers without a pair template (SmolLM2/Llama-style ones among
them) simply concatenate the two token sequences with no separator; that is what the
paper's setup did, and it is kept for fidelity.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch

from .splits import DataError, Example

__all__ = ["ClassificationCollator", "last_token_index", "prepare_tokenizer"]


def prepare_tokenizer(tokenizer: Any) -> Any:
    """A copy of ``tokenizer`` with left padding and a pad token (eos if it had none).

    A copy, so the caller's tokenizer (maybe shared with generation code) is unchanged.
    """
    tok = copy.deepcopy(tokenizer)
    tok.padding_side = "left"
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise DataError("tokenizer has neither a pad token nor an eos token to pad with")
        tok.pad_token = tok.eos_token
    return tok


class ClassificationCollator:
    """Turns a list of :class:`Example` into ``input_ids``, ``attention_mask`` (left
    padded) and ``labels`` tensors; texts longer than ``max_length`` are truncated
    (for pairs, the longer of the two first)."""

    def __init__(self, tokenizer: Any, max_length: int = 128) -> None:
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self.tokenizer = prepare_tokenizer(tokenizer)
        self.max_length = max_length

    def __call__(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        if not examples:
            raise DataError("cannot collate an empty batch")
        has_pair = [e.text_pair is not None for e in examples]
        if any(has_pair) and not all(has_pair):
            # A replayed sentence-pair task beside a single-sentence one: encode each kind as
            # usual, then left-pad both to one width and restore the batch order.
            parts = [[i for i, p in enumerate(has_pair) if p is kind] for kind in (False, True)]
            encoded = [self._encode([examples[i] for i in part]) for part in parts]
            width = max(e["input_ids"].shape[1] for e in encoded)
            ids = torch.full((len(examples), width), self.tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros(len(examples), width, dtype=torch.long)
            for part, enc in zip(parts, encoded):
                n = enc["input_ids"].shape[1]
                ids[part, width - n:], mask[part, width - n:] = enc["input_ids"], enc["attention_mask"]
            enc = {"input_ids": ids, "attention_mask": mask}
        else:
            enc = self._encode(examples)
        return {
            "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"],
            "labels": torch.tensor([e.label for e in examples], dtype=torch.long),
        }

    def _encode(self, examples: Sequence[Example]):
        pairs = [e.text_pair for e in examples]
        return self.tokenizer(
            [e.text for e in examples],
            pairs if all(p is not None for p in pairs) else None,
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real (mask = 1) token, for left or right padding.

    Use as ``hidden[torch.arange(B), last_token_index(mask)]``.
    """
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be (batch, seq), got shape {tuple(attention_mask.shape)}")
    mask = attention_mask.bool()
    if not bool(mask.any(dim=1).all()):
        raise ValueError("attention_mask has a row with no real tokens")
    seq = mask.shape[1]
    # position of the first True in the reversed row = distance of the last True from the end
    from_end = mask.flip(1).to(torch.int8).argmax(dim=1)
    return (seq - 1 - from_end).long()
