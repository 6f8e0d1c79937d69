import pytest
import torch
from conftest import tiny_gpt2, tiny_llama
from torch import nn

from curlora import CURLoRAConfig, CURLoRALayer, curlora_layers, get_curlora_model

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
