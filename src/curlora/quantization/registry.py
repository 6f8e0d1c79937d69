"""The registered quantization backends and the functions the core calls: each finds the
backend that offers a scheme or recognises a layer, so the core never names a library."""

from __future__ import annotations

import torch
from torch import nn

from curlora.quantization.backend import QuantizationBackend
from curlora.quantization.bitsandbytes import BitsAndBytesBackend
from curlora.submodules import replace_submodule

_BACKENDS: list[QuantizationBackend] = []


def register_backend(backend: QuantizationBackend) -> None:
    """Add a backend; its scheme names must be new."""
    taken = set(schemes()) & set(backend.schemes)
    if taken:
        raise ValueError(f"Backend {backend.name!r} offers scheme(s) {sorted(taken)} that another backend has.")
    _BACKENDS.append(backend)


def schemes() -> tuple[str, ...]:
    """Every scheme a registered backend offers (installed or not)."""
    return tuple(s for backend in _BACKENDS for s in backend.schemes)


def backend_for_scheme(scheme: str) -> QuantizationBackend:
    """The backend offering ``scheme``; ValueError naming the choices otherwise."""
    for backend in _BACKENDS:
        if scheme in backend.schemes:
            return backend
    raise ValueError(f"Unknown quantization scheme {scheme!r}; choose one of {schemes()}.")


def require_scheme(scheme: str) -> QuantizationBackend:
    """``backend_for_scheme`` with its library imported: call before any work that will quantize,
    so an unknown scheme or a missing extra fails first (``pip install 'curlora[quant]'``)."""
    backend = backend_for_scheme(scheme)
    backend.load()
    return backend


def backend_of(module: nn.Module) -> QuantizationBackend | None:
    """The backend whose quantized linear layer ``module`` is, or None (imports no library)."""
    return next((backend for backend in _BACKENDS if backend.handles(module)), None)


def _backend_of(module: nn.Module) -> QuantizationBackend:
    backend = backend_of(module)
    if backend is None:
        raise TypeError(f"{type(module).__name__} is not a quantized linear layer curlora can read.")
    return backend


def is_quantized_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a quantized linear layer whose weight CURLoRA can read."""
    return backend_of(module) is not None


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The layer's weight as an out × in float32 tensor (a new tensor; the module is unchanged)."""
    return _backend_of(module).dequantize(module)


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The dtype a quantized layer computes in, which is the dtype C and R are stored in: the
    original float dtype when ``quantize_model`` built the layer, else what the backend reads."""
    recorded = getattr(module, "curlora_compute_dtype", None)
    return recorded if recorded is not None else _backend_of(module).compute_dtype(module)


def quantization_scheme(module: nn.Module) -> str:
    """The scheme of a quantized layer (``"int8"``, ``"nf4"``, ...)."""
    return _backend_of(module).scheme(module)


def _quantize_linear(backend: QuantizationBackend, weight: torch.Tensor, bias: torch.Tensor | None,
                     scheme: str, dtype: torch.dtype, device: torch.device, options: dict,
                     training: bool) -> nn.Module:
    layer = backend.quantize_linear(weight, bias, scheme, dtype, device, options)
    layer.curlora_compute_dtype = dtype
    return layer.train(training)  # on CPU, bnb int8 runs a different kernel in training mode


def quantize_model(
    model: nn.Module,
    scheme: str,
    skip_modules: tuple[str, ...] | list[str] = ("lm_head",),
    blocksize: int = 64,
    double_quant: bool = False,
) -> nn.Module:
    """Quantize every ``nn.Linear`` of ``model`` in place with ``scheme`` and return the model.

    ``scheme``: one of ``schemes()`` (bitsandbytes: ``"int8"``, ``"nf4"``, ``"fp4"``). Layers whose
    name ends with an entry of ``skip_modules`` stay in full precision (``lm_head`` by default: it
    is often tied to the embeddings). ``blocksize`` / ``double_quant`` apply to the 4-bit schemes.
    Each layer computes in its original dtype (float32 or bf16) and stays on its device.
    """
    backend = require_scheme(scheme)
    options = {"blocksize": blocksize, "double_quant": double_quant}
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if type(module) is nn.Linear and not any(name == s or name.endswith("." + s) for s in skip_modules)
    ]
    for name, module in targets:
        bias = None if module.bias is None else module.bias.detach().cpu()
        new = _quantize_linear(backend, module.weight.detach().cpu(), bias, scheme, module.weight.dtype,
                               module.weight.device, options, module.training)
        replace_submodule(model, name, new)
    config = getattr(model, "config", None)
    if config is not None:
        config.curlora_quantization = {"scheme": scheme, **options}
    return model


def merge_quantized(module: nn.Module, delta_out_in: torch.Tensor | None, requantize: bool = False) -> nn.Module:
    """A new layer with weight dequantize(W) + ΔW (``delta_out_in``: out × in, or None for none).

    ``requantize=False``: a full-precision ``nn.Linear`` in the layer's compute dtype (exact merge;
    the model grows back to full-precision size for these layers). ``requantize=True``: the merged
    weight quantized again with the layer's own scheme and options (same block size, ...): the
    memory stays small but W + ΔW is rounded again, and since ΔW is far smaller than one
    quantization step most of it is lost (see docs/quantization.md for the measured error).
    """
    backend = _backend_of(module)
    weight = backend.dequantize(module)
    if delta_out_in is not None:
        weight = weight + delta_out_in.to(device=weight.device, dtype=torch.float32)
    dtype = compute_dtype(module)
    bias = None if module.bias is None else module.bias.detach()
    device = weight.device
    if requantize:
        cpu_bias = None if bias is None else bias.cpu()
        return _quantize_linear(backend, weight.cpu(), cpu_bias, backend.scheme(module), dtype, device,
                                backend.requantize_options(module), module.training)
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
            replace_submodule(model, name, merge_quantized(module, None))
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


register_backend(BitsAndBytesBackend())
