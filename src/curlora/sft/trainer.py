"""TRL's ``SFTTrainer`` for CURLoRA models (``transformers.Trainer`` needs nothing: pass the model).

TRL (1.x) installs a fused LM head by replacing ``model.forward`` with a function that runs
``model.base_model`` and expects the transformers *backbone* back. On a ``PeftModel`` TRL patches
the wrapped model instead; it does not know ``CURLoRAModel``, whose ``base_model`` is the whole
causal LM, so a plain ``SFTTrainer(model=curlora_model, ...)`` fails in the first step with
``'CausalLMOutputWithPast' object has no attribute 'last_hidden_state'``.
``CURLoRASFTTrainer`` moves the head where TRL puts it for PEFT: onto the wrapped model.
Everything else (datasets, ``SFTConfig``, checkpoints, resuming) is ``SFTTrainer``'s own.

Requires ``pip install trl``.
"""

from __future__ import annotations

from trl import SFTTrainer
from trl.trainer.utils import add_fused_lm_head

from curlora.model import CURLoRAModel

# The per-token outputs SFTTrainer asks for when it patches a model itself (trl 1.16).
_SFT_FUSED_OUTPUTS = ("log_probs", "entropy", "is_top1")


class CURLoRASFTTrainer(SFTTrainer):
    """``trl.SFTTrainer`` that accepts a :class:`~curlora.CURLoRAModel` (same arguments)."""

    def __init__(self, model, *args, **kwargs):
        super().__init__(model, *args, **kwargs)
        wrapper = self.model
        if isinstance(wrapper, CURLoRAModel) and "forward" in vars(wrapper):
            wrapper.expose_forward_signature()  # undo the patch TRL put on the wrapper
            add_fused_lm_head(wrapper.base_model, outputs=_SFT_FUSED_OUTPUTS)
            wrapper.expose_forward_signature()  # keep the (patched) wrapped model's signature
