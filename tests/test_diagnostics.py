import pytest
import torch
from conftest import tiny_gpt2, tiny_llama

from curlora import CURLoRAConfig, curlora_layers, get_curlora_model, stability_diagnostics

IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def test_zero_at_init_and_bound_holds_after_update():
    model = get_curlora_model(tiny_llama(), CURLoRAConfig(r=4, alpha=2.0))
    rows = stability_diagnostics(model, inputs={"input_ids": IDS})
    assert len(rows) == 6 and all(r["u_norm"] == 0 and r["delta_norm"] == 0 and r["output_shift"] == 0 for r in rows)
    with torch.no_grad():
        for _, layer in curlora_layers(model):
            layer.adapters["default"].U.normal_()
    rows = stability_diagnostics(model, inputs={"input_ids": IDS})
    for row, (_, layer) in zip(rows, curlora_layers(model)):
        adapter = layer.adapters["default"]
        expected = 2.0 * (adapter.C @ adapter.U @ adapter.R).norm()
        assert abs(row["delta_norm"] - float(expected)) < 1e-4 * float(expected)
        assert row["delta_norm"] <= row["bound"] * (1 + 1e-6)
        assert row["delta_relative"] == row["delta_norm"] / row["weight_norm"]
        assert row["output_shift"] > 0


def test_gpt2_rows_without_inputs_have_no_output_shift():
    model = get_curlora_model(tiny_gpt2(), CURLoRAConfig(r=4))
    rows = stability_diagnostics(model)
    assert [r["layer"].rsplit(".", 1)[-1] for r in rows] == ["c_attn", "c_attn"]
    assert "output_shift" not in rows[0]


def test_every_number_equals_its_formula_computed_from_the_base_weight():
    """||U||, ||ΔW|| = |alpha|·||C U R||, ||W||, their ratio, the bound |alpha|·||C||·||U||·||R|| and the
    output shift ||x ΔWᵀ|| / ||x Wᵀ||, each from W, the indices and the layer inputs, not the adapter's C/R."""
    alpha = -1.5  # a negative alpha: the norms and the bound take its absolute value
    model = get_curlora_model(tiny_llama(), CURLoRAConfig(r=4, alpha=alpha))
    layers = dict(curlora_layers(model))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in layers.values():
            layer.adapters["default"].U.copy_(torch.randn(4, 4, generator=gen))
    inputs: dict[str, torch.Tensor] = {}
    hooks = [layer.register_forward_pre_hook(lambda m, args, name=name: inputs.__setitem__(name, args[0].detach()))
             for name, layer in layers.items()]
    rows = stability_diagnostics(model, inputs={"input_ids": IDS})
    for hook in hooks:
        hook.remove()
    assert [row["layer"] for row in rows] == list(layers)
    for row in rows:
        layer = layers[row["layer"]]
        adapter = layer.adapters["default"]
        w = layer.base_layer.weight.detach().double()
        C, R, U = w[:, adapter.cols], w[adapter.rows, :], adapter.U.detach().double()
        delta = alpha * C @ U @ R
        expected = {
            "u_norm": U.norm(),
            "delta_norm": delta.norm(),
            "weight_norm": w.norm(),
            "delta_relative": delta.norm() / w.norm(),
            "bound": abs(alpha) * C.norm() * U.norm() * R.norm(),
            "output_shift": (inputs[row["layer"]].double() @ delta.t()).norm() / (inputs[row["layer"]].double() @ w.t()).norm(),
        }
        for key, value in expected.items():
            assert row[key] == pytest.approx(float(value), rel=1e-5), key
        # The bound is a real bound here, and not a vacuous one (within a few times the norm).
        assert row["delta_norm"] <= row["bound"] < 50 * row["delta_norm"]
        assert 1e-3 < row["output_shift"] < 10
