"""GGUF → plain transformers model conversion (curlora.pretrained) on a tiny GGUF file written here.

The real models are usually already converted in the cache, so their conversion never runs in the
suite; this file writes a tiny Llama (token embeddings, two layers, a 57-token vocabulary) with the
``gguf`` package, the way llama.cpp's converter lays it out, and converts it into a temporary cache.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_llama

from curlora import pretrained

gguf = pytest.importorskip("gguf")

TOKENS = ["<unk>", "<s>", "</s>", "▁", "."] + [f"▁{c}" for c in "abcdefghijklmnopqrstuvwxyz"] + list(
    "abcdefghijklmnopqrstuvwxyz")


def _llama_cpp_permute(weight, n_head: int):
    """llama.cpp stores q/k rows interleaved per head for its rotary layout (transformers undoes it)."""
    return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


def write_tiny_gguf(path: Path, model) -> None:
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(len(TOKENS))
    writer.add_tokenizer_model("llama")
    writer.add_token_list(TOKENS)
    writer.add_token_scores([-float(i) for i in range(len(TOKENS))])
    writer.add_token_types([2, 3, 3] + [1] * (len(TOKENS) - 3))  # unknown, control, control, normal...
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    writer.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        writer.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        writer.add_tensor(f"blk.{i}.attn_q.weight", _llama_cpp_permute(sd[p + "self_attn.q_proj.weight"], heads))
        writer.add_tensor(f"blk.{i}.attn_k.weight", _llama_cpp_permute(sd[p + "self_attn.k_proj.weight"], kv_heads))
        writer.add_tensor(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        writer.add_tensor(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        writer.add_tensor(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        writer.add_tensor(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    writer.add_tensor("output_norm.weight", sd["model.norm.weight"])
    writer.add_tensor("output.weight", sd["lm_head.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_a_gguf_file_converts_to_a_model_with_the_source_tensors_logits_and_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("CURLORA_CACHE", str(tmp_path / "cache"))
    sources = {seed: tiny_llama(seed=seed, hidden=32, vocab=len(TOKENS)) for seed in (3, 4)}
    for seed, source in sources.items():
        write_tiny_gguf(tmp_path / f"tiny{seed}.gguf", source)
    ids = torch.tensor([[1, 5, 7, 31, 32, 6, 35, 34, 4]])
    cached = {}
    for seed, source in sources.items():
        model, tokenizer = pretrained.load_model_and_tokenizer(str(tmp_path / f"tiny{seed}.gguf"))
        assert type(model).__name__ == "LlamaForCausalLM" and not hasattr(model.config, "quantization_config")
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert tokenizer.convert_ids_to_tokens(ids[0].tolist()) == [TOKENS[i] for i in ids[0].tolist()]
        assert tokenizer.pad_token is not None
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids).logits, source(input_ids=ids).logits)
        cached[seed] = pretrained.resolve_model_path(str(tmp_path / f"tiny{seed}.gguf"))
    # One cache entry per file (named by its sha256), both complete, no half-written temporaries left.
    models = tmp_path / "cache" / "models"
    assert sorted(p.name for p in models.iterdir()) == sorted(Path(c).name for c in cached.values())
    assert len(set(cached.values())) == 2 and all(Path(c).name.startswith("gguf-") for c in cached.values())
    assert all((Path(c) / "config.json").is_file() and (Path(c) / "model.safetensors").is_file()
               for c in cached.values())
    # A second load reads the cache and converts nothing.
    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(pretrained, "_convert_gguf", no_conversion)
    model, _ = pretrained.load_model_and_tokenizer(str(tmp_path / "tiny3.gguf"))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, sources[3](input_ids=ids).logits)


def test_a_conversion_that_finishes_second_keeps_the_first_ones_copy(tmp_path):
    """Two processes converting one file on first use: the later replace finds the cache entry there."""
    write_tiny_gguf(tmp_path / "tiny.gguf", tiny_llama(seed=3, hidden=32, vocab=len(TOKENS)))
    target = tmp_path / "cache" / "models" / "tiny"
    digest = pretrained._file_sha256(tmp_path / "tiny.gguf")
    pretrained._convert_gguf(tmp_path / "tiny.gguf", target, "tiny", digest)
    first = {p.name: p.stat().st_ino for p in target.iterdir()}
    pretrained._convert_gguf(tmp_path / "tiny.gguf", target, "tiny", digest)  # what the slower process does
    assert {p.name: p.stat().st_ino for p in target.iterdir()} == first
    assert [p.name for p in target.parent.iterdir()] == ["tiny"]  # its temporary directory is gone
