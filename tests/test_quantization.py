"""QCURLoRA: adapters on bitsandbytes-quantized base layers (int8, nf4), tiny Llama models."""

import copy

import conftest
import pytest
import torch
from torch import nn
from transformers import LlamaForCausalLM

from curlora import CURLoRAConfig, curlora_layers, get_curlora_model
from curlora.model import CURLoRAModel
from curlora.quantization import (
    dequantized_weight,
    is_quantized_linear,
    merge_quantized,
    quantize_model,
    quantized_weight_bytes,
)
from curlora.saving import AdapterMismatchError

SCHEMES = ["int8", "nf4"]
IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """Hidden 64 so that every weight holds whole 64-weight 4-bit blocks."""
    return conftest.tiny_llama(seed, hidden=64)


def _quantized_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of every quantized layer (weights, scales, quant-state), by module name."""
    out = {}
    for name, module in model.named_modules():
        if is_quantized_linear(module):
            name = name.replace(".base_layer", "")
            for key, value in module.state_dict().items():
                out[f"{name}.{key}"] = value.detach().clone()
    return out


def _train(model, steps=3, lr=0.05):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        model(input_ids=IDS, labels=IDS).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Per scheme: an adapter trained a few steps on the quantized base, saved; its logits."""
    out = {}
    for scheme in SCHEMES:
        model = get_curlora_model(quantize_model(tiny_llama(), scheme), CURLoRAConfig(r=4))
        _train(model)
        directory = tmp_path_factory.mktemp(scheme)
        model.save_pretrained(directory)
        with torch.no_grad():
            out[scheme] = (model, directory, model(IDS).logits)
    return out


def test_quantize_model_replaces_linears_but_lm_head():
    model = tiny_llama()
    float_bytes = quantized_weight_bytes(model)
    model = quantize_model(model, "nf4")
    assert quantized_weight_bytes(model) < 0.4 * float_bytes
    quantized = [n for n, m in model.named_modules() if is_quantized_linear(m)]
    assert len(quantized) == 2 * 7 and not any("lm_head" in n for n in quantized)
    assert type(model.lm_head) is nn.Linear
    assert not any(type(m) is nn.Linear for n, m in model.named_modules() if n != "lm_head")


def test_unknown_scheme_is_a_clear_error():
    with pytest.raises(ValueError, match="Unknown quantization scheme 'int3'"):
        quantize_model(tiny_llama(), "int3")


@pytest.mark.parametrize("scheme,tolerance", [("int8", 0.02), ("nf4", 0.2)])
def test_dequantized_weight_is_close_to_the_original(scheme, tolerance):
    base = tiny_llama()
    original = base.model.layers[0].self_attn.q_proj.weight.detach().clone()
    layer = quantize_model(base, scheme).model.layers[0].self_attn.q_proj
    weight = dequantized_weight(layer)
    assert weight.dtype == torch.float32 and weight.shape == original.shape
    assert float((weight - original).norm() / original.norm()) < tolerance


@pytest.mark.parametrize("scheme", SCHEMES)
def test_identical_outputs_at_init(scheme):
    base = quantize_model(tiny_llama(), scheme)
    with torch.no_grad():
        before = base(IDS).logits
    model = get_curlora_model(base, CURLoRAConfig(r=4))
    assert len(list(curlora_layers(model))) == 6
    for _, layer in curlora_layers(model):
        assert is_quantized_linear(layer.base_layer)
        adapter = layer.adapters["default"]
        assert adapter.C.dtype == torch.float32 and adapter.U.dtype == torch.float32
        assert torch.equal(adapter.C, dequantized_weight(layer.base_layer)[:, adapter.cols])
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, before)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_training_changes_only_u_and_quantized_weights_stay_bit_identical(scheme):
    model = get_curlora_model(quantize_model(tiny_llama(), scheme), CURLoRAConfig(r=4))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(".U") for n in trainable)
    quantized = _quantized_state(model)
    others = {n: p.detach().clone() for n, p in model.named_parameters() if not n.endswith(".U")}
    u_before = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(".U")}
    # An eval-mode no-grad forward first: bnb NF4 would repack its weight here on avx512_bf16 CPUs.
    with torch.no_grad():
        model(IDS)
    _train(model)
    after = _quantized_state(model)
    assert quantized.keys() == after.keys() and quantized
    assert all(torch.equal(quantized[k], after[k]) for k in quantized)
    assert all(torch.equal(p, dict(model.named_parameters())[n]) for n, p in others.items())
    assert all(not torch.equal(p, dict(model.named_parameters())[n]) for n, p in u_before.items())


@pytest.mark.parametrize("scheme", SCHEMES)
def test_save_load_on_quantized_base_reproduces_outputs(trained, scheme):
    _, directory, logits = trained[scheme]
    loaded = CURLoRAModel.from_pretrained(quantize_model(tiny_llama(), scheme), directory)
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, logits)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_adapter_with_a_loose_tolerance_loads_on_the_unquantized_base(tmp_path, scheme):
    # Quantization round-off moves the C/R fingerprints (on SmolLM2: int8 up to 3 %, nf4 up to
    # 28 %); an adapter trained with fingerprint_rtol above that loads on the float base.
    model = get_curlora_model(quantize_model(tiny_llama(), scheme), CURLoRAConfig(r=4, fingerprint_rtol=0.5))
    _train(model)
    model.save_pretrained(tmp_path)
    loaded = CURLoRAModel.from_pretrained(tiny_llama(), tmp_path)
    assert len(list(curlora_layers(loaded))) == 6
    for (_, a), (_, b) in zip(curlora_layers(model), curlora_layers(loaded)):
        assert torch.equal(a.adapters["default"].U, b.adapters["default"].U)
        assert torch.equal(a.adapters["default"].cols, b.adapters["default"].cols)


def test_nf4_adapter_on_the_unquantized_base_fails_clearly(trained):
    # NF4 round-off moves the fingerprints by ~10 %: refused with the default rtol (1e-2).
    _, directory, _ = trained["nf4"]
    with pytest.raises(AdapterMismatchError, match="relative difference"):
        CURLoRAModel.from_pretrained(tiny_llama(), directory)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_merge_and_unload_full_precision_and_requantized(trained, scheme):
    model, _, logits = trained[scheme]
    merged = copy.deepcopy(model).merge_and_unload(requantize=False)
    q_proj = merged.model.layers[0].self_attn.q_proj
    assert type(q_proj) is nn.Linear and not q_proj.weight.requires_grad
    requantized = copy.deepcopy(model).merge_and_unload(requantize=True)
    assert is_quantized_linear(requantized.model.layers[0].self_attn.q_proj)
    with torch.no_grad():
        exact = merged(IDS).logits
        rounded = requantized(IDS).logits
    # nf4 dequantizes inside its matmul, so a full-precision merge is exact up to float rounding;
    # bnb int8 (eval) also rounds the activations to int8, which the merged nn.Linear does not.
    assert float((exact - logits).abs().max()) < (1e-4 if scheme == "nf4" else 0.05)
    assert float((rounded - logits).abs().max()) < 0.1


def test_in_place_merge_of_a_quantized_layer_is_refused():
    model = get_curlora_model(quantize_model(tiny_llama(), "nf4"), CURLoRAConfig(r=4))
    with pytest.raises(RuntimeError, match="merge_and_unload"):
        model.merge_adapter()


def test_merge_quantized_without_delta_is_the_dequantized_layer():
    layer = quantize_model(tiny_llama(), "nf4").model.layers[0].self_attn.q_proj
    linear = merge_quantized(layer, None)
    assert torch.equal(linear.weight, dequantized_weight(layer))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_deepcopy_of_quantized_adapted_model(scheme):
    model = get_curlora_model(quantize_model(tiny_llama(), scheme), CURLoRAConfig(r=4))
    _train(model, steps=1)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        assert torch.equal(clone(IDS).logits, model(IDS).logits)


def test_continual_config_validates_quantize():
    from curlora.continual.config import ContinualConfig

    assert ContinualConfig(quantize="nf4", methods=["curlora"]).quantize == "nf4"
    with pytest.raises(ValueError, match="Unknown quantize scheme"):
        ContinualConfig(quantize="int3")
    with pytest.raises(ValueError, match="full"):
        ContinualConfig(quantize="int8", methods=["curlora", "full"])


@pytest.mark.parametrize("scheme", SCHEMES)
def test_continual_benchmark_runs_on_a_quantized_base(tmp_path_factory, smol_tokenizer, data_dir, scheme):
    import json

    from curlora.continual import ContinualRunner
    from curlora.continual.config import ContinualConfig

    model_dir = conftest.save_tiny_llama(tmp_path_factory.mktemp("tiny-llama-64"), smol_tokenizer, hidden=64)
    run_dir = tmp_path_factory.mktemp(f"continual-{scheme}")
    settings = ContinualConfig(
        model=str(model_dir), tasks=["sst2", "mrpc"], corpus="wikitext2", data_dir=str(data_dir),
        methods=["curlora", "lora", "head"], ranks=[4], examples_per_task=24, eval_examples=20,
        batch_size=8, max_length=32, lr=1e-2, head_lr=1e-2, ppl_max_tokens=96, ppl_window=64,
        ppl_stride=32, progress=False, quantize=scheme,
    )
    results = ContinualRunner(settings, run_dir).run()
    assert all(run["status"] == "ok" for run in results["runs"]), results["runs"]
    assert json.loads((run_dir / "results.json").read_text())["runs"]
    assert "quantize: " + scheme in (run_dir / "config.yaml").read_text()


def test_bf16_base_stores_c_and_r_in_bf16():
    base = quantize_model(tiny_llama().to(torch.bfloat16), "nf4")
    with torch.no_grad():
        before = base(IDS).logits
    model = get_curlora_model(base, CURLoRAConfig(r=4))
    adapter = next(layer for _, layer in curlora_layers(model)).adapters["default"]
    assert adapter.C.dtype == adapter.R.dtype == torch.bfloat16 and adapter.U.dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, before)
    _train(model, steps=1)
    assert adapter.U.abs().sum() > 0


def test_nf4_layer_repacked_by_an_eval_forward_is_repaired_when_adapted():
    """A Linear4bit built without quantize_model keeps bnb's avx512_bf16 fast path on; an eval
    no-grad forward may repack its weight (on CPUs that have avx512_bf16). Adapting it must
    still read the true weight and let gradients through."""
    import bitsandbytes as bnb

    torch.manual_seed(0)
    linear = nn.Linear(64, 64)
    layer = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type="nf4")
    layer.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    layer = layer.to("cpu").eval()
    x = torch.randn(3, 64)
    with torch.no_grad():
        reference = layer(x)  # may repack here
    from bitsandbytes.nn.modules import has_avx512bf16

    if has_avx512bf16():  # the trap is armed on this CPU
        assert layer.weight.quant_state.packing_format_for_cpu
    weight = dequantized_weight(layer)
    assert float((weight - linear.weight.detach()).norm() / linear.weight.detach().norm()) < 0.2
    assert layer.support_avx512bf16_for_cpu is False
    wrapped = nn.Sequential(layer)
    model = get_curlora_model(wrapped, CURLoRAConfig(r=4, target_modules=["0"]))
    with torch.no_grad():
        exact = torch.nn.functional.linear(x, weight, layer.bias)
        assert torch.allclose(model(x), exact, atol=1e-4)
        assert torch.allclose(reference, exact, atol=0.05)  # the repacked kernel computed in bf16
    inputs = x.clone().requires_grad_(True)
    model(inputs).sum().backward()
    assert inputs.grad.abs().sum() > 0
    assert next(p for p in model.parameters() if p.requires_grad).grad.abs().sum() > 0


# --- merges and adapter outputs against references built by hand --------------------------------------------
# The references below use bitsandbytes directly (dequantize, build a quantized layer), never curlora's
# backend, and ΔW = alpha · C U R from the dequantized weight at the adapter's indices. U is large enough
# that the adapter moves the logits by far more than each comparison's tolerance (asserted in each test).

ALL_SCHEMES = ["int8", "nf4", "fp4"]
ALPHA = 2.0


def _bnb_dequantized(layer: nn.Module) -> torch.Tensor:
    import bitsandbytes as bnb

    weight = layer.weight
    if isinstance(layer, bnb.nn.Linear4bit):
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
    scb = weight.SCB if getattr(weight, "SCB", None) is not None else layer.state.SCB
    return bnb.functional.int8_vectorwise_dequant(weight.data, scb).float()


def _bnb_layer(weight: torch.Tensor, scheme: str) -> nn.Module:
    """A bias-free bitsandbytes layer holding ``weight``, built the way bitsandbytes documents it."""
    import bitsandbytes as bnb

    out_features, in_features = weight.shape
    if scheme == "int8":
        layer = bnb.nn.Linear8bitLt(in_features, out_features, bias=False, has_fp16_weights=False, threshold=0.0)
        layer.weight = bnb.nn.Int8Params(weight.clone(), requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=torch.float32,
                                  quant_type=scheme, compress_statistics=False)
        layer.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, quant_type=scheme, blocksize=64,
                                         compress_statistics=False)
        layer.support_avx512bf16_for_cpu = False
    return layer.to("cpu").eval()


class _PlusDelta(nn.Module):
    """base(x) + x·ΔWᵀ: the unmerged adapter's output, written out."""

    def __init__(self, base: nn.Module, delta: torch.Tensor) -> None:
        super().__init__()
        self.base, self.delta = base, delta

    def forward(self, x):
        return self.base(x) + x @ self.delta.t().to(x.dtype)


def _linear(weight: torch.Tensor) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        linear.weight.copy_(weight)
    return linear.requires_grad_(False).eval()


def _adapted_with_large_u(scheme: str) -> CURLoRAModel:
    model = get_curlora_model(quantize_model(tiny_llama(), scheme), CURLoRAConfig(r=4, alpha=ALPHA))
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _, layer in curlora_layers(model):
            layer.adapters["default"].U.copy_(10 * torch.randn(4, 4, generator=generator))
    return model.eval()


def _reference(model: CURLoRAModel, replace) -> nn.Module:
    """A copy of the base model whose adapted layers are ``replace(quantized base, Wd, ΔW)``; every other
    layer (quantized o_proj, MLP, ...) is the same module as in the adapted model."""
    reference = copy.deepcopy(model.base_model)
    for name, layer in list(curlora_layers(reference)):
        adapter = layer.adapters["default"]
        wd = _bnb_dequantized(layer.base_layer)
        C, R = wd[:, adapter.cols], wd[adapter.rows, :]
        delta = (C @ adapter.U.detach() @ R).mul_(ALPHA)
        parent, _, child = name.rpartition(".")
        setattr(reference.get_submodule(parent), child, replace(layer.base_layer, wd, delta))
    return reference.eval()


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("scheme", ALL_SCHEMES)
def test_adapter_output_on_a_quantized_base_equals_base_plus_delta_by_hand(scheme):
    model = _adapted_with_large_u(scheme)
    got = _logits(model)
    want = _logits(_reference(model, lambda base, wd, delta: _PlusDelta(base, delta)))
    without = _logits(_reference(model, lambda base, wd, delta: base))
    tolerance = 1e-4
    assert float((want - without).abs().max()) > 100 * tolerance  # the adapter's effect
    assert float((got - want).abs().max()) < tolerance


@pytest.mark.parametrize("scheme", ALL_SCHEMES)
def test_full_precision_merge_is_dequantized_weight_plus_delta(scheme):
    model = _adapted_with_large_u(scheme)
    merged = copy.deepcopy(model).merge_and_unload()  # full precision by default
    q_proj = merged.model.layers[0].self_attn.q_proj
    assert type(q_proj) is nn.Linear and q_proj.weight.dtype == torch.float32
    want = _logits(_reference(model, lambda base, wd, delta: _linear(wd + delta)))
    without = _logits(_reference(model, lambda base, wd, delta: _linear(wd)))
    tolerance = 1e-4
    assert float((want - without).abs().max()) > 100 * tolerance
    assert float((_logits(merged) - want).abs().max()) < tolerance
    # Layer by layer, the merged weight itself.
    reference = _reference(model, lambda base, wd, delta: _linear(wd + delta))
    for name, _ in curlora_layers(model):
        name = name[len("base_model."):] if name.startswith("base_model.") else name
        torch.testing.assert_close(merged.get_submodule(name).weight, reference.get_submodule(name).weight,
                                   rtol=0, atol=1e-6)


@pytest.mark.parametrize("scheme", ALL_SCHEMES)
def test_requantized_merge_is_the_scheme_applied_to_dequantized_weight_plus_delta(scheme):
    model = _adapted_with_large_u(scheme)
    merged = copy.deepcopy(model).merge_and_unload(requantize=True)
    q_proj = merged.model.layers[0].self_attn.q_proj
    assert is_quantized_linear(q_proj)
    want = _logits(_reference(model, lambda base, wd, delta: _bnb_layer(wd + delta, scheme)))
    dropped = _logits(_reference(model, lambda base, wd, delta: _bnb_layer(wd, scheme)))
    tolerance = 1e-4
    assert float((want - dropped).abs().max()) > 100 * tolerance  # ΔW survives requantization here
    assert float((_logits(merged) - want).abs().max()) < tolerance
