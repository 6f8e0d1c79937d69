import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from curlora.layer import CURLoRALayer, weight_out_in


def _linear_and_conv1d(out_f=12, in_f=10):
    torch.manual_seed(0)
    linear = nn.Linear(in_f, out_f)
    conv = Conv1D(out_f, in_f)
    with torch.no_grad():
        conv.weight.copy_(linear.weight.t())
        conv.bias.copy_(linear.bias)
    return linear, conv


def test_conv1d_and_linear_give_the_same_adapter_output():
    linear, conv = _linear_and_conv1d()
    cols, rows = torch.tensor([0, 3, 5, 5]), torch.tensor([1, 2, 7, 11])
    a, b = CURLoRALayer(linear), CURLoRALayer(conv)
    for layer in (a, b):
        layer.add_adapter("x", cols, rows, alpha=0.5)
        layer.active_adapter = "x"
        with torch.no_grad():
            layer.adapters["x"].U.copy_(torch.arange(16.0).reshape(4, 4) / 10)
    x = torch.randn(3, 5, 10)
    torch.testing.assert_close(a(x), b(x))
    torch.testing.assert_close(a.delta_weight(), b.delta_weight())
    assert torch.equal(a.adapters["x"].C, linear.weight[:, cols])
    assert torch.equal(b.adapters["x"].R, weight_out_in(conv)[rows, :])


def test_forward_is_the_factored_product():
    linear, _ = _linear_and_conv1d()
    layer = CURLoRALayer(linear)
    adapter = layer.add_adapter("x", torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5]), alpha=2.0)
    layer.active_adapter = "x"
    with torch.no_grad():
        adapter.U.normal_()
    x = torch.randn(4, 10)
    C, U, R = adapter.C, adapter.U, adapter.R
    expected = linear(x) + 2.0 * x @ (C @ U @ R).T
    torch.testing.assert_close(layer(x), expected)


def test_gradient_of_u_matches_the_closed_form():
    linear, _ = _linear_and_conv1d()
    layer = CURLoRALayer(linear)
    adapter = layer.add_adapter("x", torch.tensor([0, 4, 9, 2]), torch.tensor([1, 3, 8, 11]), alpha=1.5)
    layer.active_adapter = "x"
    x = torch.randn(6, 10)
    target = torch.randn(6, 12)
    loss = ((layer(x) - target) ** 2).sum()
    loss.backward()
    # dL/dΔW for y = x(W + ΔW)ᵀ: (dL/dy)ᵀ x, with dL/dy = 2(y - target); ΔW = alpha·C U R.
    with torch.no_grad():
        dy = 2 * (layer(x) - target)
        d_delta = dy.T @ x
        expected = 1.5 * adapter.C.T @ d_delta @ adapter.R.T
    torch.testing.assert_close(adapter.U.grad, expected)
    assert linear.weight.grad is None or not linear.weight.requires_grad


def test_merge_unmerge_roundtrip_conv1d_and_linear():
    for base in _linear_and_conv1d():
        original = base.weight.detach().clone()
        layer = CURLoRALayer(base)
        adapter = layer.add_adapter("x", torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5]), alpha=1.0)
        layer.active_adapter = "x"
        with torch.no_grad():
            adapter.U.normal_()
        x = torch.randn(2, 10)
        unmerged = layer(x)
        layer.merge()
        torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-5)
        layer.unmerge()
        torch.testing.assert_close(base.weight, original, rtol=0, atol=1e-6)
        torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-5)


def test_dropout_only_on_the_adapter_path():
    linear, _ = _linear_and_conv1d()
    layer = CURLoRALayer(linear)
    layer.add_adapter("x", torch.tensor([0, 1]), torch.tensor([2, 3]), alpha=1.0, dropout=0.5)
    layer.active_adapter = "x"
    layer.train()
    x = torch.randn(4, 10)
    # U = 0: whatever dropout does to the adapter path, the output is the base layer's.
    torch.testing.assert_close(layer(x), linear(x))


def test_unsupported_layer_is_named():
    import pytest

    with pytest.raises(TypeError, match="Embedding"):
        CURLoRALayer(nn.Embedding(4, 4))
