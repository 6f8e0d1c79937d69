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
import re
from collections.abc import Sequence
from typing import Any

import torch

from .prompts import Prompt
from .splits import DataError, Example

__all__ = ["ClassificationCollator", "PromptCollator", "last_token_index", "prepare_tokenizer"]


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


# A text is cut to this many characters per token of max_length before it is tokenized: tokenizing a
# whole text first cost about 175 MB of memory per MB of text. No token is this long (SmolLM2's longest
# is 81 characters), so the cut never changes which tokens remain.
MAX_CHARS_PER_TOKEN = 100


def clip(text: str | None, max_length: int) -> str | None:
    """``text`` cut to what ``max_length`` tokens can hold (None stays None)."""
    return None if text is None else text[: max_length * MAX_CHARS_PER_TOKEN]


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
        pairs = [clip(e.text_pair, self.max_length) for e in examples]
        return self.tokenizer(
            [clip(e.text, self.max_length) for e in examples],
            pairs if all(p is not None for p in pairs) else None,
            padding=True,
            truncation=True,
            max_length=self.max_length,
            split_special_tokens=True,  # "<|im_end|>" in a text is text, never the special token
            return_tensors="pt",
        )


# Stand-ins for an example's texts while a prompt is rendered (private-use characters no tokenizer
# merges across), so the texts can be tokenized and truncated apart from the template around them.
_SLOT = re.compile("\ue000(\\d+)\ue001")


# A private-use character no vocabulary holds or merges: what a prompt piece is tokenized after to
# tokenize it as a continuation (PromptCollator._continuation).
_SENTINEL = "\ue002"


def _slot(index: int) -> str:
    return f"\ue000{index}\ue001"


# The system turn of chat prompts: what every task asks for, in few tokens.
SYSTEM = "Answer with one word."


class PromptCollator:
    """Prompt → answer batches for a causal LM (the generative protocol), left padded.

    A prompt is the task's template filled with the example (and, for k-shot, the filled templates
    of k demonstrations each followed by its answer). With ``chat_template`` (default: when the
    tokenizer has one, e.g. SmolLM2-Instruct's ChatML) each template is a user turn and each answer
    an assistant turn, after a short system turn, the prompt ending with the template's generation cue; without it, the filled
    templates are joined by blank lines and an answer follows its cue after one space.

    ``max_length`` bounds an example's own text tokens (a pair's longer text is cut first), as in
    :class:`ClassificationCollator`, so both protocols read the same words; the template comes on top.
    An answer is the label word's tokens and then one end-of-answer token (the tokenizer's eos, or
    the chat template's end of turn): training predicts both, so generation stops after the word;
    scoring sums the word's tokens only.
    """

    def __init__(self, tokenizer: Any, max_length: int = 128, chat_template: bool | None = None) -> None:
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self.tokenizer = prepare_tokenizer(tokenizer)
        self.max_length = max_length
        has_template = getattr(self.tokenizer, "chat_template", None) is not None
        if chat_template and not has_template:
            raise DataError("chat_template is on, but the tokenizer has no chat template; set it off (or leave it unset)")
        self.chat = has_template if chat_template is None else bool(chat_template)
        bos = self.tokenizer.bos_token_id
        self._bos = [bos] if not self.chat and bos is not None and self._ids("a", special=True)[:1] == [bos] else []
        self._sentinel = self._ids(_SENTINEL)
        self.end_ids = self._end_of_answer()
        self._cache: dict[tuple, list[int]] = {}

    def _ids(self, text: str, special: bool = False, data: bool = False) -> list[int]:
        """``text``'s token ids; ``data`` (an example's text, an answer word): a special token's string in
        it (``<|im_end|>``) is tokenized as text, never as the special token."""
        return self.tokenizer(text, add_special_tokens=special, split_special_tokens=data).input_ids

    def _end_of_answer(self) -> list[int]:
        if not self.chat:
            if self.tokenizer.eos_token_id is None:
                raise DataError("the tokenizer has no eos token to end an answer with")
            return [self.tokenizer.eos_token_id]
        turn = [{"role": "user", "content": "x"}]
        cue = self._chat(turn)
        full = self._chat(turn + [{"role": "assistant", "content": "y"}], cue=False)
        if not full.startswith(cue + "y") or not full[len(cue) + 1:].strip():
            raise DataError("the chat template does not close an assistant turn after its answer; set chat_template off")
        return self._ids(full[len(cue) + 1:])[:1]

    def _chat(self, turns: list[dict[str, str]], cue: bool = True) -> str:
        """``turns`` through the chat template after a one-line system turn (:data:`SYSTEM`), which
        replaces a template's default system turn (SmolLM2's is 20 tokens of identity on every
        example); a template that takes no system turn gets none."""
        from jinja2.exceptions import TemplateError  # transformers' chat templates are jinja2

        try:
            return self.tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM}, *turns],
                                                      tokenize=False, add_generation_prompt=cue)
        except TemplateError:  # e.g. "System role not supported"
            return self.tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=cue)

    def answer_text(self, word: str) -> str:
        """How an answer word is written after the answer cue: after one space in plain prompts (as a
        word stands in running text); capitalised at the start of the assistant's turn in chat prompts,
        as a chat model answers ("Sports", where "s|ports" is a form it never writes)."""
        return word[:1].upper() + word[1:] if self.chat else " " + word

    def answers(self, prompt: Prompt) -> list[list[int]]:
        """Each label's answer tokens where they follow the prompt (without the end-of-answer token); a
        special token's string in a word is tokenized as text."""
        return [self._continuation(self.answer_text(word), data=True) for word in prompt.label_words]

    def odd_answers(self, prompt: Prompt) -> dict[str, list[str]]:
        """The answer words scored as more tokens than the same word takes in running text (after a
        space), with the pieces they are scored as: an answer the model must spell out piece by piece
        gets a lower summed log-probability (``acc_norm`` divides that out)."""
        odd = {}
        for word, ids in zip(prompt.label_words, self.answers(prompt)):
            running = self._continuation(" " + self.answer_text(word).strip(), data=True)
            if len(ids) > len(running):
                odd[word] = self.tokenizer.convert_ids_to_tokens(ids)
        return odd

    def _continuation(self, text: str, data: bool = False) -> list[int]:
        """``text``'s tokens where it continues a prompt rather than starts one. A tokenizer that adds a
        dummy prefix (SentencePiece's "▁" in Llama-2 / Mistral / Metaspace tokenizers) would put a
        space token at every seam of a prompt tokenized in pieces: the text is tokenized after a
        sentinel that merges with nothing, and the sentinel's own tokens are dropped. ``data`` as in
        :meth:`_ids` (the sentinel is no special token: it tokenizes the same either way)."""
        ids = self._ids(_SENTINEL + text, data=data)
        if ids[: len(self._sentinel)] == self._sentinel:
            return ids[len(self._sentinel):]
        return self._ids(text, data=data)  # the sentinel merged with the text: this tokenizer has no dummy prefix

    def _render(self, examples: Sequence[Example], prompt: Prompt) -> str:
        """The prompt for the last example, the others as answered demonstrations; texts as slots."""
        users = [prompt.template.format(text=_slot(2 * i), text_pair=_slot(2 * i + 1)) for i in range(len(examples))]
        answers = [self.answer_text(prompt.label_words[e.label]) for e in examples[:-1]]
        if self.chat:
            turns = []
            for user, answer in zip(users, answers):
                turns += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
            turns.append({"role": "user", "content": users[-1]})
            return self._chat(turns)
        return "".join(f"{user}{answer}\n\n" for user, answer in zip(users, answers)) + users[-1]

    def prompt_ids(self, example: Example, prompt: Prompt, demos: Sequence[Example] = ()) -> list[int]:
        """Token ids of ``example``'s prompt (after ``demos`` as answered examples)."""
        key = (example, prompt, tuple(demos))
        if key not in self._cache:
            owners = [*demos, example]
            pieces = _SLOT.split(self._render(owners, prompt))  # literal, slot, literal, ..., literal
            # Each text's tokens as it stands in the prompt (a space before a slot goes with the text:
            # " word" is the natural token), then each example's texts cut to max_length, longest first.
            texts: dict[int, list[int]] = {}
            for k in range(1, len(pieces), 2):
                slot, lead = int(pieces[k]), " " if pieces[k - 1].endswith(" ") else ""
                text = (owners[slot // 2].text, owners[slot // 2].text_pair)[slot % 2] or ""
                text = lead + clip(text, self.max_length)
                texts[slot] = self._continuation(text, data=True) if k > 1 or pieces[0] else self._ids(text, data=True)
            for i in range(len(owners)):
                parts = [texts[slot] for slot in (2 * i, 2 * i + 1) if slot in texts]
                while sum(map(len, parts)) > self.max_length:
                    max(parts, key=len).pop()
            ids = list(self._bos)
            for k, piece in enumerate(pieces):
                if k % 2:
                    ids += texts[int(piece)]
                    continue
                literal = piece[:-1] if k + 1 < len(pieces) and piece.endswith(" ") else piece
                ids += (self._continuation(literal) if k else self._ids(literal)) if literal else []
            self._cache[key] = ids
        return self._cache[key]

    def training_batch(self, items: Sequence[tuple[Example, Prompt]]) -> dict[str, torch.Tensor]:
        """``input_ids``, ``attention_mask`` and ``targets``: the answer and end-of-answer tokens where
        they stand, -100 elsewhere (prompt tokens carry no loss)."""
        if not items:
            raise DataError("cannot collate an empty batch")
        rows, targets = [], []
        for example, prompt in items:
            prompt_part = self.prompt_ids(example, prompt)
            answer = self.answers(prompt)[example.label] + self.end_ids
            rows.append(prompt_part + answer)
            targets.append([-100] * len(prompt_part) + answer)
        batch = self._left_pad(rows)
        batch["targets"] = self._left_pad(targets, pad=-100)["input_ids"]
        return batch

    def prompt_batch(self, examples: Sequence[Example], prompt: Prompt,
                     demos: Sequence[Example] = ()) -> dict[str, torch.Tensor]:
        """Left-padded prompts (``input_ids``, ``attention_mask``) and the gold ``labels``."""
        if not examples:
            raise DataError("cannot collate an empty batch")
        batch = self._left_pad([self.prompt_ids(e, prompt, demos) for e in examples])
        batch["labels"] = torch.tensor([e.label for e in examples], dtype=torch.long)
        return batch

    def _left_pad(self, rows: Sequence[list[int]], pad: int | None = None) -> dict[str, torch.Tensor]:
        width = max(map(len, rows))
        fill = self.tokenizer.pad_token_id if pad is None else pad
        ids = torch.full((len(rows), width), fill, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row):] = 1
        return {"input_ids": ids, "attention_mask": mask}


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
