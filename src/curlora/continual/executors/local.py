"""``executor: local`` (the default, which needs nothing installed): runs train in this process, or side
by side in ``workers`` processes, each with its share of the CPU threads, taking the next pending run
when one finishes. Finished runs are files, so a killed pool resumes too.

Why processes: on 2 CPU cores one process's small matmuls keep the second thread half idle
(forward+backward of SmolLM2 at batch 8: 1.3x faster on 2 threads than on 1), so two single-threaded
runs side by side finish sooner than the same runs one after the other."""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Sequence
from typing import Any

import torch

from curlora.continual.config import ContinualConfig
from curlora.continual.executors.common import OnResult, longest_first
from curlora.continual.plan import RunSpec
from curlora.continual.prepare import Base
from curlora.continual.worker import Job, Worker


class LocalExecutor:
    """Runs on this machine: in this process, or in a pool of ``workers`` processes."""

    def __init__(self, config: ContinualConfig) -> None:
        self.config = config

    def __enter__(self) -> LocalExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        Worker.forget()  # the model goes with the command: a program's next command loads its own

    def base(self, job: Job, seeds: Sequence[int]) -> Base:
        return Worker.for_job(job).base(seeds)

    def run(self, job: Job, specs: Sequence[RunSpec], base: Base, on_result: OnResult) -> list[str]:
        workers = min(self.config.workers or 1, len(specs))
        if workers <= 1:
            for spec in specs:  # the model is loaded again if an earlier call's pool had it
                on_result(spec, Worker.for_job(job).train(spec, base))
            return []
        Worker.forget()  # each worker process loads its own
        context = torch.multiprocessing.get_context("spawn")
        pending, results = context.SimpleQueue(), context.Queue()
        for spec in longest_first(specs, self.config):
            pending.put(spec)
        for _ in range(workers):
            pending.put(None)
        threads = max(1, torch.get_num_threads() // workers)
        print(f"{len(specs)} runs in {workers} worker processes, {threads} thread(s) each", flush=True)
        shared = (job.elsewhere(threads), pending, results, base)
        processes = [context.Process(target=pool_worker, args=shared) for _ in range(workers)]
        for process in processes:
            process.start()
        # Each result is saved by this process as it comes; a worker that dies leaves its run missing.
        while any(process.is_alive() for process in processes) or not results.empty():
            try:
                on_result(*results.get(timeout=1.0))
            except queue.Empty:
                continue
        for process in processes:
            process.join()
        failed = [p.exitcode for p in processes if p.exitcode != 0]
        return [f"{len(failed)} of {workers} worker processes failed (exit codes {failed})"] if failed else []


def pool_worker(job: Job, pending: Any, results: Any, base: Base) -> None:
    """A worker process of LocalExecutor.run: trains runs from ``pending`` until None, putting each
    (spec, result) on ``results``."""
    parent = os.getppid()
    threading.Thread(target=exit_when_orphaned, args=(parent,), daemon=True).start()
    worker = Worker.for_job(job)
    while (spec := pending.get()) is not None:
        results.put((spec, worker.train(spec, base)))


def exit_when_orphaned(parent: int, every_s: float = 1.0) -> None:
    """End this process within ``every_s`` of its parent's death, even mid-run: the command saves the
    results, so an orphan's training is lost CPU, and it would run beside the command that resumes
    the experiment (with the same run's checkpoints). Files are written atomically, so none is left
    half-written; the run resumes from its last task checkpoint."""
    while os.getppid() == parent:
        time.sleep(every_s)
    os._exit(1)
