"""Which layers CURLoRA adapts by default: the attention's query, key and value projections.

The paper adapts q/k/v. PEFT keeps the field's maintained table of LoRA targets per transformers
``model_type`` (``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``); its entries are q and v
only, so the key projection of the same naming scheme is added (``q_proj`` → ``k_proj``,
``query`` → ``key``, ...), fused projections (``c_attn``, ``query_key_value``, ``qkv_proj``,
``Wqkv``) are taken as they are, and names PEFT lists that are not attention inputs (Phi's
``fc1``/``fc2``, output projections) are dropped. PEFT is an optional dependency of the core, and
its table lacks some architectures (``phi3``, ``olmo2``, ...): there, and without PEFT, the
default is found from the model's own module names by the same naming schemes.
"""

from __future__ import annotations

import re

from torch import nn

# Naming schemes of attention input projections: (query, key, value) or one fused projection.
SPLIT_SCHEMES: tuple[tuple[str, str, str], ...] = (
    ("q_proj", "k_proj", "v_proj"),
    ("query_proj", "key_proj", "value_proj"),
    ("query", "key", "value"),
    ("q", "k", "v"),
)
FUSED_NAMES: tuple[str, ...] = ("c_attn", "query_key_value", "qkv_proj", "Wqkv", "in_proj")


def _attention_targets(names: list[str]) -> list[str]:
    """The q/k/v (or fused) projection names among ``names``, with k added beside q and v."""
    chosen = [n for n in FUSED_NAMES if n in names]
    for query, key, value in SPLIT_SCHEMES:
        if query in names or value in names:
            chosen += [query, key, value]
            break
    return chosen


def peft_targets(model_type: str | None) -> list[str] | None:
    """q/k/v from PEFT's LoRA table for ``model_type``; None without PEFT or an entry."""
    try:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as table
    except ImportError:
        return None
    entry = table.get(model_type)
    if entry is None:
        return None
    if isinstance(entry, str):  # a regex such as gemma4's: take the projection names out of it
        entry = re.findall(r"[A-Za-z_]+_proj|c_attn|query_key_value|Wqkv", entry)
    return _attention_targets(list(entry)) or None


def module_name_targets(model: nn.Module) -> list[str]:
    """q/k/v found among the model's own module names (last name component)."""
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules() if name}
    return [n for n in _attention_targets(sorted(names)) if n in names]


def default_targets(model: nn.Module) -> list[str]:
    """The default target modules for ``model``: PEFT's table where it knows the architecture,
    else the model's own attention projection names; a clear error when neither finds one."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    targets = peft_targets(model_type) or module_name_targets(model)
    if not targets:
        raise ValueError(
            f"No default target modules for {type(model).__name__} (model_type {model_type!r}): no "
            f"attention projection named like {[s[0] for s in SPLIT_SCHEMES] + list(FUSED_NAMES)}. Pass "
            f"CURLoRAConfig(target_modules=[...]) with the names of the Linear layers to adapt."
        )
    return targets
