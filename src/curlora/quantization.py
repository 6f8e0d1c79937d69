"""QCURLoRA: CURLoRA adapters on a base model whose linear layers are quantized.

The base layers are quantized by bitsandbytes (``pip install bitsandbytes``), which runs the
same modules on CPU and on CUDA GPUs:

* ``"int8"``: ``bnb.nn.Linear8bitLt`` (LLM.int8(), row-wise absmax int8 weights);
* ``"nf4"`` / ``"fp4"``: ``bnb.nn.Linear4bit`` (QLoRA's 4-bit NormalFloat / 4-bit float, one
  absmax per 64 weights; ``double_quant=True`` quantizes those absmax values too).

``quantize_model(model, "nf4")`` swaps every ``nn.Linear`` (except ``lm_head`` by default) for
its quantized counterpart in place. Models loaded with transformers'
``BitsAndBytesConfig`` hold the same module types, so CURLoRA adapts them as well.

CURLoRA never changes a quantized weight: C and R are cut from the dequantized weight
(``dequantized_weight``, out × in, float32; sampling probabilities are float32 as always) and
stored in the layer's compute dtype, U is float32, and the quantized tensors stay
bit-identical through training, saving and loading. Merging needs a new weight, so it happens
only in ``merge_and_unload(requantize=...)`` (see ``merge_quantized``).
"""

from __future__ import annotations

import logging
import sys

import torch
from torch import nn

SCHEMES: tuple[str, ...] = ("int8", "nf4", "fp4")
_INSTALL = "pip install bitsandbytes"


def _bnb():
    """The bitsandbytes module if it has been imported (no module can be a bnb layer otherwise)."""
    return sys.modules.get("bitsandbytes")


class _DropFp16CastNotice(logging.Filter):
    """bitsandbytes logs "inputs will be cast ... to float16" on every int8 eval forward."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "inputs will be cast from" not in record.getMessage()


class _DropKernelsNotice(logging.Filter):
    """bitsandbytes warns on import, on AVX512-BF16 CPUs, that the optional ``kernels`` package is missing
    and falls back to its own 4-bit kernel: noise on every command (peft imports it), quantizing or not."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "from kernels-community" not in record.getMessage()


# Installed before anything imports bitsandbytes (importing curlora imports this module first).
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropKernelsNotice())


def _import_bnb():
    try:
        import bitsandbytes
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(f"Quantized base layers need bitsandbytes: run `{_INSTALL}`.") from error
    notice_logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _DropFp16CastNotice) for f in notice_logger.filters):
        notice_logger.addFilter(_DropFp16CastNotice())
    return bitsandbytes


def is_quantized_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a quantized linear layer whose weight CURLoRA can read (bitsandbytes)."""
    bnb = _bnb()
    return bnb is not None and isinstance(module, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit))


def _fix_cpu_repack(module: nn.Module) -> None:
    """bitsandbytes' NF4/FP4 trap on CPUs with avx512_bf16: the first no-grad forward repacks the
    weight in place, after which dequantization returns garbage and no gradient reaches the input.
    Undo a repack that already happened and switch the fast path off (training needs the plain
    layout anyway)."""
    bnb = _bnb()
    if bnb is None or not isinstance(module, bnb.nn.Linear4bit):
        return
    module.support_avx512bf16_for_cpu = False
    state = getattr(module.weight, "quant_state", None)
    if state is not None and getattr(state, "packing_format_for_cpu", False):
        from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse

        module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
            module.weight.data, state
        )


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The layer's weight as an out × in float32 tensor (a new tensor; the module is unchanged)."""
    bnb = _bnb()
    if bnb is not None and isinstance(module, bnb.nn.Linear4bit):
        _fix_cpu_repack(module)
        weight = module.weight
        if weight.quant_state is None:  # not quantized yet (still on the meta/float path)
            return weight.data.detach().float()
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
    if bnb is not None and isinstance(module, bnb.nn.Linear8bitLt):
        weight = module.weight
        if weight.dtype != torch.int8:  # has_fp16_weights=True or not moved to a device yet
            return weight.data.detach().float()
        # The row scales live on the weight until the first forward, then in module.state.
        scb = getattr(weight, "SCB", None)
        if scb is None:
            scb = module.state.SCB
        if scb is None:
            raise RuntimeError("This Linear8bitLt has int8 weights but no row scales (SCB).")
        return bnb.functional.int8_vectorwise_dequant(weight.data, scb).float()
    raise TypeError(f"{type(module).__name__} is not a quantized linear layer curlora can read.")


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The dtype a quantized layer computes in, which is the dtype C and R are stored in."""
    recorded = getattr(module, "curlora_compute_dtype", None)
    if recorded is not None:
        return recorded
    bnb = _bnb()
    if bnb is not None and isinstance(module, bnb.nn.Linear4bit):
        if module.compute_dtype is not None:
            return module.compute_dtype
        state = module.weight.quant_state
        return state.dtype if state is not None else torch.float32
    if module.bias is not None and module.bias.dtype.is_floating_point:
        return module.bias.dtype
    return torch.float32


def _float_weight(linear: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    bias = None if linear.bias is None else linear.bias.detach().cpu()
    return linear.weight.detach().cpu(), bias


def _quantize_linear(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    scheme: str,
    dtype: torch.dtype,
    device: torch.device,
    blocksize: int = 64,
    double_quant: bool = False,
    threshold: float = 0.0,
) -> nn.Module:
    """A bitsandbytes layer holding ``weight`` (out × in, any float dtype, on the CPU) quantized."""
    bnb = _import_bnb()
    out_features, in_features = weight.shape
    if scheme == "int8":
        layer = bnb.nn.Linear8bitLt(
            in_features, out_features, bias=bias is not None, has_fp16_weights=False, threshold=threshold
        )
        layer.weight = bnb.nn.Int8Params(weight.to(dtype).contiguous(), requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(
            in_features, out_features, bias=bias is not None, compute_dtype=dtype,
            compress_statistics=double_quant, quant_type=scheme,
        )
        layer.weight = bnb.nn.Params4bit(
            weight.to(dtype).contiguous(), requires_grad=False, quant_type=scheme,
            blocksize=blocksize, compress_statistics=double_quant,
        )
        layer.support_avx512bf16_for_cpu = False
    if bias is not None:
        layer.bias = nn.Parameter(bias.to(dtype), requires_grad=False)
    layer.curlora_compute_dtype = dtype
    return layer.to(device)  # moving to a device is what quantizes a bitsandbytes parameter


def quantize_model(
    model: nn.Module,
    scheme: str,
    skip_modules: tuple[str, ...] | list[str] = ("lm_head",),
    blocksize: int = 64,
    double_quant: bool = False,
) -> nn.Module:
    """Quantize every ``nn.Linear`` of ``model`` in place with ``scheme`` and return the model.

    ``scheme``: ``"int8"``, ``"nf4"`` or ``"fp4"`` (see the module docstring). Layers whose name
    ends with an entry of ``skip_modules`` stay in full precision (``lm_head`` by default: it is
    often tied to the embeddings). ``blocksize`` / ``double_quant`` apply to the 4-bit schemes.
    Each layer computes in its original dtype (float32 or bf16) and stays on its device.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"Unknown quantization scheme {scheme!r}; choose one of {SCHEMES}.")
    _import_bnb()
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if type(module) is nn.Linear and not any(name == s or name.endswith("." + s) for s in skip_modules)
    ]
    for name, module in targets:
        weight, bias = _float_weight(module)
        new = _quantize_linear(
            weight, bias, scheme, module.weight.dtype, module.weight.device, blocksize, double_quant
        )
        new.train(module.training)  # on CPU, bnb int8 runs a different kernel in training mode
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    config = getattr(model, "config", None)
    if config is not None:
        config.curlora_quantization = {"scheme": scheme, "blocksize": blocksize, "double_quant": double_quant}
    return model


def quantization_scheme(module: nn.Module) -> str:
    """``"int8"``, ``"nf4"`` or ``"fp4"`` for a quantized layer."""
    bnb = _bnb()
    if bnb is not None and isinstance(module, bnb.nn.Linear4bit):
        return module.weight.quant_type
    if is_quantized_linear(module):
        return "int8"
    raise TypeError(f"{type(module).__name__} is not a quantized linear layer.")


def merge_quantized(module: nn.Module, delta_out_in: torch.Tensor | None, requantize: bool = False) -> nn.Module:
    """A new layer with weight dequantize(W) + ΔW (``delta_out_in``: out × in, or None for none).

    ``requantize=False``: a full-precision ``nn.Linear`` in the layer's compute dtype (exact merge;
    the model grows back to full-precision size for these layers). ``requantize=True``: the merged
    weight quantized again with the layer's own scheme (int8 / nf4 / fp4, same block size): the
    memory stays small but W + ΔW is rounded again, and since ΔW is far smaller than one
    quantization step most of it is lost (see docs/quantization.md for the measured error).
    """
    if not is_quantized_linear(module):
        raise TypeError(f"{type(module).__name__} is not a quantized linear layer.")
    weight = dequantized_weight(module)
    if delta_out_in is not None:
        weight = weight + delta_out_in.to(device=weight.device, dtype=torch.float32)
    dtype = compute_dtype(module)
    bias = None if module.bias is None else module.bias.detach()
    device = weight.device
    if requantize:
        scheme = quantization_scheme(module)
        options = {}
        if scheme == "int8":
            options["threshold"] = float(module.state.threshold)
        else:
            options["blocksize"] = module.weight.blocksize
            options["double_quant"] = bool(module.weight.compress_statistics)
        cpu_bias = None if bias is None else bias.cpu()
        return _quantize_linear(weight.cpu(), cpu_bias, scheme, dtype, device, **options).train(module.training)
    out_features, in_features = weight.shape
    linear = nn.Linear(in_features, out_features, bias=bias is not None, device=device, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear.requires_grad_(False).train(module.training)


def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace every quantized linear of ``model`` by a full-precision ``nn.Linear`` (in place)."""
    for name, module in list(model.named_modules()):
        if name and is_quantized_linear(module):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, merge_quantized(module, None))
    return model


def quantized_weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's state dict as stored (quantized weights plus their scales), each
    shared tensor (a tied embedding) counted once. ``get_memory_footprint`` is not reliable for
    quantized models."""
    seen, total = set(), 0
    for value in model.state_dict().values():
        if not isinstance(value, torch.Tensor):
            continue
        key = (value.untyped_storage().data_ptr(), value.dtype, tuple(value.shape))
        if key not in seen:
            seen.add(key)
            total += value.numel() * value.element_size()
    return total
