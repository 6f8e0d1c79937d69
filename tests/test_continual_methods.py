"""The method registry: lookup, variants, PEFT sizing, and what each entry builds."""

import pytest
import torch
from conftest import tiny_llama

from curlora import CURLoRAModel, curlora_layers
from curlora.continual import ContinualConfig, run_specs
from curlora.continual.methods import REGISTRY, BuildContext, peft_size_argument, resolve

CONTEXT = BuildContext(rank=4, seed=0, alpha=1.0, target_modules=None)


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_every_registered_method_builds_and_trains_what_it_says():
    for name, method in REGISTRY.items():
        adapted = method.adapt(tiny_llama(), CONTEXT)
        n = trainable(adapted.model)
        if method.frozen_backbone:
            assert n == 0, name
        elif method.trains_base_weights:
            assert n == sum(p.numel() for p in adapted.model.parameters()), name
        else:
            assert 0 < n < sum(p.numel() for p in adapted.model.parameters()) // 10, name
        assert bool(adapted.u_params) == method.takes_u_penalty, name


def test_curlora_variants_differ_only_in_sampling():
    plain = resolve("curlora").adapt(tiny_llama(), CONTEXT).model
    standard = resolve("curlora-standard").adapt(tiny_llama(), CONTEXT).model
    assert isinstance(standard, CURLoRAModel)
    assert standard.peft_config["default"].sampling == "standard"
    cols = [layer.adapters["default"].cols for _, layer in curlora_layers(plain)]
    cols_std = [layer.adapters["default"].cols for _, layer in curlora_layers(standard)]
    assert any(not torch.equal(a, b) for a, b in zip(cols, cols_std))


def test_declared_peft_variant_runs_beside_its_base():
    variants = {"lora-pissa": {"base": "lora", "init_lora_weights": "pissa"}}
    config = ContinualConfig(methods=["lora", "lora-pissa"], method_variants=variants)
    keys = [spec.key for spec in run_specs(config)]
    assert keys == ["lora_r16_lr0.001_s0", "lora-pissa_r16_lr0.001_s0"]
    plain = config.method("lora").adapt(tiny_llama(), CONTEXT).model
    pissa = config.method("lora-pissa").adapt(tiny_llama(), CONTEXT).model
    assert plain.peft_config["default"].init_lora_weights is True
    assert pissa.peft_config["default"].init_lora_weights == "pissa"
    # PiSSA moves the principal components into the adapter: the base weight itself changed.
    q = "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"
    assert not torch.equal(dict(plain.named_parameters())[q], dict(pissa.named_parameters())[q])


def test_peft_types_get_the_size_argument_they_have():
    assert peft_size_argument("LORA") == "r"
    assert peft_size_argument("VERA") == "r"
    assert peft_size_argument("OSF") == "effective_rank"
    assert peft_size_argument("IA3") is None
    assert resolve("peft:vera").takes_rank
    assert not resolve("peft:ia3").takes_rank
    # IA3 takes no rank: one run, not one per rank.
    config = ContinualConfig(methods=["peft:ia3"], ranks=[4, 8], peft_kwargs={
        "peft:ia3": {"feedforward_modules": []}})
    assert [spec.rank for spec in run_specs(config)] == [None]


def test_bad_method_names_and_variants_are_refused_with_the_way_out():
    with pytest.raises(ValueError, match="method_variants"):
        ContinualConfig(methods=["dora"])
    with pytest.raises(ValueError, match="Unknown PEFT type"):
        ContinualConfig(methods=["peft:nonsense"])
    with pytest.raises(ValueError, match="needs a 'base'"):
        ContinualConfig(methods=["x"], method_variants={"x": {"init_lora_weights": "pissa"}})
    with pytest.raises(ValueError, match="trains the base weights"):
        ContinualConfig(methods=["full"], quantize="int8")
