"""The adapter layer: a frozen base projection plus alpha · x (C U R)ᵀ, computed factored.

Only U (r × r, zero at start) trains. C and R are copies of sampled columns/rows of the base
weight, kept as non-persistent buffers in the base weight's dtype: they are rebuilt from the base
weight and the saved indices, so they never enter a state dict or an optimizer.

Two forward paths compute the same thing: a fused autograd node for plain frozen layers (the
fast path, see ``_FusedCURLinear``) and ``base(x) + adapter(x)`` op by op for everything else
(quantized bases, adapter dropout, hooked base layers).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from curlora.quantization import compute_dtype, dequantized_weight, is_quantized_linear, schemes

SUPPORTED_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, Conv1D)
_STOCK_FORWARDS = (nn.Linear.forward, Conv1D.forward)


def weight_out_in(base: nn.Module) -> torch.Tensor:
    """The base weight as an out × in matrix (a view: GPT-2's Conv1D stores it in × out).

    For a quantized linear (see ``curlora.quantization``) it is a dequantized float32 copy."""
    if is_quantized_linear(base):
        return dequantized_weight(base)
    if isinstance(base, Conv1D):
        return base.weight.t()
    if isinstance(base, nn.Linear):
        return base.weight
    raise TypeError(
        f"CURLoRA can adapt nn.Linear, transformers Conv1D and quantized linear layers "
        f"(curlora.quantization schemes {schemes()}), not {type(base).__name__}."
    )


def cur_source_weight(base: nn.Module) -> torch.Tensor:
    """The out × in weight C and R are cut from: ``weight_out_in``, in the compute dtype of a
    quantized layer (its dequantized weight is float32)."""
    weight = weight_out_in(base)
    return weight.to(compute_dtype(base)) if is_quantized_linear(base) else weight


class CURAdapter(nn.Module):
    """One named adapter's tensors: trainable U, frozen C and R, and the indices they came from."""

    def __init__(
        self,
        weight: torch.Tensor,
        cols: torch.Tensor,
        rows: torch.Tensor,
        alpha: float,
        dropout: float,
        normalize: bool = False,
    ) -> None:
        super().__init__()
        r = cols.numel()
        self.alpha = alpha
        self.normalize = normalize
        self.register_buffer("cols", cols.to(device=weight.device, dtype=torch.long))
        self.register_buffer("rows", rows.to(device=weight.device, dtype=torch.long))
        self.set_sources(weight)
        self.U = nn.Parameter(torch.zeros(r, r, device=weight.device, dtype=torch.float32))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @torch.no_grad()
    def set_sources(self, weight: torch.Tensor) -> None:
        """Cut C and R from ``weight`` (out × in) at the stored indices; with ``normalize``, also the
        r × r factor that rescales C's columns and R's rows to unit norm."""
        self.register_buffer("C", weight[:, self.cols].contiguous(), persistent=False)
        self.register_buffer("R", weight[self.rows, :].contiguous(), persistent=False)
        if self.normalize:
            col = self.C.float().norm(dim=0).clamp_min(torch.finfo(torch.float32).tiny)
            row = self.R.float().norm(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
            self.register_buffer("u_scale", torch.outer(col.reciprocal(), row.reciprocal()), persistent=False)

    def effective_u(self) -> torch.Tensor:
        """U as it multiplies C and R. With ``normalize`` (C, R with unit-norm columns/rows), the
        update C_n U R_n = C (D_c U D_r) R: a step in U moves ΔW alike in every layer, however small
        the norms of the sampled columns and rows (inverted sampling picks the smallest)."""
        return self.U * self.u_scale if self.normalize else self.U

    @property
    def r(self) -> int:
        return self.U.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x → x·Rᵀ → ·(alpha·U)ᵀ → ·Cᵀ: two thin matmuls and an r × r one, never out × in.
        h = F.linear(self.dropout(x).to(self.R.dtype), self.R)
        h = F.linear(h, (self.alpha * self.effective_u()).to(h.dtype))
        return F.linear(h, self.C)

    def delta_weight(self) -> torch.Tensor:
        """alpha · C U R as an out × in float32 matrix (materialised only when asked for)."""
        return (self.C.float() @ self.effective_u().float() @ self.R.float()).mul_(self.alpha)  # one out × in tensor


class _FusedCURLinear(torch.autograd.Function):
    """``base(x) + alpha · x (C U R)ᵀ`` as one autograd node, for a frozen full-precision base.

    Why: on CPUs every extra kernel costs a thread wake-up and a pass over an N × out tensor,
    and at SmolLM2's widths those, not FLOPs, were most of the adapter's cost. Here x·Rᵀ is not
    computed at all when the base has no bias (R holds rows of W, so x·Rᵀ is those columns of
    x·Wᵀ: a gather); the adapter's output is accumulated into the base output inside its GEMM;
    and its input gradient is accumulated inside the base's input-gradient GEMM. What remains
    per step is three thin N × r GEMMs (one forward, two backward), the gradient of U and two
    r × r products, with no separate add either way.
    """

    @staticmethod
    def forward(ctx, x, U, weight, bias, C, R, rows, alpha):
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)
            weight, C, R = weight.to(dtype), C.to(dtype), R.to(dtype)
            y = F.linear(x2, weight, None if bias is None else bias.to(dtype))
            h = F.linear(x2, R) if bias is not None else y.index_select(1, rows)
            scaled_u = (alpha * U).to(dtype)
            y.addmm_(h, (C @ scaled_u).t())
        ctx.save_for_backward(h, scaled_u, weight, C, R)
        ctx.alpha, ctx.x_shape, ctx.x_dtype = alpha, x.shape, x.dtype
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        h, scaled_u, weight, C, R = ctx.saved_tensors
        grad = grad.reshape(-1, grad.shape[-1]).to(h.dtype)
        grad_z = grad @ C  # N × r: the gradient at C's input
        grad_u = grad_x = None
        if ctx.needs_input_grad[1]:
            grad_u = (grad_z.t() @ h).float().mul_(ctx.alpha)
        if ctx.needs_input_grad[0]:
            grad_x = grad @ weight
            grad_x.addmm_(grad_z, scaled_u @ R)
            grad_x = grad_x.view(ctx.x_shape).to(ctx.x_dtype)
        return grad_x, grad_u, None, None, None, None, None, None


def _fusable(base: nn.Module, adapter: CURAdapter) -> bool:
    """Whether the fused path computes exactly what ``base(x) + adapter(x)`` would: a plain
    frozen layer running the stock ``nn.Linear`` / ``Conv1D`` forward on a plain weight (not a
    subclass that overrides it, nor a tensor-subclass weight, as quantization libraries use),
    which nobody hooks (accelerate's offloading, user hooks), and no active dropout on the
    adapter path."""
    if type(base).forward not in _STOCK_FORWARDS:  # quantized layers have their own forward
        return False
    if type(base.weight) not in (nn.Parameter, torch.Tensor):
        return False
    if any(p.requires_grad for p in base.parameters(recurse=False)):
        return False
    if base._forward_hooks or base._forward_pre_hooks or hasattr(base, "_hf_hook"):
        return False
    return not (adapter.training and isinstance(adapter.dropout, nn.Dropout))


class CURLoRALayer(nn.Module):
    """Wraps an ``nn.Linear`` or GPT-2 ``Conv1D``; holds any number of named adapters."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        weight_out_in(base_layer)  # raises a clear TypeError for unsupported layers
        self.base_layer = base_layer.requires_grad_(False)
        self.adapters = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.merged_adapters: list[str] = []
        self.disabled = False

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight, so code that inspects ``layer.weight`` keeps working."""
        return self.base_layer.weight

    def add_adapter(
        self,
        name: str,
        cols: torch.Tensor,
        rows: torch.Tensor,
        alpha: float,
        dropout: float = 0.0,
        normalize: bool = False,
    ) -> CURAdapter:
        if name in self.adapters:
            raise ValueError(f"Adapter {name!r} already exists on this layer.")
        if self.merged_adapters:
            raise RuntimeError("Unmerge the merged adapters before adding a new one.")
        adapter = CURAdapter(cur_source_weight(self.base_layer), cols, rows, alpha, dropout, normalize)
        self.adapters[name] = adapter
        return adapter

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            self.unmerge()
        del self.adapters[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disabled or self.merged_adapters or self.active_adapter is None:
            return self.base_layer(x, *args, **kwargs)
        adapter = self.adapters[self.active_adapter]
        if not args and not kwargs and _fusable(self.base_layer, adapter):
            base = self.base_layer
            return _FusedCURLinear.apply(
                x, adapter.effective_u(), weight_out_in(base), base.bias, adapter.C, adapter.R, adapter.rows,
                adapter.alpha,
            )
        out = self.base_layer(x, *args, **kwargs)
        return out + adapter(x).to(out.dtype)

    def delta_weight(self, name: str | None = None) -> torch.Tensor:
        return self.adapters[name or self.active_adapter].delta_weight()

    @torch.no_grad()
    def merge(self, name: str | None = None) -> None:
        """Add alpha · C U R into the base weight, so inference costs exactly the base layer's."""
        name = name or self.active_adapter
        if name is None or name in self.merged_adapters:
            return
        if is_quantized_linear(self.base_layer):
            raise RuntimeError(
                "Cannot merge into a quantized base layer in place; use merge_and_unload("
                "requantize=False) for a full-precision merged layer, or requantize=True."
            )
        self._add_to_weight(self.delta_weight(name))
        self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract every merged adapter again (equal to the original weight up to rounding)."""
        while self.merged_adapters:
            self._add_to_weight(-self.delta_weight(self.merged_adapters.pop()))

    def _add_to_weight(self, delta_out_in: torch.Tensor) -> None:
        weight = self.base_layer.weight
        delta = delta_out_in.t() if isinstance(self.base_layer, Conv1D) else delta_out_in
        # Summed in float32 inside the (fresh) delta: no further out × in temporaries.
        weight.data.copy_(delta.add_(weight.data))

    def extra_repr(self) -> str:
        ranks = {name: a.r for name, a in self.adapters.items()}
        return f"adapters={ranks}, active={self.active_adapter!r}, merged={self.merged_adapters}"
