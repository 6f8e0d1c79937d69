import json

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama
from torch import nn

from curlora import AdapterMismatchError, CURLoRAConfig, CURLoRALayer, CURLoRAModel, curlora_layers, get_curlora_model

IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))


def _train_a_few_steps(model, steps=3, lr=0.05):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


@pytest.mark.parametrize("factory,expected", [(tiny_llama, 6), (tiny_gpt2, 2)])
def test_identical_outputs_at_init_and_default_targets(factory, expected):
    base = factory()
    before = base(IDS).logits
    model = get_curlora_model(base, CURLoRAConfig(r=4))
    assert len(list(curlora_layers(model))) == expected
    assert torch.equal(model(IDS).logits, before)


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2])
def test_only_u_trains_and_optimizer_never_sees_c_or_r(factory):
    model = get_curlora_model(factory(), CURLoRAConfig(r=4))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(".U") for n in trainable)
    trainable_ids = {id(p) for p in model.parameters() if p.requires_grad}
    for _, layer in curlora_layers(model):
        adapter = layer.adapters["default"]
        assert id(adapter.C) not in trainable_ids and not adapter.C.requires_grad
    weights = {n: p.detach().clone() for n, p in model.base_model.state_dict().items()}
    _train_a_few_steps(model)
    after = model.base_model.state_dict()
    changed = [n for n in weights if not torch.equal(weights[n], after[n])]
    assert changed and all(n.endswith(".U") for n in changed)
    assert model.get_nb_trainable_parameters()[0] == len(trainable) * 16


def test_modules_to_save_train_too():
    model = get_curlora_model(tiny_llama(), CURLoRAConfig(r=4, modules_to_save=["lm_head"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lm_head" in n for n in trainable)


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2])
def test_merged_equals_unmerged_after_training_and_unload_restores(factory):
    base = factory()
    original = {n: p.detach().clone() for n, p in base.state_dict().items()}
    model = get_curlora_model(base, CURLoRAConfig(r=4))
    _train_a_few_steps(model)
    unmerged = model(IDS).logits
    model.merge_adapter()
    torch.testing.assert_close(model(IDS).logits, unmerged, rtol=1e-4, atol=1e-4)
    with model.disable_adapter():
        disabled = model(IDS).logits
    torch.testing.assert_close(model(IDS).logits, unmerged, rtol=1e-4, atol=1e-4)
    restored = model.unload()
    assert not list(curlora_layers(restored))
    for name, value in restored.state_dict().items():
        torch.testing.assert_close(value, original[name], rtol=0, atol=1e-6)
    torch.testing.assert_close(disabled, restored(IDS).logits, rtol=1e-5, atol=1e-5)


def test_merge_and_unload_returns_plain_model_with_adapter_folded_in():
    model = get_curlora_model(tiny_llama(), CURLoRAConfig(r=4))
    _train_a_few_steps(model)
    expected = model(IDS).logits
    plain = model.merge_and_unload()
    assert not any(isinstance(m, CURLoRALayer) for m in plain.modules())
    torch.testing.assert_close(plain(IDS).logits, expected, rtol=1e-4, atol=1e-4)


def test_named_adapters_switch_and_train_separately():
    base = tiny_llama()
    plain = base(IDS).logits
    model = get_curlora_model(base, CURLoRAConfig(r=4, seed=0), adapter_name="task1")
    _train_a_few_steps(model)
    task1 = model(IDS).logits
    model.add_adapter("task2", CURLoRAConfig(r=2, seed=1))
    assert model.active_adapter == "task1"
    model.set_adapter("task2")
    assert torch.equal(model(IDS).logits, plain)  # task2's U is still zero
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".task2." in n for n in trainable)
    _train_a_few_steps(model)
    model.set_adapter("task1")
    torch.testing.assert_close(model(IDS).logits, task1)
    model.delete_adapter("task1")
    assert model.active_adapter == "task2"


def test_regex_targets_use_fullmatch():
    model = get_curlora_model(tiny_llama(), CURLoRAConfig(r=2, target_modules=r".*layers\.0\.self_attn\.(q|v)_proj"))
    assert sorted(n for n, _ in curlora_layers(model.base_model)) == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]


def test_bad_config_errors_are_clear():
    with pytest.raises(ValueError, match="positive integer"):
        CURLoRAConfig(r=0)
    with pytest.raises(ValueError, match="smaller side"):
        get_curlora_model(tiny_llama(), CURLoRAConfig(r=1000))
    with pytest.raises(ValueError, match="matched no module.*q_proj"):
        get_curlora_model(tiny_llama(), CURLoRAConfig(target_modules=["nonexistent"]))
    with pytest.raises(TypeError, match="embed_tokens.*Embedding"):
        get_curlora_model(tiny_llama(), CURLoRAConfig(target_modules=["embed_tokens"]))
    with pytest.raises(ValueError, match="model_type"):
        get_curlora_model(nn.Sequential(nn.Linear(4, 4)), CURLoRAConfig(r=2))
    with pytest.raises(ValueError, match="modules_to_save.*nope"):
        get_curlora_model(tiny_llama(), CURLoRAConfig(r=2, modules_to_save=["nope"]))


def test_plain_torch_model_with_explicit_targets():
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    model = get_curlora_model(net, CURLoRAConfig(r=2, target_modules=["0", "2"]))
    assert len(list(curlora_layers(model))) == 2
    assert model(torch.randn(3, 8)).shape == (3, 4)


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_adapted_model_traces_as_one_graph_for_torch_compile(build):
    """The fused autograd node must not break torch.compile's graph (tracing only: compiling
    the tiny model would take a minute; benchmarks/README.md has the compiled timings). No
    labels: transformers' own GPT-2 loss function breaks the graph, with or without adapters."""
    import torch._dynamo

    model = get_curlora_model(build(), CURLoRAConfig(r=4))
    ids = torch.randint(0, 128, (2, 16))
    explanation = torch._dynamo.explain(model)(input_ids=ids)
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_a_layer_with_a_dead_column_still_learns():
    """A zero column in q_proj used to take every inverse-probability draw (C = 0: a dead adapter)."""
    base = tiny_llama()
    q = base.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        q.weight[:, 3] = 0  # input feature 3 unused by this layer
        q.weight[10, :] = 0  # output row 10 dead too
    model = get_curlora_model(base, CURLoRAConfig(r=8))
    adapter = dict(curlora_layers(model.base_model))["model.layers.0.self_attn.q_proj"].adapters["default"]
    assert 3 not in adapter.cols.tolist() and 10 not in adapter.rows.tolist()
    assert adapter.C.abs().sum(0).min() > 0 and adapter.R.abs().sum(1).min() > 0
    model.train()
    model(input_ids=IDS, labels=IDS).loss.backward()
    assert adapter.U.grad.abs().sum() > 0


def test_a_layer_that_cannot_be_sampled_is_named_and_leaves_the_model_untouched():
    base = tiny_llama()
    with torch.no_grad():
        base.model.layers[1].self_attn.k_proj.weight[:, 2:] = 0  # 2 live columns of 48
    before = {n: p.clone() for n, p in base.state_dict().items()}
    with pytest.raises(ValueError, match=r"Layer 'model\.layers\.1\.self_attn\.k_proj': Only 2 of"):
        get_curlora_model(base, CURLoRAConfig(r=4, replacement=False))
    assert not list(curlora_layers(base))
    after = base.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[n], after[n]) for n in before)


def _with_random_u(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in curlora_layers(model):
            for adapter in layer.adapters.values():
                adapter.U.copy_(torch.randn(adapter.U.shape, generator=generator))
    return model


def test_print_trainable_parameters_counts_u_and_modules_to_save_against_every_parameter(capsys):
    base_total = sum(p.numel() for p in tiny_llama().parameters())
    model = get_curlora_model(tiny_llama(), CURLoRAConfig(r=4))
    model.print_trainable_parameters()
    trainable, total = 6 * 4 * 4, base_total + 6 * 4 * 4  # U only: C and R are buffers
    assert capsys.readouterr().out == (
        f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}\n"
    )
    assert model.get_nb_trainable_parameters() == (trainable, total)
    norm = sum(p.numel() for p in tiny_llama().model.norm.parameters())
    model = get_curlora_model(tiny_llama(), CURLoRAConfig(r=2, modules_to_save=["model.norm"]))
    model.print_trainable_parameters()
    trainable, total = 6 * 2 * 2 + norm, base_total + 6 * 2 * 2
    assert capsys.readouterr().out.startswith(f"trainable params: {trainable:,d} || all params: {total:,d} ||")
    assert model.get_nb_trainable_parameters() == (trainable, total)


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2])
def test_model_level_merge_then_unmerge_restores_every_weight_and_the_adapter_path(factory):
    model = _with_random_u(get_curlora_model(factory(), CURLoRAConfig(r=4)))
    weights = {n: m.base_layer.weight.detach().clone() for n, m in curlora_layers(model)}
    with torch.no_grad():
        unmerged = model(IDS).logits
        model.merge_adapter()
        assert all(layer.merged_adapters == ["default"] for _, layer in curlora_layers(model))
        assert all(not torch.allclose(m.base_layer.weight, weights[n]) for n, m in curlora_layers(model))
        torch.testing.assert_close(model(IDS).logits, unmerged, rtol=1e-4, atol=1e-4)
        model.unmerge_adapter()
        assert all(layer.merged_adapters == [] for _, layer in curlora_layers(model))
        for name, layer in curlora_layers(model):
            torch.testing.assert_close(layer.base_layer.weight, weights[name], rtol=0, atol=1e-6)
        # The adapter path again (not the merged weight): zeroing U now gives the base model.
        torch.testing.assert_close(model(IDS).logits, unmerged, rtol=1e-5, atol=1e-5)
        for _, layer in curlora_layers(model):
            layer.adapters["default"].U.zero_()
        base = factory()  # W + ΔW - ΔW: the original weight up to float rounding
        torch.testing.assert_close(model(IDS).logits, base(IDS).logits, rtol=1e-5, atol=1e-5)


def test_state_dict_holds_exactly_the_adapter_tensors_and_round_trips_onto_other_indices():
    model = get_curlora_model(tiny_llama(), CURLoRAConfig(r=4, seed=0, modules_to_save=["model.norm"]))
    model.add_adapter("second", CURLoRAConfig(r=2, seed=5))
    _with_random_u(model)
    with torch.no_grad():
        model.base_model.model.norm.weight.mul_(1.5)
    state = model.state_dict()
    layer_names = [n for n, _ in curlora_layers(model)]
    expected = {f"{n}.adapters.{a}.{key}" for n in layer_names for a in ("default", "second") for key in ("U", "cols", "rows")}
    assert set(state) == expected | {"base_model.model.norm.weight"}
    want = model(IDS).logits.detach()
    # A fresh model sampled with another seed: loading replaces U, the indices, and rebuilds C and R.
    other = get_curlora_model(tiny_llama(), CURLoRAConfig(r=4, seed=9, modules_to_save=["model.norm"]))
    other.add_adapter("second", CURLoRAConfig(r=2, seed=7))
    assert not all(torch.equal(state[k], other.state_dict()[k]) for k in expected if k.endswith("cols"))
    result = other.load_state_dict(state)
    assert result.missing_keys == [] and result.unexpected_keys == []
    for name, layer in curlora_layers(other):
        for adapter_name, adapter in layer.adapters.items():
            w = layer.base_layer.weight
            assert torch.equal(adapter.cols, state[f"{name}.adapters.{adapter_name}.cols"])
            assert torch.equal(adapter.C, w[:, adapter.cols]) and torch.equal(adapter.R, w[adapter.rows, :])
    with torch.no_grad():
        assert torch.equal(other(IDS).logits, want)
    missing = {k: v for k, v in state.items() if not k.endswith("default.U")}
    with pytest.raises(RuntimeError, match="missing keys"):
        other.load_state_dict(missing)
    assert other.load_state_dict(missing, strict=False).missing_keys  # named, not raised
    with pytest.raises(RuntimeError, match="unexpected keys"):
        other.load_state_dict({**state, "base_model.nonsense": torch.zeros(1)})
    other.merge_adapter()
    with pytest.raises(RuntimeError, match="Unmerge adapters"):
        other.load_state_dict(get_curlora_model(tiny_llama(), CURLoRAConfig(r=4, seed=3)).state_dict(), strict=False)


def test_extra_repr_and_unload_restore_the_plain_model():
    model = _with_random_u(get_curlora_model(tiny_llama(), CURLoRAConfig(r=4)))
    model.add_adapter("two", CURLoRAConfig(r=2, seed=1))
    layer = dict(curlora_layers(model))["base_model.model.layers.0.self_attn.q_proj"]
    assert layer.extra_repr() == "adapters={'default': 4, 'two': 2}, active='default', merged=[]"
    original = tiny_llama()
    model.merge_adapter()
    plain = model.unload()  # unmerges, then drops every adapter
    assert type(plain.model.layers[0].self_attn.q_proj) is nn.Linear and not list(curlora_layers(plain))
    assert model.peft_config == {} and model.active_adapter is None
    with torch.no_grad():
        torch.testing.assert_close(plain(IDS).logits, original(IDS).logits, rtol=1e-5, atol=1e-5)


def test_a_second_adapter_wraps_the_same_layers_never_their_insides():
    model = get_curlora_model(tiny_llama(), CURLoRAConfig(r=2, target_modules=r".*q_proj.*"))
    model.add_adapter("two", CURLoRAConfig(r=3, target_modules=r".*q_proj.*", seed=1))
    layers = dict(curlora_layers(model))
    assert sorted(layers) == [f"base_model.model.layers.{i}.self_attn.q_proj" for i in range(2)]
    for layer in layers.values():
        assert type(layer.base_layer) is nn.Linear and sorted(layer.adapters) == ["default", "two"]


def test_no_match_lists_the_adaptable_names_and_the_narrowest_layer_bounds_the_rank():
    with pytest.raises(ValueError, match=r"^Target modules \['nothing'\] matched no module of LlamaForCausalLM\. "
                                         r"Adaptable layer names in this model: \['down_proj', 'gate_proj', 'k_proj', "
                                         r"'lm_head', 'o_proj', 'q_proj', 'up_proj', 'v_proj'\]\.$"):
        get_curlora_model(tiny_llama(), CURLoRAConfig(target_modules=["nothing"]))
    # q_proj is 48 × 48, v_proj 24 × 48: r = 30 fits q_proj but not v_proj, which the error names.
    with pytest.raises(ValueError, match=r"r=30 is larger than the smaller side of 'model\.layers\.0\.self_attn\."
                                         r"v_proj' \(24 × 48\); choose r ≤ 24"):
        get_curlora_model(tiny_llama(), CURLoRAConfig(r=30, target_modules=["q_proj", "v_proj"]))
    model = get_curlora_model(tiny_llama(), CURLoRAConfig(r=24, target_modules=["q_proj", "v_proj"]))  # r = side
    assert {layer.adapters["default"].r for _, layer in curlora_layers(model)} == {24}


def test_indices_depend_on_the_seed_and_module_name_only():
    def indices(seed, global_seed):
        torch.manual_seed(global_seed)
        model = get_curlora_model(tiny_llama(), CURLoRAConfig(r=4, seed=seed))
        return {n: (l.adapters["default"].cols.tolist(), l.adapters["default"].rows.tolist())
                for n, l in curlora_layers(model)}

    a = indices(0, global_seed=1)
    assert indices(0, global_seed=2) == a  # the global RNG plays no part
    assert indices(1, global_seed=1) != a  # the config's seed does
    q0, q1 = a["base_model.model.layers.0.self_attn.q_proj"], a["base_model.model.layers.1.self_attn.q_proj"]
    assert q0 != q1  # same shape, different module: different draws


def test_adapter_names_are_checked_and_each_adapter_acts_only_on_its_own_layers(tmp_path):
    base = tiny_llama()
    base.config._name_or_path = "org/tiny"
    model = get_curlora_model(base, CURLoRAConfig(r=2, target_modules=["q_proj"]), adapter_name="a")
    model.add_adapter("b", CURLoRAConfig(r=2, target_modules=["v_proj"], seed=1))
    with pytest.raises(ValueError, match=r"^Adapter 'a' already exists; pick another name\.$"):
        model.add_adapter("a", CURLoRAConfig(r=2))
    with pytest.raises(ValueError, match=r"^No adapter 'c'; existing: \['a', 'b'\]\.$"):
        model.set_adapter("c")
    with pytest.raises(ValueError, match=r"^No adapter 'c'; existing: \['a', 'b'\]\.$"):
        model.delete_adapter("c")
    _with_random_u(model)
    model.set_adapter("b")
    layers = dict(curlora_layers(model))
    assert all(layer.active_adapter == ("b" if n.endswith("v_proj") else None) for n, layer in layers.items())
    with torch.no_grad():
        for n, layer in layers.items():  # only v_proj changes the output under "b"
            if n.endswith("v_proj"):
                layer.adapters["b"].U.zero_()
        torch.testing.assert_close(model(IDS).logits, tiny_llama()(IDS).logits)
    _with_random_u(model, seed=3)
    with torch.no_grad():
        b_out = model(IDS).logits
    model.merge_adapter()
    with pytest.raises(RuntimeError, match=r"^Unmerge adapters \(unmerge_adapter\(\)\) before switching adapters\.$"):
        model.set_adapter("a")
    model.unmerge_adapter()
    # Saving "b" writes only its v_proj layers (the q_proj layers come first and lack it) and names the base.
    model.save_pretrained(tmp_path, selected_adapters=["b"])
    saved = json.loads((tmp_path / "b" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == "org/tiny"
    other_base = tiny_llama()
    loaded = CURLoRAModel.from_pretrained(other_base, tmp_path / "b", adapter_name="b")
    assert sorted(n for n, _ in curlora_layers(loaded)) == sorted(n for n in layers if n.endswith("v_proj"))
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, b_out)
    with pytest.raises(ValueError, match=r"^Adapter 'b' already exists; pick another name\.$"):
        loaded.load_adapter(tmp_path / "b", "b")
    with pytest.raises(AdapterMismatchError, match=r"trained on 'org/tiny'; load it onto that model"):
        CURLoRAModel.from_pretrained(tiny_llama(seed=5), tmp_path / "b")
    # An explicit base name in the config is kept.
    model.peft_config["a"].base_model_name_or_path = "mine"
    model.save_pretrained(tmp_path / "x", selected_adapters=["a"])
    assert json.loads((tmp_path / "x" / "a" / "adapter_config.json").read_text())["base_model_name_or_path"] == "mine"
    model.delete_adapter("b")
    assert model.active_adapter == "a" and all("b" not in l.adapters for _, l in curlora_layers(model))
    model.delete_adapter("a")
    assert model.active_adapter is None and model.peft_config == {}


def test_wrapping_freezes_everything_and_exposes_the_models_forward_signature():
    import inspect

    model = CURLoRAModel(tiny_llama())  # no adapter yet: nothing trains
    assert not [n for n, p in model.named_parameters() if p.requires_grad]
    parameters = inspect.signature(model.forward).parameters  # what transformers.Trainer reads
    assert "input_ids" in parameters and "attention_mask" in parameters and "labels" in parameters


def test_layers_with_identical_weights_still_get_their_own_draws():
    base = tiny_llama()
    with torch.no_grad():
        base.model.layers[1].self_attn.q_proj.weight.copy_(base.model.layers[0].self_attn.q_proj.weight)
    model = get_curlora_model(base, CURLoRAConfig(r=4, target_modules=["q_proj"]))
    a, b = (layer.adapters["default"] for _, layer in curlora_layers(model))
    assert not (torch.equal(a.cols, b.cols) and torch.equal(a.rows, b.rows))


def test_state_dict_is_detached_nests_under_a_parent_and_loads_by_copy():
    model = _with_random_u(get_curlora_model(tiny_llama(), CURLoRAConfig(r=4)))
    state = model.state_dict()
    assert state and not any(v.requires_grad for v in state.values())
    parent = nn.Module()
    parent.child = model
    nested = parent.state_dict()
    assert set(nested) == {f"child.{k}" for k in state}
    other = get_curlora_model(tiny_llama(), CURLoRAConfig(r=4))
    params = {n: p for n, p in other.named_parameters() if n.endswith(".U")}
    other.load_state_dict(state)
    key = next(k for k in state if k.endswith(".U"))
    with torch.no_grad():
        state[key].add_(1.0)  # the loaded model holds copies, in the very parameters it had
    assert not torch.equal(other.state_dict()[key], state[key])
    assert all(p is dict(other.named_parameters())[n] for n, p in params.items())


def test_loading_rebuilds_c_and_r_wherever_only_some_indices_changed():
    model = _with_random_u(get_curlora_model(tiny_llama(), CURLoRAConfig(r=4)))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    key = "base_model.model.layers.1.self_attn.v_proj.adapters.default.cols"  # a late layer, columns only
    state[key] = (state[key] + 1) % 48
    model.load_state_dict(state)
    layer = dict(curlora_layers(model))["base_model.model.layers.1.self_attn.v_proj"]
    adapter = layer.adapters["default"]
    assert torch.equal(adapter.cols, state[key]) and torch.equal(adapter.C, layer.base_layer.weight[:, adapter.cols])
    model.merge_adapter()
    with pytest.raises(RuntimeError, match=r"^Unmerge adapters \(unmerge_adapter\(\)\) before loading a state dict\.$"):
        model.load_state_dict({**state, key: (state[key] + 1) % 48})


def test_a_loaded_adapter_is_frozen_unless_asked_and_errors_name_the_model(tmp_path):
    model = _with_random_u(get_curlora_model(tiny_llama(), CURLoRAConfig(r=4)))
    model.save_pretrained(tmp_path)  # tiny_llama has no name: the file records none
    assert json.loads((tmp_path / "adapter_config.json").read_text())["base_model_name_or_path"] is None
    loaded = CURLoRAModel.from_pretrained(tiny_llama(), tmp_path)
    assert loaded.get_nb_trainable_parameters()[0] == 0
    loaded.load_adapter(tmp_path, "again")  # load_adapter's own default: frozen too
    assert loaded.active_adapter == "again" and loaded.get_nb_trainable_parameters()[0] == 0
    assert CURLoRAModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True).get_nb_trainable_parameters()[0] == 96
    with pytest.raises(AdapterMismatchError) as error:
        CURLoRAModel.from_pretrained(tiny_llama(seed=4), tmp_path)
    assert "trained on" not in str(error.value)  # no base name, no hint naming one
    with pytest.raises(ValueError, match=r"does not exist in GPT2LMHeadModel; the adapter was trained on ''"):
        CURLoRAModel.from_pretrained(tiny_gpt2(), tmp_path)


def test_merge_and_unload_dequantizes_a_quantized_layer_that_lacks_the_active_adapter():
    """Adapter "a" on q_proj, "b" on v_proj, "a" active: merging folds a's ΔW into q_proj and nothing
    into v_proj, whose quantized layer becomes its plain dequantized weight (b is not active)."""
    import bitsandbytes as bnb

    from curlora.quantization import quantize_model

    def dequantized(module):  # bitsandbytes' own NF4 dequantization, not curlora's backend
        return bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).float()

    model = get_curlora_model(quantize_model(tiny_llama(hidden=64), "nf4"),  # whole 64-weight blocks
                              CURLoRAConfig(r=2, alpha=2.0, target_modules=["q_proj"]), adapter_name="a")
    model.add_adapter("b", CURLoRAConfig(r=2, target_modules=["v_proj"], seed=1))
    _with_random_u(model)
    layers = dict(curlora_layers(model))
    assert {n.rsplit(".", 1)[-1] for n, layer in layers.items() if layer.active_adapter is None} == {"v_proj"}
    want = {}
    for name, layer in layers.items():
        wd = dequantized(layer.base_layer)
        if name.endswith("q_proj"):
            adapter = layer.adapters["a"]
            delta = 2.0 * wd[:, adapter.cols] @ adapter.U.detach() @ wd[adapter.rows, :]
            assert float(delta.abs().max()) > 1e-3  # far above the tolerance below
            wd = wd + delta
        want[name.removeprefix("base_model.")] = wd
    merged = model.merge_and_unload()
    assert not list(curlora_layers(merged))
    for name, weight in want.items():
        layer = merged.get_submodule(name)
        assert type(layer) is nn.Linear and layer.weight.dtype == torch.float32
        torch.testing.assert_close(layer.weight, weight, rtol=0, atol=1e-6)
