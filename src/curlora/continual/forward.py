"""How the benchmark runs a (possibly adapted) causal LM: last-token states for the heads protocol,
answer logits and answer scores for the generative one, each in as few token-steps as give the
same numbers.

Position ids follow the attention mask, so left padding gives the same states as the unpadded
sequence for absolute-position models (GPT-2) too. Two savings, each used only where a probe on
the model shows it computes what the plain padded batch computes (up to float rounding):

- packing: a mostly-padding batch runs as one row of its real tokens, each text attending only to
  itself (shuffled training batches of short texts are half padding);
- a shared prefix: the tokens every row of a prompt batch starts with (a chat template's system
  turn, the task's instruction, k-shot demonstrations) run once, and every row continues from
  their key/value cache; in training, their gradients sum back through that one run. Prompts that
  outgrow a sliding attention window (k-shot prompts on Gemma) are scored and decoded each alone
  after the prefix, since transformers counts that window in padded columns.
"""

from __future__ import annotations

import copy
import inspect
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from curlora.data import last_token_index

def causal_lm_of(model: nn.Module) -> nn.Module:
    """The transformers causal LM inside a CURLoRA or PEFT wrapper (or the model itself)."""
    get_base = getattr(type(model), "get_base_model", None)
    return model.get_base_model() if get_base is not None else model


def backbone_of(model: nn.Module) -> nn.Module:
    """The transformer body (no LM head) of a causal LM or a wrapper around one."""
    lm = causal_lm_of(model)
    return getattr(lm, lm.base_model_prefix)


# Pack a batch when at most this share of its token slots holds real tokens: above it, the packed
# row's attention (quadratic in the row's length) costs more than the padding it saves.
PACK_BELOW_DENSITY = 0.75
# Share a prefix of at least this many tokens: a shorter one saves less than its own forward costs.
SHARE_PREFIX_FROM = 8
_PACKING_WORKS: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()
_PREFIX_WORKS: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()
_WINDOW_PREFIX_WORKS: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()


# -- last-token states (heads protocol) --------------------------------------------------------
def last_hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The final-layer hidden state at each row's last real token (batch × hidden); a mostly-padding
    batch runs packed (dense ones would pay more for the packed row's attention than they save)."""
    mask = attention_mask.bool()
    lengths = mask.sum(-1)
    if _sparse(lengths, mask.numel()) and packs_exactly(model):
        return _packed_last_hidden(model, input_ids[mask], lengths)
    return _padded_last_hidden(model, input_ids, attention_mask)


def _sparse(lengths: torch.Tensor, slots: int) -> bool:
    return bool(lengths.sum() <= PACK_BELOW_DENSITY * slots)


def _padded_last_hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    position_ids = _positions(attention_mask)
    hidden = backbone_of(model)(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return hidden[rows, last_token_index(attention_mask)]


def _packed_last_hidden(model: nn.Module, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Last-token states of texts given back to back in ``tokens`` (``lengths`` each): one row whose
    position ids restart at every text, which transformers reads as packed sequences (a block-
    diagonal causal mask; no padding, no 2-D mask)."""
    position_ids = _packed_positions(lengths)
    hidden = backbone_of(model)(
        input_ids=tokens.unsqueeze(0), position_ids=position_ids.unsqueeze(0), use_cache=False
    ).last_hidden_state[0]
    return hidden[lengths.cumsum(0) - 1]


def _packed_positions(lengths: torch.Tensor) -> torch.Tensor:
    """Position ids of texts of ``lengths`` put back to back: restarting at 0 for every text."""
    starts = torch.repeat_interleave(lengths.cumsum(0) - lengths, lengths)
    return torch.arange(int(lengths.sum()), device=lengths.device) - starts


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


# -- answer logits and scores (generative protocol) --------------------------------------------
def _keeps_logits(lm: nn.Module) -> bool:
    return "logits_to_keep" in inspect.signature(lm.forward).parameters


def _cache_name(lm: nn.Module) -> str:
    # transformers 5.x renamed past_key_values to cache (the old name warns, then goes in 5.40).
    return "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"


def lm_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              wanted: torch.Tensor) -> torch.Tensor:
    """The LM's next-token logits at the positions ``wanted`` marks in a left-padded batch (a
    batch × length bool mask), row by row (n_wanted × vocab). Only those positions go through the
    LM head, a large share of a forward pass. The rows' shared prefix (up to the first wanted
    position) runs once; the rest, or a batch without one, runs packed when mostly padding."""
    lm = causal_lm_of(model)
    lengths = attention_mask.sum(-1)
    width = input_ids.shape[1]
    first_wanted = torch.where(wanted.any(-1), wanted.int().argmax(-1), width) - (width - lengths)
    prefix = _shareable_prefix(model, input_ids, attention_mask, first_wanted)
    if prefix:
        return _prefix_logits(lm, input_ids, attention_mask, wanted, prefix)
    if _sparse(lengths, attention_mask.numel()) and packs_exactly(model):
        return _packed_logits(lm, input_ids, attention_mask, wanted)
    return _padded_logits(lm, input_ids, attention_mask, wanted)


def _padded_logits(lm: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   wanted: torch.Tensor, **cache: object) -> torch.Tensor:
    """Logits at ``wanted`` of a left-padded batch (after a prefix's ``cache``, whose positions the
    mask and the position ids then include)."""
    past = attention_mask.shape[1] - input_ids.shape[1]
    columns = wanted.any(0).nonzero().squeeze(-1)
    kwargs = {"logits_to_keep": columns} if _keeps_logits(lm) else {}
    logits = lm(input_ids=input_ids, attention_mask=attention_mask,
                position_ids=_positions(attention_mask)[:, past:], use_cache=bool(cache), **cache, **kwargs).logits
    return logits[wanted[:, columns]] if kwargs else logits[wanted]


def _packed_logits(lm: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   wanted: torch.Tensor) -> torch.Tensor:
    mask = attention_mask.bool()
    keep = wanted[mask].nonzero().squeeze(-1)
    kwargs = {"logits_to_keep": keep} if _keeps_logits(lm) else {}
    logits = lm(input_ids=input_ids[mask].unsqueeze(0), position_ids=_packed_positions(mask.sum(-1)).unsqueeze(0),
                use_cache=False, **kwargs).logits[0]
    return logits if kwargs else logits[keep]


def _prefix_logits(lm: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   wanted: torch.Tensor, prefix: int) -> torch.Tensor:
    """:func:`lm_logits` with the first ``prefix`` real tokens of every row (the same in all) run
    once: the rest of the rows follow their cache, padded, or packed when mostly padding."""
    rows = input_ids.shape[0]
    starts = attention_mask.shape[1] - attention_mask.sum(-1)
    shared = input_ids[0, int(starts[0]): int(starts[0]) + prefix]
    ids, mask, wanted = (_drop_prefix(t, starts, prefix) for t in (input_ids, attention_mask, wanted))
    lengths = mask.sum(-1)
    if not _sparse(lengths, mask.numel()):
        cache = _prefix_cache(lm, shared, rows)
        full_mask = torch.cat([mask.new_ones(rows, prefix), mask], 1)
        return _padded_logits(lm, ids, full_mask, wanted, **{_cache_name(lm): cache})
    real = mask.bool()
    keep = wanted[real].nonzero().squeeze(-1)
    kwargs = {"logits_to_keep": keep} if _keeps_logits(lm) else {}
    logits = lm(input_ids=ids[real].unsqueeze(0), attention_mask=_after_prefix_mask(lm, lengths, prefix),
                position_ids=(prefix + _packed_positions(lengths)).unsqueeze(0), use_cache=True,
                **{_cache_name(lm): _prefix_cache(lm, shared, 1)}, **kwargs).logits[0]
    return logits if kwargs else logits[keep]


def _shareable_prefix(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      limit: torch.Tensor, extra: int = 0) -> int:
    """How many leading real tokens every row of a left-padded batch shares, at most ``limit`` (per
    row); 0 where sharing would not pay, would change the computation (dropout draws one mask for
    every row's prefix; rows that, with ``extra`` tokens still to come, outgrow a sliding attention
    window: :func:`_outgrows_window`) or the model fails the probe."""
    length = _common_prefix(model, input_ids, attention_mask, limit)
    if not length or _outgrows_window(model, attention_mask, extra):
        return 0
    return length if shares_prefix_exactly(model) else 0


def _common_prefix(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, limit: torch.Tensor) -> int:
    """How many leading real tokens every row of a left-padded batch shares, at most ``limit`` (per row);
    0 where that is too short to pay, the batch is not left padded, or dropout is on."""
    rows, width = input_ids.shape
    starts = width - attention_mask.sum(-1)
    left_padded = torch.equal(attention_mask.bool(), torch.arange(width, device=starts.device) >= starts[:, None])
    most = int(limit.min()) if rows > 1 else 0
    if most < SHARE_PREFIX_FROM or not left_padded or _dropout_active(model):
        return 0
    aligned = input_ids.gather(1, starts[:, None] + torch.arange(most, device=starts.device))
    length = int((aligned == aligned[:1]).all(0).long().cumprod(0).sum())
    return length if length >= SHARE_PREFIX_FROM else 0


def _outgrows_window(model: nn.Module, attention_mask: torch.Tensor, extra: int = 0) -> bool:
    """Whether a row, with ``extra`` tokens still to come, outgrows the model's sliding attention window.
    transformers measures that window in the batch's columns: after a cached prefix, a row's left
    padding sits between the prefix and its own tokens, so a padded row would see the wrong ones."""
    window = getattr(causal_lm_of(model).config, "sliding_window", None)
    return window is not None and int(attention_mask.sum(-1).max()) + extra > window


def _dropout_active(model: nn.Module) -> bool:
    lm = causal_lm_of(model)
    attention = getattr(lm.config, "attention_dropout", 0.0) or 0.0
    return any(m.training and (isinstance(m, nn.Dropout) and m.p > 0 or m is lm and attention > 0)
               for m in model.modules())


def _drop_prefix(tensor: torch.Tensor, starts: torch.Tensor, prefix: int) -> torch.Tensor:
    """Each row of a left-padded ``tensor`` without its first ``prefix`` real columns (still left padded)."""
    rows, width = tensor.shape
    columns = torch.arange(width, device=tensor.device)
    keep = (columns < starts[:, None]) | (columns >= starts[:, None] + prefix)
    return tensor[keep].view(rows, width - prefix)


def _prefix_cache(lm: nn.Module, prefix: torch.Tensor, rows: int) -> object:
    """The key/value cache of ``prefix`` run once, repeated for ``rows`` rows (in training, their
    gradients sum back into the one run)."""
    kwargs = {"logits_to_keep": 1} if _keeps_logits(lm) else {}
    cache = getattr(lm(input_ids=prefix.unsqueeze(0), use_cache=True, **kwargs), _cache_name(lm))
    if rows > 1:
        cache.batch_repeat_interleave(rows)
    return cache


def _after_prefix_mask(lm: nn.Module, lengths: torch.Tensor, prefix: int) -> torch.Tensor:
    """The 4-D attention mask of texts of ``lengths`` packed in one row after a shared prefix: each
    sees the prefix and its own earlier tokens; boolean for SDPA, additive for eager attention."""
    text = torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths)
    order = torch.arange(len(text), device=lengths.device)
    own = (text[:, None] == text[None, :]) & (order[None, :] <= order[:, None])
    allowed = torch.cat([own.new_ones(len(text), prefix), own], 1)[None, None]
    implementation = getattr(lm.config, "_attn_implementation", None)
    if implementation == "sdpa":
        return allowed
    if implementation == "eager":
        dtype = next(lm.parameters()).dtype
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)
    raise ValueError(f"no packed mask for attention implementation {implementation!r}")


@torch.no_grad()
def answer_log_probs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     answers: Sequence[Sequence[int]]) -> torch.Tensor:
    """Log-probability of each answer after each (left-padded) prompt: batch × answers, the sum over
    the answer's tokens (lm-evaluation-harness's multiple-choice score, not length-normalised).

    The prompts' shared prefix runs once and each prompt once for all answers: its last position
    scores every answer's first token, and only answers of several tokens continue, from a copy of
    the prompts' key/value cache."""
    lm = causal_lm_of(model)
    parts = _prompt_parts(model, input_ids, attention_mask, max(map(len, answers)) - 1)
    with float32_lm_head(lm):
        return torch.cat([_answer_scores(lm, *part, answers) for part in parts])


def _answer_scores(lm: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache: dict[str, object],
                   answers: Sequence[Sequence[int]]) -> torch.Tensor:
    """:func:`answer_log_probs` of one part of a prompt batch (:func:`_prompt_parts`)."""
    rows = input_ids.shape[0]
    longer = any(len(a) > 1 for a in answers)
    positions = _positions(attention_mask)[:, attention_mask.shape[1] - input_ids.shape[1]:]
    kwargs = {"logits_to_keep": 1} if _keeps_logits(lm) else {}
    out = lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
             use_cache=longer or bool(cache), **cache, **kwargs)
    first = F.log_softmax(out.logits[:, -1].float(), dim=-1)
    scores = first[:, [a[0] for a in answers]].clone()
    for k, answer in enumerate(answers):
        if len(answer) == 1:
            continue
        rest = torch.tensor(answer, device=input_ids.device).expand(rows, -1)
        steps = rest.shape[1] - 1
        more = lm(input_ids=rest[:, :-1], attention_mask=torch.cat([attention_mask, torch.ones_like(rest[:, :-1])], 1),
                  position_ids=positions[:, -1:] + 1 + torch.arange(steps, device=input_ids.device),
                  **{_cache_name(lm): copy.deepcopy(getattr(out, _cache_name(lm)))}, use_cache=True).logits
        scores[:, k] += F.log_softmax(more.float(), dim=-1).gather(-1, rest[:, 1:, None]).squeeze(-1).sum(-1)
    return scores


def _prompt_parts(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  extra: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict[str, object]]]:
    """A left-padded prompt batch as the LM then reads it, in parts whose outputs stack row by row.
    The tokens every prompt starts with (up to each one's last token) run once into a key/value cache;
    then every row's rest in one part, still left padded, with an attention mask over the cache and
    the rest; or, where a row with ``extra`` tokens still to come (as in decoding) would outgrow a
    sliding attention window (a k-shot prompt on Gemma), each row alone, unpadded, after its own copy
    of the cache. One part, the batch unchanged and no cache, where sharing would not pay or the
    model fails the probe of the way it would share."""
    lm = causal_lm_of(model)
    prefix = _common_prefix(model, input_ids, attention_mask, attention_mask.sum(-1) - 1)
    alone = bool(prefix) and _outgrows_window(model, attention_mask, extra)
    if not prefix or not (shares_prefix_past_window_exactly(model) if alone else shares_prefix_exactly(model)):
        yield input_ids, attention_mask, {}
        return
    rows = input_ids.shape[0]
    starts = attention_mask.shape[1] - attention_mask.sum(-1)
    shared = input_ids[0, int(starts[0]): int(starts[0]) + prefix]
    rest_ids, rest_mask = (_drop_prefix(t, starts, prefix) for t in (input_ids, attention_mask))
    if not alone:
        cache = {_cache_name(lm): _prefix_cache(lm, shared, rows)}
        yield rest_ids, torch.cat([rest_mask.new_ones(rows, prefix), rest_mask], 1), cache
        return
    once = _prefix_cache(lm, shared, 1)
    for ids, mask in zip(rest_ids, rest_mask.bool()):
        own = ids[mask][None]
        yield own, own.new_ones(1, prefix + own.shape[1]), {_cache_name(lm): copy.deepcopy(once)}


@torch.no_grad()
def greedy_tokens(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, steps: int,
                  stop_id: int) -> torch.Tensor:
    """Greedy decoding of each left-padded prompt (``generate(do_sample=False)``), ``steps`` new tokens
    at most (batch × ≤ steps), ending once every row has written ``stop_id`` (a row decoded alone,
    :func:`_prompt_parts`, is filled up with it). The prompts' shared prefix (a k-shot prompt's
    demonstrations: most of its tokens) runs once."""
    lm = causal_lm_of(model)
    written = [_greedy_part(lm, *part, steps, stop_id) for part in _prompt_parts(model, input_ids, attention_mask, steps - 1)]
    width = max(w.shape[1] for w in written)
    return torch.cat([F.pad(w, (0, width - w.shape[1]), value=stop_id) for w in written])


def _greedy_part(lm: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache: dict[str, object],
                 steps: int, stop_id: int) -> torch.Tensor:
    """:func:`greedy_tokens` of one part of a prompt batch (:func:`_prompt_parts`)."""
    positions = _positions(attention_mask)[:, attention_mask.shape[1] - input_ids.shape[1]:]
    kwargs = {"logits_to_keep": 1} if _keeps_logits(lm) else {}
    written: list[torch.Tensor] = []
    stopped = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    while True:
        out = lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=True,
                 **cache, **kwargs)
        token = out.logits[:, -1].argmax(-1)
        written.append(token)
        stopped |= token == stop_id
        if len(written) == steps or bool(stopped.all()):
            return torch.stack(written, 1)
        input_ids, positions = token[:, None], positions[:, -1:] + 1
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(token), 1)], 1)
        cache = {_cache_name(lm): getattr(out, _cache_name(lm))}


@contextmanager
def float32_lm_head(lm: nn.Module) -> Iterator[None]:
    """The LM head in float32 while answers are scored, even under bf16 autocast: bf16 logits sit
    0.06–0.125 apart at their usual size, so two labels' scores tie exactly on many rows. Only the
    scored positions reach the head, so this costs little; a head that is not a plain Linear (an
    adapted one) is left as it is."""
    head = lm.get_output_embeddings()
    if type(head) is not nn.Linear:
        yield
        return

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        with torch.autocast(hidden.device.type, enabled=False):
            bias = None if head.bias is None else head.bias.float()
            return F.linear(hidden.float(), head.weight.float(), bias)

    head.forward = forward  # an instance attribute: the class's forward returns when it is deleted
    try:
        yield
    finally:
        del head.forward


# -- probes: does a saving give the plain computation on this model? ---------------------------
def _probed(model: nn.Module, decided: "weakref.WeakKeyDictionary[nn.Module, bool]",
            compare: Callable[[nn.Module, torch.device], tuple[torch.Tensor, torch.Tensor]]) -> bool:
    """Decide once per model (in eval mode, without autocast, every module's mode restored) whether
    ``compare``'s two computations agree to rounding: a few ulps of their dtype, where a text
    reading another's tokens moves them by O(1)."""
    backbone = backbone_of(model)
    if backbone not in decided:
        device = next(backbone.parameters()).device
        lm = causal_lm_of(model)
        modes = {module: module.training for module in lm.modules()}
        lm.eval()
        try:
            with torch.no_grad(), torch.autocast(device.type, enabled=False):
                plain, saving = compare(model, device)
            tolerance = max(1e-4, 8 * torch.finfo(saving.dtype).eps) * plain.float().abs().max()
            decided[backbone] = bool((saving.float() - plain.float()).abs().max() <= tolerance)
        except (TypeError, ValueError, RuntimeError, AttributeError):  # a forward refusing these arguments
            decided[backbone] = False
        finally:
            for module, mode in modes.items():
                module.training = mode
    return decided[backbone]


def shares_prefix_past_window_exactly(model: nn.Module) -> bool:
    """Whether one unpadded row continuing from a prefix's cache gives the plain forward's logits (at
    its last two positions) where the prefix alone fills ``model``'s sliding attention window: the
    rest read as one chunk and then one token, as scoring and decoding read it."""
    def compare(model: nn.Module, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        lm = causal_lm_of(model)
        prefix = lm.config.sliding_window + 2
        ids = (torch.arange(prefix + 4, device=device) * 7919 % (lm.config.vocab_size - 1) + 1)[None]
        plain = lm(input_ids=ids, use_cache=False).logits[0, -2:]
        cache = {_cache_name(lm): _prefix_cache(lm, ids[0, :prefix], 1)}
        logits, positions = [], torch.arange(ids.shape[1], device=device)[None]
        for chunk in (slice(prefix, -1), slice(-1, None)):
            seen = positions[:, chunk][0, -1] + 1
            out = lm(input_ids=ids[:, chunk], attention_mask=ids.new_ones(1, seen), position_ids=positions[:, chunk],
                     use_cache=True, **cache)
            logits.append(out.logits[0, -1:])
            cache = {_cache_name(lm): getattr(out, _cache_name(lm))}
        return plain, torch.cat(logits)

    if getattr(causal_lm_of(model).config, "sliding_window", None) is None:
        return False
    return _probed(model, _WINDOW_PREFIX_WORKS, compare)


# Texts 1..5 and 6..8 left-padded as the collators pad them (0 is padding in both probes); for the
# prefix probe, three texts sharing their first three tokens: with the first, the rest is mostly
# padding (packed); without it, dense.
_PROBE_IDS = [[1, 2, 3, 4, 5], [0, 0, 6, 7, 8]]
_PREFIX_PROBE_TEXTS = [[1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 9, 4], [1, 2, 3, 5, 9]]


def packs_exactly(model: nn.Module) -> bool:
    """Whether ``model`` keeps packed texts apart: two short texts, packed and padded, must give the
    same last-token states. Architectures whose masks ignore packed position ids would let the
    second text read the first; they are caught here and stay padded."""
    def compare(model: nn.Module, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.tensor(_PROBE_IDS, device=device)
        mask = (ids > 0).long()
        return _padded_last_hidden(model, ids, mask), _packed_last_hidden(model, ids[mask.bool()], mask.sum(-1))

    return _probed(model, _PACKING_WORKS, compare)


def shares_prefix_exactly(model: nn.Module) -> bool:
    """Whether rows continuing from a shared prefix's cache, padded and packed, give the logits of
    the plain padded batch on ``model`` (at each text's last two positions)."""
    def compare(model: nn.Module, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        lm = causal_lm_of(model)
        plain, shared = [], []
        for texts in (_PREFIX_PROBE_TEXTS, _PREFIX_PROBE_TEXTS[1:]):
            width = max(map(len, texts))
            ids = torch.tensor([[0] * (width - len(t)) + t for t in texts], device=device)
            mask = (ids > 0).long()
            wanted = mask.bool() & (torch.arange(width, device=device) >= width - 2)
            plain.append(_padded_logits(lm, ids, mask, wanted))
            shared.append(_prefix_logits(lm, ids, mask, wanted, 3))
        return torch.cat(plain), torch.cat(shared)

    return _probed(model, _PREFIX_WORKS, compare)
