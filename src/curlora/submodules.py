"""Swapping one submodule of a model for another, by its dotted name."""

from __future__ import annotations

from torch import nn


def replace_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where ``model.get_submodule(name)`` was (``name`` as ``named_modules`` gives it)."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
