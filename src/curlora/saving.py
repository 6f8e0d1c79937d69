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
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from curlora import __version__
from curlora.config import WEIGHTS_NAME, AdapterFileError, CURLoRAConfig
from curlora.fileio import atomic_write_bytes

U_KEY, INDEX_KEY, FINGERPRINT_KEY = "curlora_U", "curlora_indices", "curlora_fingerprint"
MODULES_TO_SAVE_PREFIX = "modules_to_save."
FLOAT_TYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INDEX_TYPES = (torch.int32, torch.int64)


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
    """The adapter in ``directory``, every tensor checked for type, shape and range on its own (what needs
    the model is checked by :func:`check_layer` and ``CURLoRAModel``): AdapterFileError, naming the file
    and the field, for anything else. An adapter directory is untrusted input."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"Adapter directory {directory} does not exist.")
    config = CURLoRAConfig.load(directory)
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the adapter directory is incomplete.")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise AdapterFileError(f"{path}: not a readable safetensors file ({error}).") from None
    try:
        shapes = json.loads(metadata["shapes"], parse_constant=lambda name: None)
    except (KeyError, ValueError, RecursionError):  # RecursionError: JSON nested too deep
        raise AdapterFileError(f"{path} has no valid CURLoRA 'shapes' metadata; was it written by curlora?") from None
    if not isinstance(shapes, dict):
        raise AdapterFileError(f"{path}: metadata 'shapes' must map layer names to [out, in].")
    layers = {name: _layer(path, name, shape, tensors, config.r) for name, shape in shapes.items()}
    extra = {}
    for key, value in tensors.items():
        if key.startswith(MODULES_TO_SAVE_PREFIX):
            if not (value.is_floating_point() and bool(value.isfinite().all())):
                raise AdapterFileError(f"{path}: tensor {key!r} must be finite floating point.")
            extra[key[len(MODULES_TO_SAVE_PREFIX):]] = value
        elif key.rpartition(".")[0] not in layers or key.rpartition(".")[2] not in (U_KEY, INDEX_KEY, FINGERPRINT_KEY):
            raise AdapterFileError(f"{path}: tensor {key!r} belongs to no layer listed in the metadata.")
    return config, layers, extra


def _layer(path: Path, name: object, shape: object, tensors: dict[str, torch.Tensor], r: int) -> LayerState:
    """One layer's tensors, checked: U finite (r × r), indices integer (2 × r) within the stated weight
    shape, fingerprint finite (2 × r)."""
    where = f"{path}: layer {name!r}"
    if not (isinstance(name, str) and name and all(name.split("."))):
        raise AdapterFileError(f"{path}: metadata 'shapes' has a bad layer name {name!r}.")
    if not (isinstance(shape, list) and len(shape) == 2
            and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape)):
        raise AdapterFileError(f"{where}: its shape in the metadata must be [out, in] (positive integers), "
                               f"got {shape!r}.")
    found = {}
    for key, dtypes, size in ((U_KEY, FLOAT_TYPES, (r, r)), (INDEX_KEY, INDEX_TYPES, (2, r)),
                              (FINGERPRINT_KEY, FLOAT_TYPES, (2, r))):
        tensor = tensors.get(f"{name}.{key}")
        if tensor is None:
            raise AdapterFileError(f"{where}: tensor {key!r} is missing.")
        if tensor.dtype not in dtypes or tuple(tensor.shape) != size:
            raise AdapterFileError(f"{where}: {key!r} must be {size[0]} × {size[1]} (rank r={r}) of "
                                   f"{'/'.join(map(str, dtypes))}, got {tuple(tensor.shape)} {tensor.dtype}.")
        if key != INDEX_KEY and not bool(tensor.isfinite().all()):
            raise AdapterFileError(f"{where}: {key!r} holds NaN or infinite values.")
        found[key] = tensor
    indices = found[INDEX_KEY].long()
    out_features, in_features = shape
    if bool((indices < 0).any()) or int(indices[0].max()) >= in_features or int(indices[1].max()) >= out_features:
        raise AdapterFileError(f"{where}: {INDEX_KEY!r} must lie in [0, {in_features}) for columns and "
                               f"[0, {out_features}) for rows.")
    return LayerState(U=found[U_KEY].float(), cols=indices[0], rows=indices[1], fingerprint=found[FINGERPRINT_KEY],
                      shape=(out_features, in_features))


def check_layer(name: str, state: LayerState, weight: torch.Tensor, rtol: float, trained_on: str) -> None:
    """Raise AdapterMismatchError, naming the layer, unless ``weight`` is the adapter's base weight."""
    hint = f" The adapter was trained on {trained_on!r}; load it onto that model." if trained_on else ""
    if tuple(weight.shape) != state.shape:
        raise AdapterMismatchError(
            f"Layer {name!r}: the base weight is {tuple(weight.shape)} (out × in) but the adapter "
            f"was trained on a {state.shape} weight.{hint}"
        )
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
