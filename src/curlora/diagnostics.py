"""Stability diagnostics from the paper's analysis (§4.3–4.4): how far each adapter moved its layer.

The paper's argument is that C and R bound the update: ||ΔW||_F = alpha·||C U R||_F
≤ alpha·||C||_F·||U||_F·||R||_F. These numbers let a run show whether that held in practice.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from curlora.layer import weight_out_in
from curlora.model import curlora_layers


@torch.no_grad()
def stability_diagnostics(
    model: nn.Module, adapter_name: str | None = None, inputs: dict[str, Any] | None = None
) -> list[dict[str, float | str]]:
    """One row per adapted layer: ||U||, ||ΔW||, ||W||, their ratio, the bound, and output shift.

    With ``inputs`` (keyword arguments for the model's forward), ``output_shift`` is
    ||x·ΔWᵀ|| / ||x·Wᵀ|| summed over that batch, measured with forward hooks on each layer.
    """
    layers = [
        (name, layer, adapter_name or layer.active_adapter)
        for name, layer in curlora_layers(model)
        if (adapter_name or layer.active_adapter) in layer.adapters
    ]
    shifts: dict[str, list[float]] = {}
    if inputs is not None:
        handles = []
        for name, layer, adapter in layers:
            def hook(module, args, output, name=name, adapter=adapter):
                delta = module.adapters[adapter](args[0]).float()
                base = module.base_layer(args[0]).float()
                shifts[name] = [float(delta.norm()), float(base.norm())]

            handles.append(layer.register_forward_hook(hook))
        try:
            model(**inputs)
        finally:
            for handle in handles:
                handle.remove()
    rows = []
    for name, layer, adapter_name_ in layers:
        adapter = layer.adapters[adapter_name_]
        weight_norm = float(weight_out_in(layer.base_layer).float().norm())
        delta_norm = float(adapter.delta_weight().norm())
        row: dict[str, float | str] = {
            "layer": name,
            "u_norm": float(adapter.U.float().norm()),
            "delta_norm": delta_norm,
            "weight_norm": weight_norm,
            "delta_relative": delta_norm / max(weight_norm, 1e-12),
            "bound": abs(adapter.alpha) * float(adapter.C.float().norm() * adapter.U.float().norm() * adapter.R.float().norm()),
        }
        if name in shifts:
            delta, base = shifts[name]
            row["output_shift"] = delta / max(base, 1e-12)
        rows.append(row)
    return rows
