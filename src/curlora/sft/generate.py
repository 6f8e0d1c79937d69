"""``curlora generate``: answer prompts with a saved adapter."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from curlora.config import CURLoRAConfig
from curlora.sft.data import prompt_text
from curlora.sft.train import SUMMARY_NAME

# --------------------------------------------------------------------------- generation


def load_for_generation(adapter: str | Path, model: str | None = None):
    """(CURLoRAModel, tokenizer): the base from ``model``, else the one the adapter was trained
    with by ``curlora sft``, else the default SmolLM2."""
    from curlora.model import CURLoRAModel
    from curlora.pretrained import load_model_and_tokenizer

    adapter = Path(adapter)
    CURLoRAConfig.load(adapter)  # not an adapter directory: refused before the model loads
    if model is None and (adapter / SUMMARY_NAME).is_file():
        model = json.loads((adapter / SUMMARY_NAME).read_text())["settings"].get("model")
    base, tokenizer = load_model_and_tokenizer(model)
    return CURLoRAModel.from_pretrained(base, adapter).eval(), tokenizer


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

