import json

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama
from safetensors import safe_open

from curlora import AdapterMismatchError, CURLoRAConfig, CURLoRAModel, get_curlora_model
from curlora.model import curlora_layers

IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))


def _trained(factory, **config):
    model = get_curlora_model(factory(), CURLoRAConfig(r=4, **config))
    with torch.no_grad():
        for _, layer in curlora_layers(model):
            layer.adapters["default"].U.normal_(std=0.5)
    return model


@pytest.mark.parametrize("factory, normalize", [(tiny_llama, False), (tiny_gpt2, False), (tiny_llama, True)])
def test_save_then_load_on_a_fresh_base_is_bit_exact(tmp_path, factory, normalize):
    model = _trained(factory, normalize=normalize)
    expected = model(IDS).logits
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    loaded = CURLoRAModel.from_pretrained(factory(), tmp_path)
    assert loaded.peft_config["default"].normalize is normalize
    assert torch.equal(loaded(IDS).logits, expected)
    assert not any(p.requires_grad for p in loaded.parameters())
    trainable = CURLoRAModel.from_pretrained(factory(), tmp_path, is_trainable=True)
    assert any(p.requires_grad for p in trainable.parameters())


def test_file_holds_u_indices_and_fingerprints_not_c_or_r(tmp_path):
    _trained(tiny_llama).save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
        assert f.get_tensor(keys[0]).dtype in (torch.float32, torch.int32)
    suffixes = {k.rsplit(".", 1)[-1] for k in keys}
    assert suffixes == {"curlora_U", "curlora_indices", "curlora_fingerprint"}
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["sampling"] == "inverse"


def test_loading_onto_a_different_base_names_the_layer(tmp_path):
    _trained(tiny_llama).save_pretrained(tmp_path)
    other = tiny_llama(seed=1)
    with pytest.raises(AdapterMismatchError, match=r"model\.layers\.0\.self_attn\.q_proj.*differ"):
        CURLoRAModel.from_pretrained(other, tmp_path)
    # Nothing half-loaded: the failed load left the model untouched.
    assert not list(curlora_layers(other))
    with pytest.raises(ValueError, match="does not exist"):
        CURLoRAModel.from_pretrained(tiny_gpt2(), tmp_path)


def test_shape_mismatch_is_reported(tmp_path):
    model = _trained(tiny_llama)
    model.save_pretrained(tmp_path)
    bigger = tiny_llama()
    bigger.model.layers[0].self_attn.q_proj = torch.nn.Linear(48, 96, bias=False)
    with pytest.raises(AdapterMismatchError, match=r"q_proj.*\(96, 48\)"):
        CURLoRAModel.from_pretrained(bigger, tmp_path)


def test_named_adapters_save_in_subdirectories_and_modules_to_save_roundtrip(tmp_path):
    model = _trained(tiny_llama, modules_to_save=["lm_head"])
    with torch.no_grad():
        model.base_model.lm_head.weight.add_(1.0)
    model.add_adapter("second", CURLoRAConfig(r=2, seed=3))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "second" / "adapter_config.json").is_file()
    expected = model(IDS).logits
    loaded = CURLoRAModel.from_pretrained(tiny_llama(), tmp_path)
    assert torch.equal(loaded(IDS).logits, expected)
    loaded.load_adapter(tmp_path / "second", "second")
    assert loaded.active_adapter == "second"


def test_missing_directory_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CURLoRAModel.from_pretrained(tiny_llama(), tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        CURLoRAModel.from_pretrained(tiny_llama(), tmp_path)


def test_adapter_configs_written_before_normalize_existed_still_load(tmp_path):
    model = _trained(tiny_llama)
    expected = model(IDS).logits
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    old = json.loads(path.read_text())
    del old["normalize"]
    path.write_text(json.dumps(old))
    loaded = CURLoRAModel.from_pretrained(tiny_llama(), tmp_path)
    assert loaded.peft_config["default"].normalize is False and torch.equal(loaded(IDS).logits, expected)
