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
