"""A run's checkpoint after each finished task, and resuming from the latest one: a killed run resumes
where it stopped and ends with the numbers it would have had."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save

from curlora.continual.methods import Adapted, FinishedTask
from curlora.continual.protocols import RunState
from curlora.continual.rundir import RunFileError, checkpoint_task, read_task_state
from curlora.data import TaskSplits
from curlora.fileio import atomic_write_bytes, atomic_write_json


def save_task(ckpt_dir: Path, adapted: Adapted, protocol: RunState, state: dict[str, Any]) -> None:
    """Tensors first, then the state that points at them: a half-written task is never read back."""
    i = state["tasks_done"]
    tensors = {f"model.{k}": v for k, v in adapted.checkpoint_tensors().items()}
    tensors.update({f"heads.{k}": v for k, v in protocol.state_dict().items()})
    atomic_write_bytes(ckpt_dir / f"task{i}.safetensors", save(tensors))
    atomic_write_json(ckpt_dir / f"task{i}.json", state)
    for older in range(1, i):
        (ckpt_dir / f"task{older}.safetensors").unlink(missing_ok=True)


def load_latest(ckpt_dir: Path, adapted: Adapted, protocol: RunState,
                tasks: Sequence[TaskSplits]) -> dict[str, Any] | None:
    """The state of the latest complete checkpoint, its tensors loaded into ``adapted`` and ``protocol``
    (and the method told which of ``tasks`` it finished); None if the run has none."""
    done = sorted(checkpoint_task(p) for p in ckpt_dir.glob("task*.json")) if ckpt_dir.is_dir() else []
    for i in reversed(done):
        tensors_path = ckpt_dir / f"task{i}.safetensors"
        if not tensors_path.is_file():
            continue
        state = read_task_state(ckpt_dir / f"task{i}.json", i)
        try:
            tensors = load_file(str(tensors_path))
            adapted.resume(i, [FinishedTask(t.train, j, protocol.loss) for j, t in enumerate(tasks[:i])])
            adapted.load_checkpoint({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
            protocol.load_state_dict({k[len("heads."):]: v for k, v in tensors.items() if k.startswith("heads.")})
        except (SafetensorError, RuntimeError, KeyError) as error:  # damaged, or another run's tensors
            raise RunFileError(f"{tensors_path} does not fit this run ({error}); delete {ckpt_dir} to "
                               f"train the run again.") from None
        return state
    return None
