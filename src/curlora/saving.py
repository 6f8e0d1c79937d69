"""Adapter files: ``adapter_config.json`` + ``adapter_model.safetensors``.

The file holds, per adapted layer, U (float32), the sampled column/row indices (int32) and a
fingerprint of the C and R they select. C and R themselves are not saved: they are rebuilt from
the base weights, and the fingerprint proves the base is the one the adapter was trained on.
Loading uses safetensors only (no pickle), and validates everything before touching the model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

from curlora import __version__
from curlora.config import WEIGHTS_NAME, CURLoRAConfig
from curlora.fileio import atomic_write_bytes

U_KEY, INDEX_KEY, FINGERPRINT_KEY = "curlora_U", "curlora_indices", "curlora_fingerprint"
MODULES_TO_SAVE_PREFIX = "modules_to_save."


class AdapterMismatchError(ValueError):
    """An adapter does not belong to the base model it is being loaded onto."""


def fingerprint(C: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """Column sums of C and row sums of R (2 × r, float32): cheap, and different for any other base."""
    return torch.stack([C.float().sum(dim=0), R.float().sum(dim=1)]).cpu()


@dataclass
class LayerState:
    """What the file stores for one adapted layer."""

    U: torch.Tensor
    cols: torch.Tensor
    rows: torch.Tensor
    fingerprint: torch.Tensor
    shape: tuple[int, int]  # the base weight's (out, in)


def write_adapter(
    directory: str | Path,
    config: CURLoRAConfig,
    layers: dict[str, LayerState],
    extra_tensors: dict[str, torch.Tensor],
) -> None:
    directory = Path(directory)
    tensors: dict[str, torch.Tensor] = {}
    for name, state in layers.items():
        tensors[f"{name}.{U_KEY}"] = state.U.detach().float().cpu().contiguous()
        tensors[f"{name}.{INDEX_KEY}"] = torch.stack([state.cols, state.rows]).to(torch.int32).cpu()
        tensors[f"{name}.{FINGERPRINT_KEY}"] = state.fingerprint.contiguous()
    for key, value in extra_tensors.items():
        tensors[MODULES_TO_SAVE_PREFIX + key] = value.detach().cpu().contiguous()
    shapes = {name: list(state.shape) for name, state in layers.items()}
    metadata = {"format": "pt", "curlora_version": __version__, "shapes": json.dumps(shapes)}
    # Weights first, config last: a directory with a config always has its weights.
    atomic_write_bytes(directory / WEIGHTS_NAME, save(tensors, metadata=metadata))
    config.save(directory)


def read_adapter(
    directory: str | Path,
) -> tuple[CURLoRAConfig, dict[str, LayerState], dict[str, torch.Tensor]]:
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"Adapter directory {directory} does not exist.")
    config = CURLoRAConfig.load(directory)
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the adapter directory is incomplete.")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    if "shapes" not in metadata:
        raise ValueError(f"{path} has no CURLoRA metadata; was it written by curlora?")
    shapes = json.loads(metadata["shapes"])
    layers = {}
    for name, shape in shapes.items():
        indices = tensors[f"{name}.{INDEX_KEY}"].long()
        layers[name] = LayerState(
            U=tensors[f"{name}.{U_KEY}"],
            cols=indices[0],
            rows=indices[1],
            fingerprint=tensors[f"{name}.{FINGERPRINT_KEY}"],
            shape=(int(shape[0]), int(shape[1])),
        )
    extra = {
        key[len(MODULES_TO_SAVE_PREFIX):]: value
        for key, value in tensors.items()
        if key.startswith(MODULES_TO_SAVE_PREFIX)
    }
    return config, layers, extra


def check_layer(name: str, state: LayerState, weight: torch.Tensor, rtol: float, trained_on: str) -> None:
    """Raise AdapterMismatchError, naming the layer, unless ``weight`` is the adapter's base weight."""
    hint = f" The adapter was trained on {trained_on!r}; load it onto that model." if trained_on else ""
    if tuple(weight.shape) != state.shape:
        raise AdapterMismatchError(
            f"Layer {name!r}: the base weight is {tuple(weight.shape)} (out × in) but the adapter "
            f"was trained on a {state.shape} weight.{hint}"
        )
    r = state.U.shape[0]
    if state.U.shape != (r, r) or state.cols.numel() != r or state.rows.numel() != r:
        raise AdapterMismatchError(f"Layer {name!r}: U and the indices disagree on the rank.")
    if int(state.cols.max()) >= state.shape[1] or int(state.rows.max()) >= state.shape[0]:
        raise AdapterMismatchError(f"Layer {name!r}: sampled indices lie outside the weight.")
    with torch.no_grad():
        C = weight[:, state.cols.to(weight.device)]
        R = weight[state.rows.to(weight.device), :]
        actual = fingerprint(C, R)
    expected = state.fingerprint.float()
    difference = float((actual - expected).norm() / expected.norm().clamp_min(1e-12))
    if not difference <= rtol:
        raise AdapterMismatchError(
            f"Layer {name!r}: the base weight's sampled columns and rows differ from the ones the "
            f"adapter was trained with (relative difference {difference:.3g} > {rtol:g}).{hint}"
        )
