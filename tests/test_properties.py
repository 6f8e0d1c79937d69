"""Property tests of the core's invariants on random small shapes and dtypes (hypothesis).

Each property is checked against a formula written out here, not against the code's own helpers.
Modest example counts keep the file to seconds.
"""

from __future__ import annotations

import tempfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from transformers.pytorch_utils import Conv1D

from curlora import CURLoRAConfig, get_curlora_model
from curlora.layer import CURLoRALayer, weight_out_in
from curlora.model import CURLoRAModel, curlora_layers
from curlora.sampling import NEGLIGIBLE_SHARE, module_generator, probabilities_from_norms, sample_indices

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MODES = ("inverse", "standard", "uniform")


def _expected_probabilities(norms: torch.Tensor, mode: str) -> torch.Tensor:
    """The paper's formulas in float64, dead (negligible-share) entries at probability 0."""
    norms = norms.double()
    share = norms / norms.sum()
    usable = share >= NEGLIGIBLE_SHARE
    if mode == "standard":
        weights = share
    elif mode == "inverse":
        weights = torch.where(usable, 1 / share.clamp_min(NEGLIGIBLE_SHARE), torch.zeros_like(share))
    else:
        weights = torch.ones_like(share)
    weights = torch.where(usable, weights, torch.zeros_like(weights))
    return weights / weights.sum()


squared_norms = st.lists(
    st.one_of(st.just(0.0), st.floats(1e-3, 1e3)), min_size=1, max_size=12
).filter(lambda xs: sum(xs) > 0)


@FAST
@given(norms=squared_norms, mode=st.sampled_from(MODES))
def test_probabilities_are_non_negative_sum_to_one_and_follow_the_formula(norms, mode):
    norms = torch.tensor(norms, dtype=torch.float32)
    p = probabilities_from_norms(norms, mode)
    assert p.shape == norms.shape and p.dtype == torch.float32
    assert bool((p >= 0).all()) and abs(float(p.sum()) - 1) < 1e-5
    assert bool((p[norms == 0] == 0).all())  # a zero column is never drawn
    torch.testing.assert_close(p.double(), _expected_probabilities(norms, mode), rtol=1e-5, atol=1e-7)


shapes = st.tuples(st.integers(2, 12), st.integers(2, 12))


@FAST
@given(shape=shapes, data=st.data(), mode=st.sampled_from(MODES), replacement=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]), seed=st.integers(0, 2**16))
def test_sampled_indices_are_in_range_distinct_without_replacement_and_reproducible(
        shape, data, mode, replacement, dtype, seed):
    out_f, in_f = shape
    r = data.draw(st.integers(1, min(shape)))
    w = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed)).to(dtype)
    cols, rows = sample_indices(w, r, mode, replacement, module_generator(seed, "layer", "cpu"))
    assert cols.shape == rows.shape == (r,)
    assert int(cols.min()) >= 0 and int(cols.max()) < in_f
    assert int(rows.min()) >= 0 and int(rows.max()) < out_f
    if not replacement:
        assert len(set(cols.tolist())) == r and len(set(rows.tolist())) == r
    again = sample_indices(w, r, mode, replacement, module_generator(seed, "layer", "cpu"))
    assert torch.equal(cols, again[0]) and torch.equal(rows, again[1])


def _layer(kind: str, out_f: int, in_f: int, dtype: torch.dtype, seed: int) -> tuple[CURLoRALayer, nn.Module]:
    torch.manual_seed(seed)
    base = {
        "linear": lambda: nn.Linear(in_f, out_f),
        "linear-no-bias": lambda: nn.Linear(in_f, out_f, bias=False),
        "conv1d": lambda: Conv1D(out_f, in_f),
    }[kind]().to(dtype)
    if kind == "conv1d":
        with torch.no_grad():
            base.bias.normal_()
    return CURLoRALayer(base), base


layer_cases = st.fixed_dictionaries({
    "kind": st.sampled_from(["linear", "linear-no-bias", "conv1d"]),
    "shape": shapes,
    "dtype": st.sampled_from([torch.float32, torch.float64]),
    "alpha": st.sampled_from([0.5, 1.0, -2.0]),
    "normalize": st.booleans(),
    "seed": st.integers(0, 2**16),
})


def _adapted(case, data):
    out_f, in_f = case["shape"]
    layer, base = _layer(case["kind"], out_f, in_f, case["dtype"], case["seed"])
    r = data.draw(st.integers(1, min(out_f, in_f)))
    cols = torch.tensor(data.draw(st.lists(st.integers(0, in_f - 1), min_size=r, max_size=r)))
    rows = torch.tensor(data.draw(st.lists(st.integers(0, out_f - 1), min_size=r, max_size=r)))
    adapter = layer.add_adapter("x", cols, rows, alpha=case["alpha"], normalize=case["normalize"])
    layer.active_adapter = "x"
    with torch.no_grad():
        adapter.U.normal_()
    return layer, base, adapter


@FAST
@given(case=layer_cases, data=st.data(), batch=st.integers(1, 4))
def test_fused_layer_equals_base_plus_alpha_c_u_r_in_value_and_gradient(case, data, batch):
    layer, base, adapter = _adapted(case, data)
    out_f, in_f = case["shape"]
    dtype = case["dtype"]
    w = weight_out_in(base).detach()
    C, R = w[:, adapter.cols], w[adapter.rows, :]
    if case["normalize"]:
        C, R = C / C.norm(dim=0, keepdim=True), R / R.norm(dim=1, keepdim=True)
    u = adapter.U.detach().clone().to(dtype).requires_grad_(True)
    x = torch.randn(batch, 3, in_f, dtype=dtype)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out = layer(x1)
    assert type(out.grad_fn).__name__ == "_FusedCURLinearBackward"
    expected = base(x2) + x2 @ (case["alpha"] * C @ u @ R).t()
    tol = dict(rtol=1e-5, atol=1e-5)  # U, and with normalize its scales, are float32 whatever the base's dtype
    torch.testing.assert_close(out, expected, **tol)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(x1.grad, x2.grad, **tol)
    torch.testing.assert_close(adapter.U.grad.to(dtype), u.grad, rtol=1e-4, atol=1e-4)
    # The op-by-op path (the adapter module) gives the same.
    with torch.no_grad():
        torch.testing.assert_close(base(x) + adapter(x).to(dtype), expected.detach(), **tol)


@FAST
@given(case=layer_cases, data=st.data())
def test_merge_then_unmerge_restores_the_weight_and_merged_output_equals_unmerged(case, data):
    layer, base, adapter = _adapted(case, data)
    original = base.weight.detach().clone()
    x = torch.randn(2, case["shape"][1], dtype=case["dtype"])
    with torch.no_grad():
        unmerged = layer(x)
        layer.merge()
        assert layer.merged_adapters == ["x"]
        merged_weight = weight_out_in(base).detach().clone()
        merged = layer(x)
        layer.unmerge()
    tol = dict(rtol=1e-5, atol=1e-5)  # ΔW is float32 whatever the base's dtype
    torch.testing.assert_close(merged, unmerged, **tol)
    torch.testing.assert_close(merged_weight.double(),
                               (weight_out_in(base).detach() + adapter.delta_weight().to(case["dtype"])).double(),
                               **tol)
    torch.testing.assert_close(base.weight, original, **tol)
    assert layer.merged_adapters == []


class _Stack(nn.Module):
    def __init__(self, widths: list[int], dtype: torch.dtype, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.layers = nn.ModuleList(nn.Linear(a, b).to(dtype) for a, b in zip(widths, widths[1:]))

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(widths=st.lists(st.integers(3, 10), min_size=2, max_size=4), seed=st.integers(0, 2**16),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
       mode=st.sampled_from(MODES), normalize=st.booleans(), alpha=st.sampled_from([0.25, 1.0, 3.0]))
def test_save_then_load_restores_every_output_exactly(widths, seed, dtype, mode, normalize, alpha):
    r = min(widths) - 1
    config = CURLoRAConfig(r=r, alpha=alpha, target_modules=r"layers\.\d+", sampling=mode, normalize=normalize,
                           seed=seed)
    model = get_curlora_model(_Stack(widths, dtype, seed), config)
    with torch.no_grad():
        for _, layer in curlora_layers(model):
            layer.adapters["default"].U.normal_()
    x = torch.randn(5, widths[0], dtype=dtype)
    with torch.no_grad():
        want = model(x)
        with model.disable_adapter():
            base_out = model(x)
    if dtype != torch.bfloat16:
        assert not torch.equal(want, base_out)  # the adapter changes the output
    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        loaded = CURLoRAModel.from_pretrained(_Stack(widths, dtype, seed), directory)
    with torch.no_grad():
        assert torch.equal(loaded(x), want)
    for (_, a), (_, b) in zip(curlora_layers(model), curlora_layers(loaded)):
        a, b = a.adapters["default"], b.adapters["default"]
        assert torch.equal(a.U, b.U) and torch.equal(a.cols, b.cols) and torch.equal(a.rows, b.rows)
        assert torch.equal(a.C, b.C) and torch.equal(a.R, b.R)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bfloat16_fused_layer_is_close_to_the_float64_formula(dtype):
    """bfloat16 is checked at its own resolution (one fixed case: random bf16 cases add nothing)."""
    layer, base = _layer("linear", 24, 20, dtype, 0)
    adapter = layer.add_adapter("x", torch.tensor([0, 3, 3, 19]), torch.tensor([1, 5, 23, 7]), alpha=0.7)
    layer.active_adapter = "x"
    with torch.no_grad():
        adapter.U.normal_()
    x = torch.randn(4, 20).to(dtype)
    w = base.weight.detach().double()
    expected = x.double() @ (w + 0.7 * w[:, adapter.cols] @ adapter.U.detach().double() @ w[adapter.rows, :]).t()
    expected = expected + base.bias.detach().double()
    got = layer(x).double()
    tol = 0.03 * float(expected.abs().max()) if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(got, expected, rtol=0, atol=tol)
