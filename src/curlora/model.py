"""Injecting CURLoRA layers into a model, with PEFT's user-facing shape.

``get_curlora_model(model, config)`` wraps a transformers (or any torch) model. The wrapper
forwards calls and attributes to the model, trains only U (plus ``modules_to_save``), saves a
tiny adapter directory, and can hold several named adapters, one active at a time.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from curlora import checks
from curlora.config import CONFIG_NAME, WEIGHTS_NAME, AdapterFileError, CURLoRAConfig, matches_target
from curlora.layer import SUPPORTED_LAYERS, CURAdapter, CURLoRALayer, cur_source_weight, weight_out_in
from curlora.quantization import is_quantized_linear, merge_quantized
from curlora.sampling import module_generator, sample_indices
from curlora.saving import AdapterMismatchError, LayerState, check_layer, fingerprint, read_adapter, write_adapter
from curlora.submodules import replace_submodule

DEFAULT_ADAPTER = "default"


class TargetTypeError(TypeError, ValueError):
    """A target module of a type CURLoRA cannot adapt: a TypeError to the API, a user error (ValueError)
    to the command line, which prints it as one line."""


def curlora_layers(model: nn.Module) -> Iterator[tuple[str, CURLoRALayer]]:
    """Every CURLoRA layer in ``model`` with its module name."""
    for name, module in model.named_modules():
        if isinstance(module, CURLoRALayer):
            yield name, module


def _candidate_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Named modules, skipping the insides of existing CURLoRA layers (their base_layer etc.)."""
    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in inside):
            continue
        if isinstance(module, CURLoRALayer):
            inside.append(name + ".")
        yield name, module


def target_layers(model: nn.Module, config: CURLoRAConfig) -> list[tuple[str, nn.Module]]:
    """The layers ``config`` adapts in ``model``, checked (type, r ≤ the smaller side) without changing it:
    callers can refuse a rank that is too large before loading data or writing anything."""
    targets = config.resolved_targets(model)
    matched = [(n, m) for n, m in _candidate_modules(model) if n and matches_target(n, targets)]
    if not matched:
        linear_names = sorted(
            {n.rsplit(".", 1)[-1] for n, m in model.named_modules()
             if isinstance(m, SUPPORTED_LAYERS) or is_quantized_linear(m)}
        )
        raise ValueError(
            f"Target modules {targets!r} matched no module of {type(model).__name__}. "
            f"Adaptable layer names in this model: {linear_names[:20]}."
        )
    for name, module in matched:
        if not isinstance(module, (CURLoRALayer, *SUPPORTED_LAYERS)) and not is_quantized_linear(module):
            raise TargetTypeError(
                f"Target module {name!r} is a {type(module).__name__}; CURLoRA adapts only "
                f"nn.Linear, transformers Conv1D and quantized linear layers (curlora.quantization). "
                f"Narrow target_modules to those."
            )
    # The narrowest layer bounds the rank: name it, so the user's next choice fits every layer.
    shapes = {name: weight_out_in(m.base_layer if isinstance(m, CURLoRALayer) else m).shape for name, m in matched}
    narrowest = min(shapes, key=lambda name: min(shapes[name]))
    if config.r > min(shapes[narrowest]):
        out_features, in_features = shapes[narrowest]
        raise ValueError(
            f"Rank r={config.r} is larger than the smaller side of {narrowest!r} "
            f"({out_features} × {in_features}); choose r ≤ {min(out_features, in_features)}."
        )
    return matched


def find_modules_to_save(model: nn.Module, config: CURLoRAConfig) -> dict[str, nn.Module]:
    """The modules ``config.modules_to_save`` names in ``model``; ValueError for an entry that matches none."""
    found = {}
    for pattern in config.modules_to_save or []:
        hits = {n: m for n, m in model.named_modules() if n and matches_target(n, [pattern])}
        if not hits:
            raise ValueError(f"modules_to_save entry {pattern!r} matches no module of the model.")
        found.update(hits)
    return found


@dataclass
class CheckedAdapter:
    """A saved adapter read and checked against one model, ready to attach without further checks."""

    config: CURLoRAConfig
    states: dict[str, LayerState]
    layers: dict[str, nn.Module]  # the modules the adapter's layers attach to
    to_save: dict[str, tuple[nn.Module, dict[str, torch.Tensor]]]  # module -> its state dict from the file


def check_adapter(model: nn.Module, directory: str | Path) -> CheckedAdapter:
    """Read the adapter in ``directory`` and check every part of it against ``model`` without changing
    it: a refused adapter leaves the model exactly as it was. AdapterFileError / AdapterMismatchError
    (ValueErrors) name the file, the field or the layer."""
    config, states, extra = read_adapter(directory)
    path = Path(directory) / WEIGHTS_NAME
    trained_on = config.base_model_name_or_path or ""
    layers = {}
    for name, state in states.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise AdapterMismatchError(
                f"Adapter layer {name!r} does not exist in {type(model).__name__}; "
                f"the adapter was trained on {trained_on!r}."
            ) from None
        base = module.base_layer if isinstance(module, CURLoRALayer) else module
        if not isinstance(base, SUPPORTED_LAYERS) and not is_quantized_linear(base):
            raise AdapterMismatchError(f"Adapter layer {name!r} is a {type(base).__name__} in this model, "
                                       f"not a layer CURLoRA adapts.")
        check_layer(name, state, weight_out_in(base), config.fingerprint_rtol, trained_on)
        layers[name] = module
    try:
        modules = find_modules_to_save(model, config)
    except ValueError as error:
        raise AdapterMismatchError(f"{Path(directory) / CONFIG_NAME}: {error}") from None
    to_save, expected = {}, set()
    for module_name, module in modules.items():
        own = {f"{module_name}.{key}": value for key, value in module.state_dict().items()}
        for key, value in own.items():
            if key not in extra or extra[key].shape != value.shape:
                got = tuple(extra[key].shape) if key in extra else "nothing"
                raise AdapterFileError(f"{path}: modules_to_save tensor {key!r} must be {tuple(value.shape)}, "
                                       f"got {got}.")
        expected.update(own)
        to_save[module_name] = (module, {key[len(module_name) + 1:]: extra[key] for key in own})
    unexpected = sorted(set(extra) - expected)
    if unexpected:
        raise AdapterFileError(f"{path}: modules_to_save tensors {unexpected[:5]} belong to no module that "
                               f"modules_to_save names.")
    return CheckedAdapter(config, states, layers, to_save)


class AdapterStateDict(nn.Module):
    """The state dict of a model wrapped with adapters: only the adapter tensors (every adapter's U,
    cols and rows, and the ``modules_to_save``), never the frozen base weights. That is what
    ``transformers.Trainer`` checkpoints and ``accelerate`` saves for a module that is not a
    ``PreTrainedModel``, and what ``load_state_dict`` restores (C and R are rebuilt from the base
    weight when indices change). Subclasses hold ``base_model`` and ``peft_config``."""

    base_model: nn.Module
    peft_config: dict[str, CURLoRAConfig]

    def _adapter_state_keys(self) -> set[str]:
        """Keys (relative to this module) of every adapter tensor and every module_to_save entry."""
        keys = set()
        for name, module in self.named_modules():
            if isinstance(module, CURAdapter):
                keys.update(f"{name}.{key}" for key in ("U", "cols", "rows"))
        for config in self.peft_config.values():
            for module_name, module in find_modules_to_save(self.base_model, config).items():
                keys.update(f"base_model.{module_name}.{key}" for key in module.state_dict())
        return keys

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        """Only the adapter tensors (see the class docstring); ``base_model.state_dict()`` has all."""
        full = super().state_dict(*args, prefix=prefix, keep_vars=keep_vars)
        keep = {prefix + key for key in self._adapter_state_keys()}
        out = destination if destination is not None else OrderedDict()
        for key, value in full.items():
            if key in keep:
                out[key] = value
        return out

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """Load adapter tensors; ``strict`` checks them only (base weights are not expected)."""
        expected = self._adapter_state_keys()
        before = {n: (m.cols.clone(), m.rows.clone()) for n, m in self.named_modules() if isinstance(m, CURAdapter)}
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        missing = [key for key in result.missing_keys if key in expected]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(
                f"Error loading CURLoRA adapter state: missing keys {missing}, "
                f"unexpected keys {result.unexpected_keys}."
            )
        # Indices that changed mean a differently sampled adapter: rebuild its C and R.
        layers = dict(curlora_layers(self))
        for name, (cols, rows) in before.items():
            adapter = self.get_submodule(name)
            if torch.equal(cols, adapter.cols) and torch.equal(rows, adapter.rows):
                continue
            layer = layers[name.rsplit(".adapters.", 1)[0]]
            if layer.merged_adapters:
                raise RuntimeError("Unmerge adapters (unmerge_adapter()) before loading a state dict.")
            adapter.set_sources(cur_source_weight(layer.base_layer))
        return type(result)(missing, result.unexpected_keys)


class CURLoRAModel(AdapterStateDict):
    """A model with CURLoRA adapters; behaves like the wrapped model everywhere else. Its
    ``state_dict()`` holds only the adapter tensors (:class:`AdapterStateDict`)."""

    # transformers.Trainer reads this on load; None means "no tied keys were left out on save".
    _keys_to_ignore_on_save = None

    def __init__(
        self,
        model: nn.Module,
        config: CURLoRAConfig | None = None,
        adapter_name: str = DEFAULT_ADAPTER,
    ) -> None:
        if config is not None:  # refused before the model is frozen
            checks.identifier("adapter name", adapter_name)
        super().__init__()
        self.base_model = model
        self.peft_config: dict[str, CURLoRAConfig] = {}
        self.active_adapter: str | None = None
        for param in model.parameters():
            param.requires_grad_(False)
        self.expose_forward_signature()
        if config is not None:
            self.add_adapter(adapter_name, config)
            self.set_adapter(adapter_name)

    # -- plumbing -----------------------------------------------------------------------------
    # ``labels`` is spelled out so that transformers' ``find_labels`` (which inspects the class)
    # finds it and Trainer computes an evaluation loss; it is passed on only when given.
    def forward(self, *args, labels=None, **kwargs):
        if labels is not None:
            kwargs["labels"] = labels
        return self.base_model(*args, **kwargs)

    def expose_forward_signature(self) -> None:
        """Give this instance's ``forward`` the wrapped model's signature (``inspect`` follows
        ``__wrapped__``): ``transformers.Trainer`` keeps only the dataset columns that
        ``model.forward`` names, so a bare ``forward(*args, **kwargs)`` would get empty batches.
        Public for trainers that patch the wrapped model's ``forward`` (curlora.sft.trainer)."""
        self.__dict__.pop("forward", None)
        if callable(getattr(self.base_model, "forward", None)):
            self.forward = functools.update_wrapper(
                functools.partial(CURLoRAModel.forward, self), self.base_model.forward
            )

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.base_model, name)

    def get_base_model(self) -> nn.Module:
        return self.base_model

    # -- adapters -----------------------------------------------------------------------------
    def _layer_for(self, name: str, module: nn.Module) -> CURLoRALayer:
        if isinstance(module, CURLoRALayer):
            return module
        layer = CURLoRALayer(module)
        replace_submodule(self.base_model, name, layer)
        return layer

    def add_adapter(self, adapter_name: str, config: CURLoRAConfig) -> None:
        """Sample C and R for every target layer and attach a fresh (zero) U under ``adapter_name``."""
        self._new_adapter_name(adapter_name)
        self._modules_to_save(config)  # validate before changing anything
        drawn = []  # every layer's draw first: a layer that cannot be sampled leaves the model as it was
        for name, module in target_layers(self.base_model, config):
            weight = weight_out_in(module.base_layer if isinstance(module, CURLoRALayer) else module)
            generator = module_generator(config.seed, name, weight.device)
            try:
                drawn.append((name, module, sample_indices(weight, config.r, config.sampling,
                                                           config.replacement, generator)))
            except ValueError as error:
                raise ValueError(f"Layer {name!r}: {error}") from None
        for name, module, (cols, rows) in drawn:
            layer = self._layer_for(name, module)
            layer.add_adapter(adapter_name, cols, rows, config.alpha, config.dropout, config.normalize)
        self.peft_config[adapter_name] = config
        if self.active_adapter is None:
            self.set_adapter(adapter_name)
        else:
            self._set_trainable()

    def set_adapter(self, adapter_name: str) -> None:
        """Make ``adapter_name`` the one used in forward and the only one whose U trains."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"No adapter {adapter_name!r}; existing: {sorted(self.peft_config)}.")
        for _, layer in curlora_layers(self.base_model):
            if layer.merged_adapters:
                raise RuntimeError("Unmerge adapters (unmerge_adapter()) before switching adapters.")
            layer.active_adapter = adapter_name if adapter_name in layer.adapters else None
        self.active_adapter = adapter_name
        self._set_trainable()

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"No adapter {adapter_name!r}; existing: {sorted(self.peft_config)}.")
        for _, layer in curlora_layers(self.base_model):
            if adapter_name in layer.adapters:
                layer.delete_adapter(adapter_name)
        del self.peft_config[adapter_name]
        if self.active_adapter == adapter_name:
            self.active_adapter = None
            if self.peft_config:
                self.set_adapter(next(iter(self.peft_config)))

    def _modules_to_save(self, config: CURLoRAConfig) -> dict[str, nn.Module]:
        return find_modules_to_save(self.base_model, config)

    def _set_trainable(self, trainable: bool = True) -> None:
        for param in self.base_model.parameters():
            param.requires_grad_(False)
        if not trainable or self.active_adapter is None:
            return
        for _, layer in curlora_layers(self.base_model):
            if self.active_adapter in layer.adapters:
                layer.adapters[self.active_adapter].U.requires_grad_(True)
        for module in self._modules_to_save(self.peft_config[self.active_adapter]).values():
            for param in module.parameters():
                param.requires_grad_(True)

    # -- parameters ---------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} "
            f"|| trainable%: {100 * trainable / max(total, 1):.4f}"
        )

    # -- merging ------------------------------------------------------------------------------
    def merge_adapter(self) -> None:
        for _, layer in curlora_layers(self.base_model):
            layer.merge()

    def unmerge_adapter(self) -> None:
        for _, layer in curlora_layers(self.base_model):
            layer.unmerge()

    def _unload(self, merge: bool, requantize: bool = False) -> nn.Module:
        for name, layer in list(curlora_layers(self.base_model)):
            base = layer.base_layer
            if merge and is_quantized_linear(base):
                delta = layer.delta_weight() if layer.active_adapter is not None else None
                base = merge_quantized(base, delta, requantize)
            elif merge:
                layer.merge()
            else:
                layer.unmerge()
            replace_submodule(self.base_model, name, base)
        self.peft_config.clear()
        self.active_adapter = None
        return self.base_model

    def merge_and_unload(self, requantize: bool = False) -> nn.Module:
        """Fold the active adapter into the base weights and return the plain model.

        A quantized base layer is dequantized and merged into a new layer: a full-precision
        ``nn.Linear`` (exact), or with ``requantize=True`` the same quantized type again (small,
        but the merged weight is rounded anew; see docs/quantization.md)."""
        return self._unload(merge=True, requantize=requantize)

    def unload(self) -> nn.Module:
        """Remove every adapter without merging and return the original model."""
        return self._unload(merge=False)

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model alone (``modules_to_save`` stay as trained: they are shared)."""
        layers = [layer for _, layer in curlora_layers(self.base_model)]
        merged = [list(layer.merged_adapters) for layer in layers]
        for layer in layers:
            layer.unmerge()
            layer.disabled = True
        try:
            yield
        finally:
            for layer, names in zip(layers, merged):
                layer.disabled = False
                for name in names:
                    layer.merge(name)

    # -- saving and loading -------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | Path, selected_adapters: list[str] | None = None) -> None:
        """Write each adapter as PEFT does: ``default`` at the top, others in sub-directories."""
        save_directory = Path(save_directory)
        for adapter_name in selected_adapters or []:
            if adapter_name not in self.peft_config:
                raise ValueError(f"No adapter {adapter_name!r}; existing: {sorted(self.peft_config)}.")
        base_name = getattr(getattr(self.base_model, "config", None), "_name_or_path", None) or None
        for adapter_name in selected_adapters or list(self.peft_config):
            config = self.peft_config[adapter_name]
            if config.base_model_name_or_path is None and base_name:
                config.base_model_name_or_path = str(base_name)
            layers = adapter_layer_states(self.base_model, adapter_name)
            extra = {
                f"{module_name}.{key}": value
                for module_name, module in self._modules_to_save(config).items()
                for key, value in module.state_dict().items()
            }
            target = save_directory if adapter_name == DEFAULT_ADAPTER else save_directory / adapter_name
            write_adapter(target, config, layers, extra)

    def load_adapter(self, directory: str | Path, adapter_name: str = DEFAULT_ADAPTER, is_trainable: bool = False) -> None:
        """Attach a saved adapter; all of it is checked against this base before anything changes."""
        self._new_adapter_name(adapter_name)
        self._attach(check_adapter(self.base_model, directory), adapter_name, is_trainable)

    def _new_adapter_name(self, adapter_name: str) -> None:
        """An adapter name becomes a sub-directory in ``save_pretrained``: an identifier, and not taken."""
        checks.identifier("adapter name", adapter_name)
        if adapter_name in self.peft_config:
            raise ValueError(f"Adapter {adapter_name!r} already exists; pick another name.")

    def _attach(self, checked: CheckedAdapter, adapter_name: str, is_trainable: bool) -> None:
        config = checked.config
        for name, module in checked.layers.items():
            layer = self._layer_for(name, module)
            state = checked.states[name]
            adapter = layer.add_adapter(adapter_name, state.cols, state.rows, config.alpha, config.dropout,
                                        config.normalize)
            with torch.no_grad():
                adapter.U.copy_(state.U)
        for module, tensors in checked.to_save.values():
            module.load_state_dict(tensors)
        self.peft_config[adapter_name] = config
        self.set_adapter(adapter_name)
        self._set_trainable(is_trainable)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        directory: str | Path,
        adapter_name: str = DEFAULT_ADAPTER,
        is_trainable: bool = False,
    ) -> "CURLoRAModel":
        """Wrap ``model`` with a saved adapter; a refused adapter leaves ``model`` untouched (not even frozen)."""
        checks.identifier("adapter name", adapter_name)
        checked = check_adapter(model, directory)
        wrapper = cls(model)
        wrapper._attach(checked, adapter_name, is_trainable)
        return wrapper


def adapter_layer_states(model: nn.Module, adapter_name: str) -> dict[str, LayerState]:
    """What an adapter file holds for each layer of ``model`` that has ``adapter_name``."""
    states = {}
    for name, layer in curlora_layers(model):
        if adapter_name in layer.adapters:
            adapter = layer.adapters[adapter_name]
            states[name] = LayerState(U=adapter.U, cols=adapter.cols, rows=adapter.rows,
                                      fingerprint=fingerprint(adapter.C, adapter.R),
                                      shape=tuple(weight_out_in(layer.base_layer).shape))
    return states


def get_curlora_model(
    model: nn.Module, config: CURLoRAConfig | None = None, adapter_name: str = DEFAULT_ADAPTER
) -> CURLoRAModel:
    """Wrap ``model`` with a CURLoRA adapter (PEFT's ``get_peft_model``)."""
    return CURLoRAModel(model, config or CURLoRAConfig(), adapter_name)
