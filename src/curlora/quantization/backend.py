"""What a quantization library must provide for CURLoRA to adapt, merge and build its layers.

One subclass per library (``curlora.quantization.bitsandbytes`` is the first); the registry
(``curlora.quantization.registry``) asks each registered backend in turn, so the core never
names a library.
"""

from __future__ import annotations

import importlib
import importlib.util
from abc import ABC, abstractmethod
from collections.abc import Mapping
from types import ModuleType
from typing import Any

import torch
from torch import nn


class QuantizationBackend(ABC):
    """A quantization library: the schemes it offers and how to read and build its layers."""

    #: Short name shown in messages, e.g. ``"bitsandbytes"``.
    name: str
    #: The importable package the backend needs (checked without importing it).
    package: str
    #: Scheme names ``quantize_model`` accepts for this backend, e.g. ``("int8", "nf4")``.
    schemes: tuple[str, ...]
    #: The pip extra that installs ``package``.
    extra: str = "quant"

    def is_installed(self) -> bool:
        """Whether ``package`` can be imported (without importing it)."""
        return importlib.util.find_spec(self.package) is not None

    def load(self) -> ModuleType:
        """Import ``package``; a clear error naming the extra when it is missing."""
        try:
            return importlib.import_module(self.package)
        except ImportError as error:
            raise ImportError(
                f"Quantizing with {self.name} needs the {self.package!r} package: "
                f"pip install 'curlora[{self.extra}]'"
            ) from error

    @abstractmethod
    def handles(self, module: nn.Module) -> bool:
        """Whether ``module`` is one of this library's quantized linear layers. Must not import
        the library: no module can be its layer before something else imported it."""

    @abstractmethod
    def scheme(self, module: nn.Module) -> str:
        """The scheme ``module`` is quantized with (one of ``schemes``)."""

    @abstractmethod
    def dequantize(self, module: nn.Module) -> torch.Tensor:
        """The layer's weight as a new out × in float32 tensor (the module is left unchanged,
        apart from undoing library layouts that would make the result wrong)."""

    @abstractmethod
    def compute_dtype(self, module: nn.Module) -> torch.dtype:
        """The dtype the layer computes in (C and R are stored in it)."""

    @abstractmethod
    def quantize_linear(self, weight: torch.Tensor, bias: torch.Tensor | None, scheme: str,
                        dtype: torch.dtype, device: torch.device, options: Mapping[str, Any]) -> nn.Module:
        """A quantized layer holding ``weight`` (out × in, on the CPU) computing in ``dtype``, on
        ``device``. ``options``: ``quantize_model``'s keyword arguments (ignore those that do not
        apply to ``scheme``)."""

    @abstractmethod
    def requantize_options(self, module: nn.Module) -> dict[str, Any]:
        """The ``options`` that quantize a new weight the way ``module`` was (block size, ...)."""
