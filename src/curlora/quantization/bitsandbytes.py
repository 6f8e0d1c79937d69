"""The bitsandbytes backend: ``int8`` (``bnb.nn.Linear8bitLt``, LLM.int8() row-wise absmax) and
``nf4`` / ``fp4`` (``bnb.nn.Linear4bit``, QLoRA's 4-bit formats, one absmax per block), on CPU and
CUDA. Models loaded with transformers' ``BitsAndBytesConfig`` hold the same layer types.

Importing this module installs two logging filters on bitsandbytes' loggers (it does not import
bitsandbytes): see ``quiet_bitsandbytes_import``.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from curlora.quantization.backend import QuantizationBackend

# bitsandbytes' notices that say nothing about a curlora run, by logger.
_NOTICES = {
    # On CPUs with avx512_bf16, importing bitsandbytes tries to fetch a fused 4-bit kernel from the
    # Hugging Face hub (the ``kernels`` package) and warns when it cannot. curlora switches that
    # fast path off on every 4-bit layer (see ``_undo_cpu_repack``), so it never uses the kernel.
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community",
    # Logged on every int8 forward in eval mode whose inputs are not float16.
    "bitsandbytes.autograd._functions": "inputs will be cast from",
}


class _DropNotice(logging.Filter):
    def __init__(self, fragment: str) -> None:
        super().__init__()
        self.fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        return self.fragment not in record.getMessage()


def quiet_bitsandbytes_import() -> None:
    """Drop bitsandbytes' two irrelevant notices (the kernels-community warning that importing
    bitsandbytes triggers, as PEFT up to 0.21 did whenever it was installed, and the int8 fp16-cast notice) and
    nothing else. Idempotent; does not import bitsandbytes. Runs when ``curlora`` is imported,
    so any program that imports curlora before PEFT or bitsandbytes is covered."""
    for logger_name, fragment in _NOTICES.items():
        logger = logging.getLogger(logger_name)
        if not any(isinstance(f, _DropNotice) and f.fragment == fragment for f in logger.filters):
            logger.addFilter(_DropNotice(fragment))


quiet_bitsandbytes_import()


def _bnb():
    """bitsandbytes if something imported it already (no module can be its layer otherwise)."""
    return sys.modules.get("bitsandbytes")


def _undo_cpu_repack(module: nn.Module) -> None:
    """bitsandbytes' NF4/FP4 trap on CPUs with avx512_bf16: the first no-grad forward repacks the
    weight in place, after which dequantization returns garbage and no gradient reaches the input.
    Undo a repack that already happened and switch the fast path off (training needs the plain
    layout anyway)."""
    module.support_avx512bf16_for_cpu = False
    state = getattr(module.weight, "quant_state", None)
    if state is not None and getattr(state, "packing_format_for_cpu", False):
        from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse

        module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
            module.weight.data, state
        )


class BitsAndBytesBackend(QuantizationBackend):
    name = "bitsandbytes"
    package = "bitsandbytes"
    schemes = ("int8", "nf4", "fp4")

    def handles(self, module: nn.Module) -> bool:
        bnb = _bnb()
        return bnb is not None and isinstance(module, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit))

    def _is_4bit(self, module: nn.Module) -> bool:
        bnb = _bnb()
        return bnb is not None and isinstance(module, bnb.nn.Linear4bit)

    def scheme(self, module: nn.Module) -> str:
        return module.weight.quant_type if self._is_4bit(module) else "int8"

    def dequantize(self, module: nn.Module) -> torch.Tensor:
        bnb = _bnb()
        weight = module.weight
        if self._is_4bit(module):
            _undo_cpu_repack(module)
            if weight.quant_state is None:  # not quantized yet (still on the meta/float path)
                return weight.data.detach().float()
            return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
        if weight.dtype != torch.int8:  # has_fp16_weights=True or not moved to a device yet
            return weight.data.detach().float()
        # The row scales live on the weight until the first forward, then in module.state.
        scb = getattr(weight, "SCB", None)
        if scb is None:
            scb = module.state.SCB
        if scb is None:
            raise RuntimeError("This Linear8bitLt has int8 weights but no row scales (SCB).")
        return bnb.functional.int8_vectorwise_dequant(weight.data, scb).float()

    def compute_dtype(self, module: nn.Module) -> torch.dtype:
        if self._is_4bit(module):
            if module.compute_dtype is not None:
                return module.compute_dtype
            state = module.weight.quant_state
            return state.dtype if state is not None else torch.float32
        if module.bias is not None and module.bias.dtype.is_floating_point:
            return module.bias.dtype
        return torch.float32

    def quantize_linear(self, weight: torch.Tensor, bias: torch.Tensor | None, scheme: str,
                        dtype: torch.dtype, device: torch.device, options: Mapping[str, Any]) -> nn.Module:
        """``options``: ``threshold`` (int8 outlier threshold, default 0: none), ``blocksize``
        (default 64) and ``double_quant`` (default False) for the 4-bit schemes."""
        bnb = self.load()
        out_features, in_features = weight.shape
        if scheme == "int8":
            layer = bnb.nn.Linear8bitLt(in_features, out_features, bias=bias is not None,
                                        has_fp16_weights=False, threshold=options.get("threshold", 0.0))
            layer.weight = bnb.nn.Int8Params(weight.to(dtype).contiguous(), requires_grad=False,
                                             has_fp16_weights=False)
        else:
            double_quant = bool(options.get("double_quant", False))
            layer = bnb.nn.Linear4bit(in_features, out_features, bias=bias is not None, compute_dtype=dtype,
                                      compress_statistics=double_quant, quant_type=scheme)
            layer.weight = bnb.nn.Params4bit(
                weight.to(dtype).contiguous(), requires_grad=False, quant_type=scheme,
                blocksize=options.get("blocksize", 64), compress_statistics=double_quant,
            )
            layer.support_avx512bf16_for_cpu = False
        if bias is not None:
            layer.bias = nn.Parameter(bias.to(dtype), requires_grad=False)
        return layer.to(device)  # moving to a device is what quantizes a bitsandbytes parameter

    def requantize_options(self, module: nn.Module) -> dict[str, Any]:
        if self._is_4bit(module):
            return {"blocksize": module.weight.blocksize, "double_quant": bool(module.weight.compress_statistics)}
        return {"threshold": float(module.state.threshold)}
