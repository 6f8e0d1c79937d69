"""Default targets, injection, save/load and merge on tiny random models of many architectures."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from curlora import CURLoRAConfig, CURLoRAModel, curlora_layers, get_curlora_model
from curlora.targets import default_targets, module_name_targets, peft_targets

COMMON = {"vocab_size": 128, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
          "intermediate_size": 64, "max_position_embeddings": 64}
# Per architecture: tiny sizes in that config's own names, and the q/k/v names it must get.
ARCHITECTURES = {
    "llama": ({"num_key_value_heads": 2}, ["q_proj", "k_proj", "v_proj"]),
    "mistral": ({"num_key_value_heads": 2}, ["q_proj", "k_proj", "v_proj"]),
    "qwen2": ({"num_key_value_heads": 2}, ["q_proj", "k_proj", "v_proj"]),
    "qwen3": ({"num_key_value_heads": 2, "head_dim": 8}, ["q_proj", "k_proj", "v_proj"]),
    "gemma3_text": ({"num_key_value_heads": 2, "head_dim": 8, "sliding_window": 16}, ["q_proj", "k_proj", "v_proj"]),
    "phi3": ({"num_key_value_heads": 4, "pad_token_id": 0}, ["qkv_proj"]),
    "olmo2": ({"num_key_value_heads": 2}, ["q_proj", "k_proj", "v_proj"]),
    "opt": ({"ffn_dim": 64, "word_embed_proj_dim": 32}, ["q_proj", "k_proj", "v_proj"]),
    "gpt_neox": ({}, ["query_key_value"]),
    "falcon": ({"new_decoder_architecture": False, "multi_query": False}, ["query_key_value"]),
    "gpt2": ({"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64}, ["c_attn"]),
    "stablelm": ({"num_key_value_heads": 2}, ["q_proj", "k_proj", "v_proj"]),
}


def tiny(model_type: str, seed: int = 0):
    sizes, _ = ARCHITECTURES[model_type]
    config = AutoConfig.for_model(model_type, **{**COMMON, **sizes})
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_default_targets_inject_save_load_and_merge_exactly(model_type, tmp_path):
    _, expected = ARCHITECTURES[model_type]
    base = tiny(model_type)
    assert default_targets(base) == expected
    # PEFT's table (where it has the architecture) and the module names agree.
    assert module_name_targets(base) == expected
    assert peft_targets(model_type) in (None, expected)

    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = base(input_ids=ids).logits
    model = get_curlora_model(base, CURLoRAConfig(r=4, seed=3))
    layers = list(curlora_layers(model))
    assert len(layers) == 2 * len(expected)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)  # U = 0: the base model exactly
        for _, layer in layers:
            layer.adapters["default"].U.normal_(0, 0.5)
        adapted = model(input_ids=ids).logits
    assert not torch.allclose(adapted, before)

    model.save_pretrained(tmp_path)
    loaded = CURLoRAModel.from_pretrained(tiny(model_type), tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, adapted)
        merged = loaded.merge_and_unload()
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted, rtol=1e-4, atol=1e-4)


def test_a_model_without_attention_projections_gets_a_clear_error():
    with pytest.raises(ValueError, match="target_modules"):
        default_targets(torch.nn.Sequential(torch.nn.Linear(4, 4)))
