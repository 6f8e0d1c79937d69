"""Run-directory files read back on ``--resume``, and its lock: a run directory may come from someone
else (or be edited), so nothing in it is used before it is checked. Nothing in it is followed through a
symbolic link or read from a FIFO or device: a linked ``runs/`` or ``checkpoints/`` would have curlora
write and delete files wherever the link points, a FIFO would hang the command while it holds the lock.

Every refusal is a :class:`RunFileError` (a ValueError) naming the file, so the command prints it as
one line and exits with status 2.
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import re
import stat
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

import yaml

from curlora import boundedyaml
from curlora.continual.config import GRID_FIELDS, GRID_MAPPINGS, RUNTIME_FIELDS, ContinualConfig
from curlora.continual.config_checks import check_type
from curlora.continual.parallel import DataParallel
from curlora.fileio import atomic_write_json, atomic_write_text, read_regular

#: Entries a directory may hold and still take a fresh run: a lock left by a command killed before it
#: wrote ``config.yaml``.
FRESH_ENTRIES = {".lock"}


class RunFileError(ValueError):
    """A file of a run directory is damaged or out of range; the message names it."""


def open_lock(path: Path) -> IO[str]:
    """The lock file, opened for writing without following a link (a ``.lock`` that points elsewhere
    would have its target truncated) and only if it is a regular file."""
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise FileExistsError(f"{path} is a symbolic link; remove it (curlora never writes through "
                                  f"a link) and rerun.") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise FileExistsError(f"{path} is not a regular file; remove it and rerun.")
    return os.fdopen(fd, "r+")


def check_fresh(run_dir: Path) -> None:
    """A new run may go only into a new or empty directory: never mix its files with other files."""
    if run_dir.is_dir() and {entry.name for entry in run_dir.iterdir()} - FRESH_ENTRIES:
        raise FileExistsError(f"--output-dir {run_dir} holds files but no curlora run (no config.yaml); "
                              f"choose a new or empty directory.")


def check_tree(run_dir: Path) -> None:
    """Every entry under ``run_dir`` is a real directory or a regular file (no link, FIFO, device or
    socket), and every checkpoint file is named as curlora names them: checked before a run resumes."""
    stack = [run_dir]
    while stack:  # not os.walk: a directory nested thousands deep must not end in a RecursionError
        directory = stack.pop()
        for entry in os.scandir(directory):
            path = Path(entry.path)
            if entry.is_dir(follow_symlinks=False):
                stack.append(path)
            elif not entry.is_file(follow_symlinks=False):
                what = "a symbolic link" if entry.is_symlink() else "not a regular file"
                raise RunFileError(f"{path} is {what}; curlora reads and writes only real files in a run "
                                   f"directory: remove it and rerun.")
            elif path.parent.parent == run_dir / "checkpoints" and path.name.startswith("task"):
                checkpoint_task(path)


def checkpoint_task(path: Path) -> int:
    """The number of tasks done that a checkpoint file ``task<N>.json`` / ``task<N>.safetensors`` holds."""
    match = re.fullmatch(r"task([0-9]{1,6})\.(json|safetensors)", path.name)
    if match is None:
        raise RunFileError(f"{path} is not a curlora checkpoint (task<N>.json or task<N>.safetensors); "
                           f"remove it and rerun.")
    return int(match.group(1))


def read_json(path: Path) -> Any:
    """The JSON in ``path``; RunFileError naming it if it is unreadable or holds a NaN (Python writes an
    infinite perplexity as Infinity: the readers below say where one may stand)."""
    def constant(name: str) -> float:
        if name == "NaN":
            raise ValueError("NaN is not a number")
        return float(name)

    try:
        return json.loads(_read(path), parse_constant=constant)
    except (ValueError, UnicodeDecodeError) as error:  # JSONDecodeError is a ValueError
        raise RunFileError(f"{path} is damaged ({error}); delete it to compute it again.") from None
    except RecursionError:
        raise RunFileError(f"{path} is damaged (nested too deep); delete it to compute it again.") from None


def _read(path: Path) -> bytes:
    try:
        return read_regular(path)
    except OSError as error:
        reason = "a symbolic link" if error.errno == errno.ELOOP else (error.strerror or str(error))
        raise RunFileError(f"{path} cannot be read ({reason}); curlora reads only regular files in a run "
                           f"directory.") from None


def read_config(path: Path) -> dict[str, Any]:
    """The saved ``config.yaml`` of a run: a mapping whose known fields have their types (nesting and
    aliases bounded as in any config file)."""
    try:
        loaded, _ = boundedyaml.compose(_read(path).decode("utf-8"))
    except UnicodeDecodeError as error:
        raise RunFileError(f"{path} is damaged: {error}") from None
    except yaml.YAMLError as error:
        raise RunFileError(f"{boundedyaml.describe(error, path)}; it is damaged.") from None
    loaded = {} if loaded is None else loaded
    if not isinstance(loaded, dict):
        raise RunFileError(f"{path} must be a mapping of config fields, got {type(loaded).__name__}.")
    hints = typing.get_type_hints(ContinualConfig)
    for name, value in loaded.items():
        if name in hints:
            try:
                check_type(name, value, hints[name])
            except ValueError as error:
                raise RunFileError(f"{path}: {error}") from None
    return loaded


def _number(path: Path, field: str, value: Any, low: float, high: float = math.inf,
            none: bool = False, infinite: bool = False) -> None:
    """``value`` is a number in [low, high] (finite unless ``infinite``), or None if ``none``."""
    if value is None and none:
        return
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high
          and (infinite or math.isfinite(value)))
    if not ok:
        raise RunFileError(f"{path}: {field} must be a number in [{low:g}, {high:g}], got {value!r}; "
                           f"delete the file to compute it again.")


def _list(path: Path, field: str, value: Any, length: int) -> list:
    if not isinstance(value, list) or len(value) != length:
        raise RunFileError(f"{path}: {field} must be a list of {length}, got {value!r}.")
    return value


def read_perplexity(path: Path) -> float:
    """A cached perplexity (``{"value": P}``): finite and at least 1, as any perplexity is."""
    data = read_json(path)
    value = data.get("value") if isinstance(data, dict) else None
    _number(path, "value", value, 1.0)
    return float(value)


def _accuracy_rows(path: Path, rows: Any, count: int) -> None:
    for j, row in enumerate(_list(path, "accuracy_matrix", rows, count)):
        if not isinstance(row, list):
            raise RunFileError(f"{path}: accuracy_matrix[{j}] must be a list, got {row!r}.")
        for value in row:
            _number(path, f"accuracy_matrix[{j}]", value, 0.0, 1.0, none=True)


def read_task_state(path: Path, tasks_done: int) -> dict[str, Any]:
    """A checkpoint's state after ``tasks_done`` tasks: every key present, every number in range (a
    perplexity may be infinite: a diverged adapter's)."""
    state = read_json(path)
    keys = ("accuracy_matrix", "ppl_after_task", "final_losses", "elapsed_s", "tasks_done")
    if not isinstance(state, dict) or set(keys) - set(state):
        raise RunFileError(f"{path} must hold {', '.join(keys)}.")
    if state["tasks_done"] != tasks_done:
        raise RunFileError(f"{path}: tasks_done must be {tasks_done}, got {state['tasks_done']!r}.")
    _accuracy_rows(path, state["accuracy_matrix"], tasks_done + 1)
    for value in _list(path, "ppl_after_task", state["ppl_after_task"], tasks_done):
        _number(path, "ppl_after_task", value, 1.0, none=True, infinite=True)
    for value in _list(path, "final_losses", state["final_losses"], tasks_done):
        _number(path, "final_losses", value, 0.0, none=True)  # None: a floor that trains nothing
    for j, steps in enumerate(_list(path, "train_loss", state.get("train_loss", [[]] * tasks_done), tasks_done)):
        if not isinstance(steps, list):
            raise RunFileError(f"{path}: train_loss[{j}] must be a list of step losses, got {steps!r}.")
        for value in steps:
            _number(path, f"train_loss[{j}]", value, 0.0)
    _number(path, "elapsed_s", state["elapsed_s"], 0.0)
    return state


def read_run(path: Path, tasks: int) -> dict[str, Any]:
    """A finished run's result (``runs/<key>.json``) over ``tasks`` tasks, checked as it is reported."""
    run = read_json(path)
    if not isinstance(run, dict) or run.get("status") not in ("ok", "failed") or not isinstance(run.get("method"), str):
        raise RunFileError(f"{path} must be a run result with a method and a status ('ok' or 'failed').")
    if run["status"] == "ok":
        _accuracy_rows(path, run.get("accuracy_matrix"), tasks + 1)
        perplexity = run.get("perplexity")
        if not isinstance(perplexity, dict):
            raise RunFileError(f"{path}: perplexity must be a mapping, got {perplexity!r}.")
        _number(path, "perplexity.before", perplexity.get("before"), 1.0)
        for value in _list(path, "perplexity.after_task", perplexity.get("after_task"), tasks):
            _number(path, "perplexity.after_task", value, 1.0, none=True, infinite=True)
    return run


class RunDir:
    """A run directory's life: checked (reading only) before any work, created and locked once the model
    and the data passed their checks, then holding each finished run's result, the base model's
    perplexity and the runs' checkpoints. Only rank 0 writes; every rank waits for its writes."""

    def __init__(self, path: str | Path, parallel: DataParallel | None = None) -> None:
        self.path = Path(path)
        self.parallel = parallel or DataParallel()
        self.fresh = not (self.path / "config.yaml").is_file()  # no run there yet
        self.regrid = False  # a resumed run whose grid changed: config.yaml is written again
        self._lock: IO[str] | None = None  # held while this command runs

    @property
    def runs(self) -> Path:
        return self.path / "runs"

    def check(self, config: ContinualConfig, resume: bool) -> None:
        """Refuse a directory that cannot take ``config``'s run. It only reads: a refused command leaves an
        existing directory byte-identical, and nothing is created until every check has passed."""
        if self.path.exists() and not self.path.is_dir():
            raise FileExistsError(f"--output-dir {self.path} is a file; choose a directory.")
        saved = self.path / "config.yaml"
        self.fresh = not saved.is_file()
        if self.fresh:
            check_fresh(self.path)
            return
        if not resume:
            raise FileExistsError(
                f"{self.path} already holds a run; pass --resume to continue it, or choose "
                f"another --output-dir."
            )
        check_tree(self.path)
        loaded, changed = self.differences(config)
        if changed:
            raise ValueError(
                f"Cannot resume {self.path}: its config differs in {'; '.join(changed)}. Resume with the "
                f"same settings (only {', '.join(GRID_FIELDS)} may change, to add or drop runs, and new "
                f"entries of {', '.join(GRID_MAPPINGS)}), or start a new --output-dir."
            )
        # More seeds, rates or methods: the finished runs stay valid, and config.yaml will say the new grid.
        current = config.to_dict()
        self.regrid = any(loaded.get(k) != current[k] for k in GRID_FIELDS + GRID_MAPPINGS)

    def differences(self, config: ContinualConfig) -> tuple[dict[str, Any], list[str]]:
        """This directory's saved config (a field added since it was made counts as its default) and the
        settings in which ``config`` computes its runs differently: the fields that are neither how a run
        is executed nor which runs there are, and the per-method entries both name."""
        loaded = {**ContinualConfig().to_dict(), **read_config(self.path / "config.yaml")}
        current = config.to_dict()
        fixed = [k for k in current if k not in RUNTIME_FIELDS + GRID_FIELDS + GRID_MAPPINGS]
        changed = [f"{k} ({loaded.get(k)!r} there, {current[k]!r} here)" for k in fixed if loaded.get(k) != current[k]]
        changed += [f"{k}[{name!r}] ({value!r} there, {current[k][name]!r} here)" for k in GRID_MAPPINGS
                    for name, value in (loaded.get(k) or {}).items() if name in current[k] and current[k][name] != value]
        return loaded, sorted(changed)

    def reusable(self, config: ContinualConfig, keys: Iterable[str]) -> dict[str, dict[str, Any]]:
        """The finished runs among ``keys`` that this directory (another experiment's) holds, checked as
        any run file is, for a run directory of ``config`` to take as its own: refused unless this one's
        runs were computed with the same settings (a run's file name says its method, rank, rate, seed
        and order; its config, everything else)."""
        if not (self.path / "config.yaml").is_file():
            raise FileNotFoundError(f"--reuse-runs-from {self.path} holds no curlora run (no config.yaml); "
                                    f"name an experiment's run directory.")
        check_tree(self.path)
        _, changed = self.differences(config)
        if changed:
            raise ValueError(f"Cannot reuse the runs of {self.path}: its config differs in {'; '.join(changed)}, so its runs "
                             f"are not this experiment's; drop --reuse-runs-from or match those settings.")
        tasks = len(config.task_names)
        runs = {key: read_run(self.runs / f"{key}.json", tasks) for key in sorted(set(keys) & self.finished())}
        return {key: run for key, run in runs.items() if run["status"] == "ok"}  # a failed run is tried again

    def create(self, config: ContinualConfig) -> None:
        """Write ``config.yaml`` of a fresh run (or a resumed one's new grid), under the lock."""
        # Every rank looked (in check) before this barrier, so none mistakes this run for an old one.
        self.parallel.barrier()
        if (self.fresh or self.regrid) and self.parallel.is_main:
            self.path.mkdir(parents=True, exist_ok=True)
            self.lock()  # before anything is written: a second command must not replace config.yaml
            atomic_write_text(self.path / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))
        self.parallel.barrier()

    def lock(self) -> None:
        """Hold an exclusive lock on the directory until :meth:`unlock` or the process ends (the kernel
        drops it however the process ends): a second command on the same directory would train the
        same runs again and overwrite their files."""
        if not self.parallel.is_main or self._lock is not None:
            return
        self._lock = open_lock(self.path / ".lock")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.seek(0)
            holder = self._lock.read().strip() or "unknown"
            self.unlock()
            raise FileExistsError(
                f"{self.path} is in use by a running curlora command (pid {holder}); wait for it to "
                f"finish, or stop it (its finished runs are kept) and rerun with --resume."
            ) from None
        if self.fresh and (self.path / "config.yaml").exists():
            self.unlock()
            raise FileExistsError(f"another curlora command started a run in {self.path} while this one was "
                                  f"preparing; choose another --output-dir, or --resume that run.")
        self._lock.truncate(0)
        self._lock.write(str(os.getpid()))
        self._lock.flush()

    def unlock(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def base_perplexity(self) -> float | None:
        """The base model's perplexity as a command on this directory measured it, or None."""
        path = self.path / "base_perplexity.json"
        return read_perplexity(path) if path.is_file() else None

    def save_base_perplexity(self, value: float) -> None:
        """Keep the first measured value: every later command on this directory reads it back."""
        if self.parallel.is_main and not (self.path / "base_perplexity.json").is_file():
            atomic_write_json(self.path / "base_perplexity.json", {"value": value})

    def checkpoint_dir(self, key: str) -> Path:
        return self.path / "checkpoints" / key

    def finished(self) -> set[str]:
        """The keys of the runs with a result file."""
        return {p.stem for p in self.runs.glob("*.json") if p.is_file()} if self.runs.is_dir() else set()

    def save_result(self, key: str, result: dict[str, Any]) -> None:
        """A finished run's result as ``runs/<key>.json``: from then on --resume skips the run."""
        if self.parallel.is_main:
            atomic_write_json(self.runs / f"{key}.json", result)
        self.parallel.barrier()

    def read_results(self, keys: Iterable[str], tasks: int) -> list[dict[str, Any]]:
        """The results of the runs ``keys`` (each over ``tasks`` tasks), checked as they are reported."""
        return [read_run(self.runs / f"{key}.json", tasks) for key in keys]
