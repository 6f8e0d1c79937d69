"""``curlora generate``: answer prompts with a saved adapter."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from curlora.config import CONFIG_NAME, CURLoRAConfig
from curlora.sft.data import prompt_text

# --------------------------------------------------------------------------- generation


def load_for_generation(adapter: str | Path, model: str | None = None):
    """(CURLoRAModel, tokenizer): the base from ``model``, else the one the adapter's (validated) config
    records, else the default SmolLM2."""
    from curlora.model import CURLoRAModel
    from curlora.pretrained import load_model_and_tokenizer

    adapter = Path(adapter)
    config = CURLoRAConfig.load(adapter)  # not an adapter directory, or a bad one: refused before the model loads
    base, tokenizer = load_model_and_tokenizer(model if model is not None else recorded_base(adapter, config))
    return CURLoRAModel.from_pretrained(base, adapter).eval(), tokenizer


def recorded_base(adapter: Path, config: CURLoRAConfig) -> str | None:
    """The base model an adapter records, used without ``--model`` only when it is a model curlora knows
    or an existing local path: an adapter directory from elsewhere must not make curlora fetch from
    the hub, or read a path it names relative to wherever the command runs."""
    from curlora.pretrained import KNOWN_MODELS

    recorded = config.base_model_name_or_path
    if recorded is None:
        return None
    if recorded in KNOWN_MODELS or (Path(recorded).is_absolute() and Path(recorded).exists()):
        print(f"curlora generate: base model {recorded} (from {adapter / CONFIG_NAME}); pass --model to choose "
              f"another", file=sys.stderr)
        return recorded
    raise ValueError(f"{adapter / CONFIG_NAME} records base model {recorded!r}, which is neither one of "
                     f"{KNOWN_MODELS} nor an existing local path; pass --model (e.g. --model {recorded} if you "
                     f"trust it).")


@torch.no_grad()
def generate(model, tokenizer, prompt: str, max_new_tokens: int = 64, system: str | None = None) -> str:
    """Greedy answer to ``prompt``, rendered with the chat template as in training."""
    text = prompt_text(tokenizer, prompt, system)
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=not getattr(tokenizer, "chat_template", None))
    enc = {k: v.to(next(model.parameters()).device) for k, v in enc.items()}
    end_ids = [i for i in {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")} if isinstance(i, int) and i >= 0]
    output = model.generate(
        **enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=end_ids or None,
        pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer.decode(output[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()

