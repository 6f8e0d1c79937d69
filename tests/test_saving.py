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


def _state(r=3, out_f=6, in_f=5, **changes):
    from curlora.saving import LayerState

    weight = torch.arange(1.0, out_f * in_f + 1).reshape(out_f, in_f) / 10
    cols, rows = torch.tensor([0, 2, 4][:r]), torch.tensor([1, 3, 5][:r])
    from curlora.saving import fingerprint

    values = dict(U=torch.zeros(r, r), cols=cols, rows=rows, fingerprint=fingerprint(weight[:, cols], weight[rows, :]),
                  shape=(out_f, in_f))
    values.update(changes)
    return weight, LayerState(**values)


def test_check_layer_accepts_its_base_even_at_zero_tolerance_and_names_every_mismatch():
    from curlora.saving import check_layer

    weight, state = _state()
    check_layer("q", state, weight, rtol=0.0, trained_on="")  # the exact base: difference 0 ≤ 0
    hint = r" The adapter was trained on 'org/base'; load it onto that model\.$"
    with pytest.raises(AdapterMismatchError, match=r"relative difference 0\.05 > 0\.01\)\." + hint):
        check_layer("q", state, weight * 1.05, 0.01, "org/base")
    with pytest.raises(AdapterMismatchError, match=r"\(7, 5\) \(out × in\) but the adapter was trained on a "
                                                   r"\(6, 5\) weight\." + hint):
        check_layer("q", state, torch.ones(7, 5), 0.01, "org/base")
    with pytest.raises(AdapterMismatchError, match=r"\(6, 5\) weight\.$"):  # no hint without a name
        check_layer("q", state, torch.ones(7, 5), 0.01, "")


def test_a_layers_tensors_are_checked_against_its_rank_and_shape_before_any_base_is_read():
    """Rank and index range are judged from the file alone (an index equal to the side's length is
    outside, for columns and for rows alone), before check_layer compares anything with a base."""
    from curlora.saving import FINGERPRINT_KEY, INDEX_KEY, U_KEY, AdapterFileError, _layer

    def tensors(cols=(0, 2, 4), rows=(1, 3, 5), u=(3, 3)):
        return {f"q.{U_KEY}": torch.zeros(*u), f"q.{INDEX_KEY}": torch.tensor([cols, rows]),
                f"q.{FINGERPRINT_KEY}": torch.ones(2, 3)}

    state = _layer("f", "q", [6, 5], tensors(cols=(0, 2, 4), rows=(1, 3, 5)), 3)
    assert state.shape == (6, 5) and state.cols.tolist() == [0, 2, 4] and state.rows.tolist() == [1, 3, 5]
    with pytest.raises(AdapterFileError, match=r"'curlora_U' must be 3 × 3 \(rank r=3\)"):
        _layer("f", "q", [6, 5], tensors(u=(3, 2)), 3)
    with pytest.raises(AdapterFileError, match=r"\[0, 5\) for columns and \[0, 6\) for rows"):
        _layer("f", "q", [6, 5], tensors(cols=(0, 2, 5)), 3)
    with pytest.raises(AdapterFileError, match="for rows"):
        _layer("f", "q", [6, 5], tensors(rows=(1, 3, 6)), 3)
    with pytest.raises(AdapterFileError, match="for rows"):
        _layer("f", "q", [6, 5], tensors(rows=(-1, 3, 5)), 3)


def test_check_layer_difference_is_relative_to_the_fingerprint_even_for_tiny_weights():
    from curlora.saving import check_layer

    weight, state = _state()
    small = weight * 1e-4
    _, small_state = _state(fingerprint=state.fingerprint * 1e-4)
    check_layer("q", small_state, small, 0.01, "")
    with pytest.raises(AdapterMismatchError, match="relative difference 0.05"):  # 5 % off, whatever the scale
        check_layer("q", small_state, small * 1.05, 0.01, "")
    check_layer("q", small_state, small * 1.005, 0.01, "")  # 0.5 % is within 1 %


def test_config_from_dict_checks_the_method_and_unknown_fields():
    data = CURLoRAConfig(r=4).to_dict()
    assert CURLoRAConfig.from_dict(data) == CURLoRAConfig(r=4)
    assert CURLoRAConfig.from_dict({"r": 2}) == CURLoRAConfig(r=2)  # no method key: a CURLoRA config
    with pytest.raises(ValueError, match=r"^Adapter config is for method 'LORA', not CURLoRA\.$"):
        CURLoRAConfig.from_dict({**data, "method": "LORA"})
    with pytest.raises(ValueError, match=r"^Unknown CURLoRAConfig fields \['extra', 'more'\]; was it saved by a "
                                         r"newer curlora\?$"):
        CURLoRAConfig.from_dict({**data, "more": 1, "extra": 2})


def test_weights_file_missing_is_named(tmp_path):
    _trained(tiny_llama).save_pretrained(tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"adapter_model\.safetensors is missing: the adapter directory is "
                                                r"incomplete\."):
        CURLoRAModel.from_pretrained(tiny_llama(), tmp_path)


def test_config_validation_names_each_bad_field():
    """(Config checks live here with adapter_config.json's other tests: they run in the mutation selection.)"""
    assert CURLoRAConfig(r=1).r == 1 and CURLoRAConfig(dropout=0.99).dropout == 0.99
    for bad in (0, -2, True, 1.5, "4"):
        with pytest.raises(ValueError, match=rf"^CURLoRAConfig\.r must be a positive integer, got {bad!r}\.$"):
            CURLoRAConfig(r=bad)
    with pytest.raises(ValueError, match=r"^CURLoRAConfig\.sampling must be one of \('inverse', 'standard', "
                                         r"'uniform'\), got 'random'\.$"):
        CURLoRAConfig(sampling="random")
    for bad in (1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=rf"^CURLoRAConfig\.dropout must be in \[0, 1\), got {bad!r}\.$"):
            CURLoRAConfig(dropout=bad)
    config = CURLoRAConfig(target_modules=("v_proj", "q_proj"), modules_to_save={"lm_head", "model.norm"})
    assert config.target_modules == ["q_proj", "v_proj"] and config.modules_to_save == ["lm_head", "model.norm"]
    assert CURLoRAConfig(target_modules=r"layers\.\d+").target_modules == r"layers\.\d+"  # a regex stays a string


def test_config_file_is_indented_json_that_loads_back(tmp_path):
    config = CURLoRAConfig(r=4, alpha=0.5, target_modules=("k_proj", "q_proj"), seed=3)
    config.save(tmp_path)
    text = (tmp_path / "adapter_config.json").read_text()
    assert text == json.dumps(config.to_dict(), indent=2) + "\n"
    assert '\n  "r": 4,\n' in text and json.loads(text)["method"] == "CURLORA"
    assert CURLoRAConfig.load(tmp_path) == config


def test_file_metadata_and_index_dtype(tmp_path):
    _trained(tiny_llama).save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), framework="pt") as f:
        metadata = f.metadata()
        indices = [f.get_tensor(k) for k in f.keys() if k.endswith("curlora_indices")]
    from curlora import __version__

    assert metadata["format"] == "pt" and metadata["curlora_version"] == __version__
    assert indices and all(t.dtype == torch.int32 and t.shape == (2, 4) for t in indices)


def test_a_weights_file_without_curlora_metadata_is_refused(tmp_path):
    from safetensors.torch import save_file

    _trained(tiny_llama).save_pretrained(tmp_path)
    save_file({"x": torch.zeros(1)}, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors has no valid CURLoRA 'shapes' metadata; was "
                                         r"it written by curlora\?$"):
        CURLoRAModel.from_pretrained(tiny_llama(), tmp_path)
