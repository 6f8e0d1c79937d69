"""Data parallel under ``torchrun`` / ``accelerate launch``: every process trains its share of each
batch, and only rank 0 writes files or prints. Everything that differs by rank goes through
:class:`DataParallel`, so no other module asks which rank it is on."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from curlora.continual.training import data_parallel_rank


@dataclass(frozen=True)
class DataParallel:
    """This process's place among the command's processes (one process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @classmethod
    def join(cls, device: str) -> DataParallel:
        """Join the process group that ``torchrun`` / ``accelerate launch`` describe (WORLD_SIZE > 1);
        calling it again in the same process joins nothing new."""
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        resolved = torch.device(device)
        if resolved.type == "cuda" and resolved.index is None and dist.is_initialized():
            resolved = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        rank, world = data_parallel_rank()
        return cls(rank, world, resolved)

    @property
    def is_main(self) -> bool:
        """The process that writes files and prints."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def say(self, message: str) -> None:
        """One console line, printed once however many processes train."""
        if self.is_main:
            print(message, flush=True)


def rank_divergence(tensors: list[torch.Tensor]) -> float:
    """Largest difference between any process's trained tensors and rank 0's (0.0 when in sync)."""
    flat = torch.cat([t.detach().reshape(-1).float() for t in tensors])
    reference = flat.clone()
    dist.broadcast(reference, 0)
    difference = (flat - reference).abs().max()
    dist.all_reduce(difference, op=dist.ReduceOp.MAX)
    return float(difference)
