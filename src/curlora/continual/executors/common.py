"""What every executor shares: the interface the runner drives, the order pending runs start in, and
the line a command prints when runs failed."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from curlora.continual.config import ContinualConfig
from curlora.continual.plan import RunSpec
from curlora.continual.prepare import Base
from curlora.continual.worker import Job

#: Called by an executor, in the driver's process, with each run's result as it comes back.
OnResult = Callable[[RunSpec, dict[str, Any]], None]


class Executor(Protocol):
    """Where a command's runs train; entered for the command's life (Ray: connected to a cluster)."""

    def __enter__(self) -> Executor: ...

    def __exit__(self, *exc: object) -> None: ...

    def base(self, job: Job, seeds: Sequence[int]) -> Base:
        """The model and data loaded and checked, and what the base model gives runs of ``seeds``
        (:meth:`Worker.base` wherever the executor runs it); nothing is written."""

    def run(self, job: Job, specs: Sequence[RunSpec], base: Base, on_result: OnResult) -> list[str]:
        """Every run of ``specs`` trained (:meth:`Worker.train`), each result passed to ``on_result`` in
        this process as it comes; what failed, one line each (empty: nothing did)."""


def longest_first(specs: Sequence[RunSpec], config: ContinualConfig) -> list[RunSpec]:
    """Runs that train before frozen-backbone ones (a forward pass per batch): a short run fills the end."""
    return sorted(specs, key=lambda spec: config.method(spec.method).frozen_backbone)


def failure_text(failures: Sequence[str], runs_dir: Path) -> str:
    """The one line a command prints when runs failed (an executor's errors are printed above it)."""
    return (f"{'; '.join(failures)}; their errors are printed above. The runs that finished are kept in "
            f"{runs_dir}: fix the cause and rerun with --resume.")
