"""The seam between what a command runs and where it runs. A :class:`Job` says what (picklable: it
travels to worker processes and Ray tasks); a :class:`Worker` does it in whatever process it lands in:
it prepares the base model and the data once per process, gives the base model's rows for given
seeds, and trains one run. Executors use only this module of the runner's code."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from curlora.continual.config import ContinualConfig
from curlora.continual.loop import identity, train_run
from curlora.continual.parallel import DataParallel
from curlora.continual.plan import RunSpec
from curlora.continual.prepare import Base, Prepared, measure_base, prepare
from curlora.continual.rundir import RunDir
from curlora.continual.training import NonFiniteLossError


@dataclass(frozen=True)
class Job:
    """One command's work, as any process can take it up: the config, the run directory, the driver's
    working directory (relative paths of the config mean what they mean to the driver) and the torch
    threads a worker process uses (None: as many as the process has)."""

    config: ContinualConfig
    run_dir: str
    cwd: str
    threads: int | None = None

    def elsewhere(self, threads: int) -> Job:
        """The job as another process runs it: its own threads, no progress bars (many processes, one
        console)."""
        return dataclasses.replace(self, config=dataclasses.replace(self.config, progress=False), threads=threads)


class Worker:
    """A job's base model and data in this process, and the two things done with them."""

    _loaded: ClassVar[dict[str, Worker]] = {}  # one job's model in memory at a time

    def __init__(self, job: Job) -> None:
        parallel = DataParallel.join(job.config.device)
        self.job = job
        self.run_dir = RunDir(job.run_dir, parallel)
        self.prepared: Prepared = prepare(job.config, parallel)

    @classmethod
    def for_job(cls, job: Job) -> Worker:
        """The worker of ``job`` in this process, prepared on first use (a Ray worker process or a pool's
        worker takes many runs of one command)."""
        if job.threads is not None:
            torch.set_num_threads(job.threads)
        if job.cwd != os.getcwd() and os.path.isdir(job.cwd):
            os.chdir(job.cwd)
        key = json.dumps([job.run_dir, job.config.to_dict()], sort_keys=True, default=str)
        if key not in cls._loaded:
            cls.forget()
            cls._loaded[key] = cls(job)
        return cls._loaded[key]

    @classmethod
    def forget(cls) -> None:
        """Drop this process's prepared model (a pool's workers load their own)."""
        cls._loaded.clear()

    def base(self, seeds: Sequence[int]) -> Base:
        """What the base model gives runs of ``seeds``; nothing is written."""
        return measure_base(self.prepared, list(seeds), self.run_dir.base_perplexity())

    def train(self, spec: RunSpec, base: Base) -> dict[str, Any]:
        """One run's result (a diverged run's as failed); ``base`` may come from another process, whose
        cached base-model features a frozen-backbone run uses instead of computing them again."""
        self.prepared.protocol.base_cache.update(base.base_cache)
        try:
            result = train_run(self.prepared, spec, base, self.run_dir.checkpoint_dir(spec.key))
        except NonFiniteLossError as error:
            self.prepared.parallel.say(f"[{spec.key}] stopped: {error}")
            result = {**identity(spec, self.job.config), "status": "failed", "error": str(error)}
        result["threads"] = torch.get_num_threads()
        return result
