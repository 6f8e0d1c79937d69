"""Setting checks shared by every command's configuration, so a bad value is refused with one
clear line before any model or data is loaded (and before anything is written)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def integer(name: str, value: Any, minimum: int | None = None) -> None:
    """``value`` is an int (not a bool) of at least ``minimum``."""
    if not _is_int(value):
        raise ValueError(f"{name} must be an integer, got {value!r}.")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}.")


def integers(name: str, values: Iterable[Any], minimum: int | None = None) -> None:
    for value in values:
        integer(f"every value of {name}", value, minimum)


def got(value: Any) -> str:
    """The offending value, with the usual cause of a quoted number: YAML reads ``1e-3`` as a string."""
    hint = " (a string: YAML needs a dot, write 1.0e-3)" if isinstance(value, str) else ""
    return f"got {value!r}{hint}"


def positive(name: str, value: Any) -> None:
    """A finite number > 0 (learning rates, epochs): a negative rate would silently ascend the loss."""
    if not _is_number(value) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, {got(value)}.")


def non_negative(name: str, value: Any) -> None:
    if not _is_number(value) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number ≥ 0, {got(value)}.")


def finite(name: str, value: Any) -> None:
    if not _is_number(value) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, {got(value)}.")


def fraction(name: str, value: Any, low_open: bool = True, high_open: bool = True) -> None:
    """A number in the interval that the brackets describe, (0, 1) by default."""
    ok = _is_number(value) and (0 < value if low_open else 0 <= value) and (value < 1 if high_open else value <= 1)
    if not ok:
        interval = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
        raise ValueError(f"{name} must be in {interval}, {got(value)}.")


def device(value: Any, here: bool = True) -> None:
    """A device torch knows and (``here``) this machine has: ``cpu``, ``cuda``, ``cuda:1``, ``mps``, ...
    Not ``here``: the device of other machines (a Ray cluster's nodes), known by name only."""
    import torch

    try:
        parsed = torch.device(value)
    except (RuntimeError, TypeError):
        parsed = None
    if parsed is None or parsed.type not in DEVICE_TYPES:
        raise ValueError(f"Unknown device {value!r}; use cpu, cuda, cuda:<index>, mps or xpu.")
    if not here:
        return
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {value!r} asks for CUDA, which this machine does not have; use cpu.")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise ValueError(
            f"device {value!r}: this machine has {torch.cuda.device_count()} CUDA device(s) (indices from 0)."
        )


def identifier(name: str, value: Any) -> None:
    """A name that becomes a file or directory name (adapter names, method variants, run keys): non-empty,
    no path separator, no ``..``, no NUL, so it can never point outside the directory it is put in."""
    if not isinstance(value, str) or not value.strip() or value != value.strip():
        raise ValueError(f"{name} must be a non-empty name without surrounding spaces, got {value!r}.")
    if any(bad in value for bad in ("/", "\\", "\0", "..")) or value == ".":
        raise ValueError(f"{name} {value!r} would become a path: use a plain name (no '/', '\\', '..' or NUL).")


def looks_like_path(value: str) -> bool:
    """A value that can only mean a file or directory: absolute, ``.``/``~``-relative or a GGUF file."""
    return value.startswith((".", "~", "/")) or Path(value).is_absolute() or value.lower().endswith(".gguf")


def model_path(value: str | None) -> None:
    """A model given as a path must exist; hub ids (``org/name``) and known names pass through."""
    if value is None:
        return
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"model must be a hub id, a local directory or a .gguf file, got {value!r}.")
    if looks_like_path(value) and not Path(value).expanduser().exists():
        raise FileNotFoundError(
            f"model path {value} does not exist; pass an existing model directory or .gguf file, "
            f"a hub id such as org/name, or omit --model for the default model."
        )


def existing_file(name: str, value: str | Path) -> None:
    path = Path(value).expanduser()
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"{name} {path} {what}; pass the path of an existing file.")
