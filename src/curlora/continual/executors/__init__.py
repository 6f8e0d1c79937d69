"""Where a command's runs train: on this machine (``executor: local``, the default, which needs nothing
installed; :mod:`.local`) or as Ray tasks on a cluster (``executor: ray``; :mod:`.ray`).

Both do the same two things for the runner through the public seam of :mod:`curlora.continual.worker`:
``base`` loads and checks the model and the data and computes what the unchanged base model gives every
run (a :class:`Base`), writing nothing; ``run`` trains each run and hands its result back to the
runner, which saves it. A new executor implements those two methods (:class:`Executor`) and is named
in :func:`executor_for`."""

from __future__ import annotations

from curlora.continual.config import ContinualConfig
from curlora.continual.executors.common import Executor, OnResult, failure_text, longest_first
from curlora.continual.executors.local import LocalExecutor
from curlora.continual.executors.ray import RayExecutor

__all__ = ["Executor", "LocalExecutor", "OnResult", "RayExecutor", "executor_for", "failure_text", "longest_first"]


def executor_for(config: ContinualConfig) -> Executor:
    """The executor ``config.executor`` names."""
    return RayExecutor(config) if config.executor == "ray" else LocalExecutor(config)
