"""The benchmark's training loop: ``train_task`` trains whatever loss a protocol defines on a task's
rows (and replayed rows of earlier tasks); how the model is run lives in :mod:`.forward`.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from curlora.data import Example


class NonFiniteLossError(RuntimeError):
    """Training diverged; the runner stops that method's run and keeps the others going."""


def derived_seed(*parts: object) -> int:
    """A seed for one purpose of one run (head init, shuffling, demonstrations), from its parts."""
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


# A training row: an example and the index of the task it belongs to (replayed rows are earlier tasks').
Item = tuple[Example, int]
# A protocol's loss: (model, rows, whether the backbone trains) -> the loss summed over the rows.
LossFn = Callable[[nn.Module, Sequence[Item], bool], torch.Tensor]


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
