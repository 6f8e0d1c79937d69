"""Runs a user can watch: TensorBoard event files of each continual run, written as it trains
(``log_dir`` / ``--log-dir``; watch with ``tensorboard --logdir <log_dir>``).

Why TensorBoard: its event files are the format most trackers read (TensorBoard itself; W&B and
MLflow import them), writing them needs only the ``tensorboard`` package beside PyTorch
(``torch.utils.tensorboard``), and nothing else runs while the benchmark trains: no account, no
server, no network (these runs are offline). Only the runner imports this module, and only when
``log_dir`` is set.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter

from curlora.continual.metrics import final_accuracy


class RunEvents:
    """One run's event directory, ``<log_dir>/<run key>/``.

    ``train_loss/<task>``: the loss of every optimizer step, the step counting across the run's
    tasks. ``accuracy/<task>`` and ``perplexity``: at step = tasks learned (0: before training),
    perplexity only where it was scored. ``ACC``: the run's final accuracy, at the last task.

    A resumed run writes its finished tasks again from the checkpoint's state, after a restart mark
    (``purge_step=0``) by which TensorBoard drops what a killed attempt wrote: each step is there once.
    """

    def __init__(self, log_dir: str | Path, key: str, tasks: Sequence[str], ppl_before: float,
                 state: dict[str, Any]) -> None:
        self.writer = SummaryWriter(str(Path(log_dir) / key), purge_step=0)
        self.tasks = list(tasks)
        self.steps = 0  # optimizer steps of the tasks already logged
        self.writer.add_scalar("perplexity", ppl_before, 0)
        self._scores(state, 0)
        # A checkpoint from before train_loss was kept has no step losses: its tasks' scores still count.
        for i, losses in enumerate(state.get("train_loss", [[]] * state["tasks_done"])):
            for step, loss in enumerate(losses, 1):
                self.writer.add_scalar(f"train_loss/{self.tasks[i]}", loss, self.steps + step)
            self._task_done(state, i, len(losses))
        self.writer.flush()

    def on_step(self, task: str) -> Callable[[int, float], None]:
        """train_task's per-step callback for ``task``: (step within the task, loss) → one scalar."""
        return lambda step, loss: self.writer.add_scalar(f"train_loss/{task}", loss, self.steps + step)

    def task_done(self, state: dict[str, Any]) -> None:
        """Log the task just finished (the last entry of ``state``) and flush, so a watcher sees it now."""
        self._task_done(state, state["tasks_done"] - 1, len(state["train_loss"][-1]))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()

    def _task_done(self, state: dict[str, Any], i: int, steps: int) -> None:
        self.steps += steps
        self._scores(state, i + 1)
        ppl = state["ppl_after_task"][i]
        if ppl is not None:
            self.writer.add_scalar("perplexity", ppl, i + 1)
        if i + 1 == len(self.tasks):
            self.writer.add_scalar("ACC", final_accuracy(state["accuracy_matrix"]), i + 1)

    def _scores(self, state: dict[str, Any], learned: int) -> None:
        for task, accuracy in zip(self.tasks, state["accuracy_matrix"][learned]):
            if accuracy is not None:
                self.writer.add_scalar(f"accuracy/{task}", accuracy, learned)
