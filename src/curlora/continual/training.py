"""Running a (possibly adapted) causal LM for the benchmark's protocols, and the training loop.

The heads protocol reads the hidden state of each sequence's last real token, as the paper's
``lm_head`` replacement did; the generative protocol reads the LM's own logits at the answer
positions. Position ids follow the attention mask, so left padding gives the same states as the
unpadded sequence for absolute-position models (GPT-2) too. ``train_task`` trains whatever loss a
protocol defines on a task's rows (and replayed rows of earlier tasks).
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import math
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from curlora.data import Example, last_token_index


class NonFiniteLossError(RuntimeError):
    """Training diverged; the runner stops that method's run and keeps the others going."""


def derived_seed(*parts: object) -> int:
    """A seed for one purpose of one run (head init, shuffling, demonstrations), from its parts."""
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


# A training row: an example and the index of the task it belongs to (replayed rows are earlier tasks').
Item = tuple[Example, int]
# A protocol's loss: (model, rows, whether the backbone trains) -> the loss summed over the rows.
LossFn = Callable[[nn.Module, Sequence[Item], bool], torch.Tensor]


def causal_lm_of(model: nn.Module) -> nn.Module:
    """The transformers causal LM inside a CURLoRA or PEFT wrapper (or the model itself)."""
    get_base = getattr(type(model), "get_base_model", None)
    return model.get_base_model() if get_base is not None else model


def backbone_of(model: nn.Module) -> nn.Module:
    """The transformer body (no LM head) of a causal LM or a wrapper around one."""
    lm = causal_lm_of(model)
    return getattr(lm, lm.base_model_prefix)


def last_hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The final-layer hidden state at each row's last real token (batch × hidden).

    A batch that is mostly padding (shuffled training batches of short texts) runs packed: its real
    tokens in one row, each text attending only to itself, which is the padded batch's computation
    without the padding (the same numbers up to float rounding, in far fewer token-steps). Only on
    models where a probe shows packing gives the padded result; otherwise, and for dense batches
    (where the packed row's longer attention would cost more than the padding), padded."""
    mask = attention_mask.bool()
    lengths = mask.sum(-1)
    if lengths.sum() <= PACK_BELOW_DENSITY * mask.numel() and packs_exactly(model):
        return _packed_last_hidden(model, input_ids[mask], lengths)
    return _padded_last_hidden(model, input_ids, attention_mask)


# Pack a batch when at most this share of its token slots holds real tokens: above it, the packed
# row's attention (quadratic in the row's length) costs more than the padding it saves.
PACK_BELOW_DENSITY = 0.75
_PACKING_WORKS: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()


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


def _keeps_logits(lm: nn.Module) -> bool:
    return "logits_to_keep" in inspect.signature(lm.forward).parameters


def lm_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              wanted: torch.Tensor) -> torch.Tensor:
    """The LM's next-token logits at the positions ``wanted`` marks (a batch × length bool mask),
    row by row (n_wanted × vocab). Only those positions go through the LM head, which is a large
    share of a forward pass; a mostly-padding batch runs packed, as in :func:`last_hidden`."""
    lm = causal_lm_of(model)
    mask = attention_mask.bool()
    lengths = mask.sum(-1)
    if lengths.sum() <= PACK_BELOW_DENSITY * mask.numel() and packs_exactly(model):
        position_ids = _packed_positions(lengths)
        keep = wanted[mask].nonzero().squeeze(-1)
        kwargs = {"logits_to_keep": keep} if _keeps_logits(lm) else {}
        logits = lm(input_ids=input_ids[mask].unsqueeze(0), position_ids=position_ids.unsqueeze(0),
                    use_cache=False, **kwargs).logits[0]
        return logits if kwargs else logits[keep]
    columns = wanted.any(0).nonzero().squeeze(-1)
    kwargs = {"logits_to_keep": columns} if _keeps_logits(lm) else {}
    logits = lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=_positions(attention_mask),
                use_cache=False, **kwargs).logits
    return logits[wanted[:, columns]] if kwargs else logits[wanted]


@torch.no_grad()
def answer_log_probs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     answers: Sequence[Sequence[int]]) -> torch.Tensor:
    """Log-probability of each answer after each (left-padded) prompt: batch × answers, the sum over
    the answer's tokens (lm-evaluation-harness's multiple-choice score, not length-normalised).

    The prompt runs once for all answers: its last position scores every answer's first token, and
    only answers of several tokens continue, from a copy of the prompt's key/value cache."""
    lm = causal_lm_of(model)
    longer = any(len(a) > 1 for a in answers)
    positions = _positions(attention_mask)
    kwargs = {"logits_to_keep": 1} if _keeps_logits(lm) else {}
    out = lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=longer, **kwargs)
    # transformers 5.x renamed past_key_values to cache (the old name warns, then goes in 5.40).
    cache_name = "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"
    first = F.log_softmax(out.logits[:, -1].float(), dim=-1)
    scores = first[:, [a[0] for a in answers]].clone()
    for k, answer in enumerate(answers):
        if len(answer) == 1:
            continue
        rest = torch.tensor(answer, device=input_ids.device).expand(input_ids.shape[0], -1)
        steps = rest.shape[1] - 1
        more = lm(input_ids=rest[:, :-1], attention_mask=torch.cat([attention_mask, torch.ones_like(rest[:, :-1])], 1),
                  position_ids=positions[:, -1:] + 1 + torch.arange(steps, device=input_ids.device),
                  **{cache_name: copy.deepcopy(getattr(out, cache_name))}, use_cache=True).logits
        scores[:, k] += F.log_softmax(more.float(), dim=-1).gather(-1, rest[:, 1:, None]).squeeze(-1).sum(-1)
    return scores


@torch.no_grad()
def packs_exactly(model: nn.Module) -> bool:
    """Whether ``model`` keeps packed texts apart (decided once per model): two short texts, packed
    and padded, must give the same last-token states. Architectures whose masks ignore packed
    position ids would let the second text read the first; they are caught here and stay padded."""
    backbone = backbone_of(model)
    if backbone not in _PACKING_WORKS:
        device = next(backbone.parameters()).device
        # Texts 1..5 and 6..8, left-padded as the collator pads them, and back to back.
        ids = torch.tensor([[1, 2, 3, 4, 5], [0, 0, 6, 7, 8]], device=device)
        mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]], device=device)
        modes = {module: module.training for module in backbone.modules()}
        backbone.eval()
        try:
            with torch.autocast(device.type, enabled=False):
                padded = _padded_last_hidden(model, ids, mask).float()
                packed = _packed_last_hidden(model, ids[mask.bool()], mask.sum(-1))
            # Rounding moves a few ulps of the states' own dtype; a text reading another moves them by O(1).
            tolerance = max(1e-4, 8 * torch.finfo(packed.dtype).eps) * padded.abs().max()
            _PACKING_WORKS[backbone] = bool((packed.float() - padded).abs().max() <= tolerance)
        except (TypeError, ValueError, RuntimeError):  # a forward that refuses these arguments
            _PACKING_WORKS[backbone] = False
        finally:
            for module, mode in modes.items():
                module.training = mode
    return _PACKING_WORKS[backbone]


def batches(
    examples: Sequence[Example], batch_size: int, generator: torch.Generator | None = None
) -> Iterator[list[Example]]:
    """Mini-batches, shuffled with ``generator`` when one is given."""
    order = torch.randperm(len(examples), generator=generator).tolist() if generator else range(len(examples))
    order = list(order)
    for start in range(0, len(order), batch_size):
        yield [examples[i] for i in order[start : start + batch_size]]


@dataclass
class TrainSettings:
    lr: float
    head_lr: float
    epochs: int
    batch_size: int
    warmup_steps: int
    max_warmup_fraction: float
    weight_decay: float
    u_penalty: float = 0.0  # the paper's Eq. 11: loss + λ·Σ‖U‖_F over adapted layers
    bf16: bool = False


def warmup_for(total_steps: int, settings: TrainSettings) -> int:
    """The configured warm-up, capped to a fraction of the run (the paper's 500 > its 375 steps)."""
    return min(settings.warmup_steps, int(settings.max_warmup_fraction * total_steps))


def data_parallel_rank() -> tuple[int, int]:
    """(rank, world size) of an initialised torch.distributed group, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce_gradients(params: Sequence[torch.Tensor], loss: torch.Tensor) -> None:
    """Sum gradients and the loss over processes (what DDP does, without wrapping the model)."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params] + [loss.reshape(1)])
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset : offset + p.numel()].view_as(p.grad))
        offset += p.numel()
    loss.copy_(flat[-1])


def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 autocast is the default on ``device``: on a GPU that has bf16, never on a CPU.

    On CPUs its speed depends on the chip, not on a flag one can read: forward+backward of SmolLM2
    under autocast ran 1.5x faster than float32 on an AMD EPYC (Zen 4) and 2x slower on an Intel
    Xeon, both with avx512_bf16 (see benchmarks/README.md). float32 also gives the same numbers on
    every CPU; ``bf16=True`` (``--bf16``) still asks for autocast."""
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def autocast(device: torch.device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else nullcontext()


def train_task(
    model: nn.Module,
    items: Sequence[Item],
    loss_fn: LossFn,
    task_params: Sequence[torch.Tensor],
    settings: TrainSettings,
    generator: torch.Generator,
    u_params: Sequence[torch.Tensor] = (),
    progress: bool = True,
    description: str = "train",
    penalty: Callable[[], torch.Tensor | None] | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train the model's trainable parameters (at ``settings.lr``) and a protocol's ``task_params``
    (a task head, at ``settings.head_lr``) on ``items``: a task's rows and any replayed rows of
    earlier tasks, shuffled together. Returns the loss of every step (the mean over the batch's
    rows). ``penalty`` is a method's extra loss term (EWC's pull toward earlier solutions);
    ``on_step(step, loss)`` sees each step's loss as it is taken (1-based step), for a live log."""
    adapter_params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": list(task_params), "lr": settings.head_lr}] if task_params else []
    if adapter_params:
        groups.append({"params": adapter_params, "lr": settings.lr})
    if not groups:
        raise ValueError(f"{description}: nothing to train (no trainable parameters).")
    optimizer = torch.optim.AdamW(groups, weight_decay=settings.weight_decay)
    steps_per_epoch = math.ceil(len(items) / settings.batch_size)
    total = steps_per_epoch * settings.epochs
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup_for(total, settings), total)
    model.train()
    losses: list[float] = []
    bar = tqdm(total=total, desc=description, disable=not progress, leave=False)
    rank, world = data_parallel_rank()
    trained = [p for group in groups for p in group["params"]]
    for _ in range(settings.epochs):
        for batch in batches(items, settings.batch_size, generator):
            # Data parallel: each process takes its share of the global batch; summed gradients
            # over processes then equal the single-process gradient of the whole batch.
            shard = batch[rank::world]
            loss = loss_fn(model, shard or batch[:1], bool(adapter_params)) / len(batch)
            if not shard:
                loss = loss * 0.0
            if settings.u_penalty and u_params:
                loss = loss + settings.u_penalty * sum(u.norm() for u in u_params) / world
            extra = penalty() if penalty is not None else None
            if extra is not None:
                loss = loss + extra / world
            loss.backward()
            total_loss = loss.detach()
            if world > 1:
                _all_reduce_gradients(trained, total_loss)
            if not torch.isfinite(total_loss):
                raise NonFiniteLossError(
                    f"{description}: loss became {total_loss.item()} at step {len(losses) + 1}; "
                    f"lower the learning rate (lr={settings.lr}, head_lr={settings.head_lr})."
                )
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(total_loss.item())
            if on_step is not None:
                on_step(len(losses), losses[-1])
            bar.update()
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    model.eval()
    return losses


def fisher_diagonal(model: nn.Module, loss_fn: LossFn, items: Sequence[Item],
                    params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The empirical diagonal Fisher of ``params`` on a task: the mean over rows of the squared
    gradient of each row's negative log-likelihood under the protocol's loss (one row per backward,
    so it is the per-example Fisher, not the square of a batch-mean gradient)."""
    fisher = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    model.eval()
    for item in items:
        grads = torch.autograd.grad(loss_fn(model, [item], True), list(params), allow_unused=True)
        for f, g in zip(fisher, grads):
            if g is not None:
                f.add_(g.detach().float().pow(2))
    return [f.div_(max(len(items), 1)) for f in fisher]
