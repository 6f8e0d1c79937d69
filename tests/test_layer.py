import pytest
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
    with pytest.raises(TypeError, match="Embedding"):
        CURLoRALayer(nn.Embedding(4, 4))


def _unfused(layer: CURLoRALayer, x: torch.Tensor) -> torch.Tensor:
    """What the fused path must equal: the base layer plus the adapter module, op by op."""
    out = layer.base_layer(x)
    return out + layer.adapters[layer.active_adapter](x).to(out.dtype)


def _outputs_and_grads(fn, layer, x):
    layer.zero_grad()
    x = x.detach().clone().requires_grad_(True)
    out = fn(x)
    out.float().pow(2).sum().backward()
    return out.detach(), x.grad, layer.adapters["x"].U.grad.clone()


@pytest.mark.parametrize(
    "kind, dtype, autocast, normalize",
    [
        ("linear-no-bias", torch.float32, False, False),  # the gather path: x·Rᵀ taken from x·Wᵀ
        ("linear", torch.float32, False, False),
        ("conv1d", torch.float32, False, False),
        ("linear-no-bias", torch.bfloat16, False, False),
        ("linear-no-bias", torch.float32, True, False),  # float32 weights under bf16 autocast
        ("conv1d", torch.float32, True, False),
        ("linear-no-bias", torch.float32, False, True),  # unit-norm C columns and R rows
        ("conv1d", torch.float32, True, True),
    ],
)
def test_fused_path_equals_base_plus_adapter(kind, dtype, autocast, normalize):
    torch.manual_seed(0)
    linear, conv = _linear_and_conv1d(out_f=24, in_f=20)
    base = {"linear": linear, "conv1d": conv, "linear-no-bias": nn.Linear(20, 24, bias=False)}[kind].to(dtype)
    layer = CURLoRALayer(base)
    adapter = layer.add_adapter("x", torch.tensor([0, 3, 3, 19]), torch.tensor([1, 5, 23, 7]), alpha=0.7,
                                normalize=normalize)
    layer.active_adapter = "x"
    with torch.no_grad():
        adapter.U.normal_()
    x = torch.randn(3, 5, 20, dtype=dtype)
    assert type(layer(x.requires_grad_()).grad_fn).__name__ == "_FusedCURLinearBackward"
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
    with ctx:
        fused = _outputs_and_grads(layer, layer, x)
        reference = _outputs_and_grads(lambda t: _unfused(layer, t), layer, x)
    low = dtype == torch.bfloat16 or autocast
    for got, want in zip(fused, reference):
        assert got.dtype == want.dtype and got.shape == want.shape
        # bf16 rounding is relative to the tensor's scale (normalized C, R enlarge U's gradient).
        tol = 0.03 * max(1.0, float(want.float().abs().max())) if low else 1e-5
        torch.testing.assert_close(got.float(), want.float(), rtol=0.03 if low else 1e-5, atol=tol)


def test_fused_path_without_input_gradient_and_under_no_grad():
    linear = nn.Linear(10, 12, bias=False)
    layer = CURLoRALayer(linear)
    adapter = layer.add_adapter("x", torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5]), alpha=1.0)
    layer.active_adapter = "x"
    with torch.no_grad():
        adapter.U.normal_()
    x = torch.randn(4, 10)  # no requires_grad: only U gets a gradient
    layer(x).sum().backward()
    assert adapter.U.grad is not None and adapter.U.grad.abs().sum() > 0
    with torch.no_grad():
        torch.testing.assert_close(layer(x), _unfused(layer, x))


def test_subclass_with_its_own_forward_keeps_it():
    """Quantization libraries subclass nn.Linear and override forward: that forward must run."""

    class Doubling(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    base = Doubling(10, 12, bias=False)
    layer = CURLoRALayer(base)
    layer.add_adapter("x", torch.tensor([0, 1]), torch.tensor([2, 3]), alpha=1.0)
    layer.active_adapter = "x"
    x = torch.randn(2, 10)
    torch.testing.assert_close(layer(x), 2 * nn.functional.linear(x, base.weight))


def test_hooked_base_layer_is_still_called():
    """accelerate's offloading and user hooks live on the base layer: they must keep running."""
    linear = nn.Linear(10, 12, bias=False)
    layer = CURLoRALayer(linear)
    layer.add_adapter("x", torch.tensor([0, 1]), torch.tensor([2, 3]), alpha=1.0)
    layer.active_adapter = "x"
    calls = []
    linear.register_forward_hook(lambda m, i, o: calls.append(1))
    out = layer(torch.randn(2, 10, requires_grad=True))
    assert calls == [1] and type(out.grad_fn).__name__ == "AddBackward0"


def test_normalized_adapter_is_alpha_times_unit_norm_c_u_r_by_hand():
    torch.manual_seed(0)
    base = nn.Linear(20, 24, bias=False)
    layer = CURLoRALayer(base)
    cols, rows = torch.tensor([0, 3, 3, 19]), torch.tensor([1, 5, 23, 7])
    adapter = layer.add_adapter("x", cols, rows, alpha=0.7, normalize=True)
    layer.active_adapter = "x"
    with torch.no_grad():
        adapter.U.normal_()
    w = base.weight.detach()
    c, r = w[:, cols], w[rows, :]
    c_n, r_n = c / c.norm(dim=0, keepdim=True), r / r.norm(dim=1, keepdim=True)
    torch.testing.assert_close(layer.delta_weight(), 0.7 * c_n @ adapter.U.detach() @ r_n)
    x = torch.randn(4, 20)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), base(x) + x @ (0.7 * c_n @ adapter.U @ r_n).t(), rtol=1e-5, atol=1e-5)


def _trained_dropout_layer(kind: str, p: float = 0.5):
    """A layer whose adapter has dropout and a trained (non-zero) U: dropout then changes the output."""
    linear, conv = _linear_and_conv1d(out_f=24, in_f=20)
    base = {"linear": linear, "conv1d": conv}[kind]
    layer = CURLoRALayer(base)
    cols, rows = torch.tensor([0, 3, 7, 19]), torch.tensor([1, 5, 23, 7])
    adapter = layer.add_adapter("x", cols, rows, alpha=0.7, dropout=p)
    layer.active_adapter = "x"
    with torch.no_grad():
        adapter.U.copy_(torch.randn(4, 4, generator=torch.Generator().manual_seed(1)))
    w = weight_out_in(base).detach()
    delta = 0.7 * w[:, cols] @ adapter.U.detach() @ w[rows, :]  # alpha · C U R, from the base weight
    return layer, base, adapter, delta


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_dropout_masks_the_adapter_input_only_against_a_masked_computation_by_hand(kind):
    layer, base, adapter, delta = _trained_dropout_layer(kind)
    layer.train()
    x = torch.randn(3, 5, 20, requires_grad=True)
    torch.manual_seed(123)
    out = layer(x)
    # The same generator state draws the same mask: dropout of ones is mask / (1 - p), elementwise.
    torch.manual_seed(123)
    mask = nn.functional.dropout(torch.ones(3, 5, 20), p=0.5, training=True)
    assert 0 < int((mask == 0).sum()) < mask.numel() and set(mask.unique().tolist()) == {0.0, 2.0}
    expected = base(x) + (x * mask) @ delta.t()
    unmasked = base(x) + x @ delta.t()
    assert (expected - unmasked).abs().max() > 0.05  # the mask matters at this U
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert type(out.grad_fn).__name__ == "AddBackward0"  # dropout active: the op-by-op path
    # Gradients too: U's through the masked input, x's through the base and the masked adapter.
    target = torch.randn(3, 5, 24)
    ((out - target) ** 2).sum().backward()
    with torch.no_grad():
        dy = (2 * (expected - target)).reshape(-1, 24)
        xm = (x * mask).reshape(-1, 20)
        w = weight_out_in(base)
        C, R = w[:, adapter.cols], w[adapter.rows, :]
        grad_u = 0.7 * C.t() @ dy.t() @ xm @ R.t()
        grad_x = (dy @ w + (dy @ delta) * mask.reshape(-1, 20)).reshape(3, 5, 20)
    torch.testing.assert_close(adapter.U.grad, grad_u, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x.grad, grad_x, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_dropout_is_off_in_eval_and_the_fused_path_equals_the_unmasked_computation(kind):
    layer, base, adapter, delta = _trained_dropout_layer(kind)
    x = torch.randn(3, 5, 20, requires_grad=True)
    layer.eval()
    out = layer(x)
    assert type(out.grad_fn).__name__ == "_FusedCURLinearBackward"
    torch.testing.assert_close(out, base(x) + x @ delta.t(), rtol=1e-5, atol=1e-5)
    layer.train()  # the op-by-op path, with dropout: not the unmasked output, and a new mask each call
    first, second = layer(x), layer(x)
    assert not torch.allclose(first, out, atol=1e-3) and not torch.allclose(first, second, atol=1e-3)


def _random_u_layer(base):
    layer = CURLoRALayer(base)
    adapter = layer.add_adapter("x", torch.tensor([0, 3, 7]), torch.tensor([1, 5, 9]), alpha=0.5)
    layer.active_adapter = "x"
    with torch.no_grad():
        adapter.U.normal_()
    return layer, adapter


def test_a_trainable_or_accelerate_hooked_base_runs_op_by_op_and_its_weight_gets_a_gradient():
    linear, _ = _linear_and_conv1d()
    layer, adapter = _random_u_layer(linear)
    linear.weight.requires_grad_(True)  # e.g. a user unfreezing the base: the fused node gives it no gradient
    out = layer(torch.randn(2, 10))
    assert type(out.grad_fn).__name__ == "AddBackward0"
    out.sum().backward()
    assert linear.weight.grad is not None and adapter.U.grad is not None
    hooked, _ = _linear_and_conv1d()
    layer, _ = _random_u_layer(hooked.requires_grad_(False))
    hooked._hf_hook = object()  # accelerate's offloading hook marker
    assert type(layer(torch.randn(2, 10, requires_grad=True)).grad_fn).__name__ == "AddBackward0"


def test_fused_path_gives_the_input_gradient_with_u_frozen():
    linear, _ = _linear_and_conv1d()
    layer, adapter = _random_u_layer(linear)
    adapter.U.requires_grad_(False)  # an earlier task's frozen U: the input still needs its gradient
    x = torch.randn(3, 10, requires_grad=True)
    out = layer(x)
    assert type(out.grad_fn).__name__ == "_FusedCURLinearBackward"
    out.sum().backward()
    delta = 0.5 * adapter.C @ adapter.U @ adapter.R
    torch.testing.assert_close(x.grad, torch.ones(3, 12) @ (linear.weight + delta).detach())


def test_deleting_a_merged_active_adapter_unmerges_it_and_clears_the_active_name():
    linear, _ = _linear_and_conv1d()
    original = linear.weight.detach().clone()
    layer, _ = _random_u_layer(linear)
    layer.add_adapter("y", torch.tensor([1]), torch.tensor([2]), alpha=1.0)
    layer.merge()
    layer.delete_adapter("y")  # not merged, not active: nothing else changes
    assert layer.merged_adapters == ["x"] and layer.active_adapter == "x"
    layer.delete_adapter("x")
    assert layer.merged_adapters == [] and layer.active_adapter is None and list(layer.adapters) == []
    torch.testing.assert_close(linear.weight, original, rtol=0, atol=1e-6)


def test_a_fresh_layer_is_its_base_and_adding_adapters_checks_names_and_merges():
    linear, _ = _linear_and_conv1d()
    layer = CURLoRALayer(linear)
    x = torch.randn(2, 10)
    assert layer.active_adapter is None and torch.equal(layer(x), linear(x))
    layer.add_adapter("x", torch.tensor([0]), torch.tensor([1]), alpha=1.0)
    with pytest.raises(ValueError, match=r"^Adapter 'x' already exists on this layer\.$"):
        layer.add_adapter("x", torch.tensor([0]), torch.tensor([1]), alpha=1.0)
    layer.active_adapter = "x"
    layer.merge()
    with pytest.raises(RuntimeError, match=r"^Unmerge the merged adapters before adding a new one\.$"):
        layer.add_adapter("y", torch.tensor([0]), torch.tensor([1]), alpha=1.0)


class _LinearOnlyWeight(torch.Tensor):
    """A stand-in for a quantization library's tensor-subclass weight on a stock ``nn.Linear``
    (torchao's ``Int8Tensor``, for one: it implements ``F.linear``, indexing and shape ops, not
    ``mm``). This one computes ``F.linear`` exactly from its own values and, like those, refuses
    any other matrix product."""

    _REFUSED = (torch.matmul, torch.mm, torch.addmm, torch.Tensor.__matmul__, torch.Tensor.__rmatmul__,
                torch.Tensor.matmul, torch.Tensor.mm, torch.Tensor.addmm, torch.Tensor.addmm_)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in cls._REFUSED:
            raise NotImplementedError(f"{cls.__name__} implements F.linear only, not {func.__name__}")
        if func is torch.Tensor.detach:  # nn.Parameter needs detach() to keep the type
            return super().__torch_function__(func, types, args, kwargs or {})
        with torch._C.DisableTorchFunctionSubclass():  # results are plain tensors
            return func(*args, **(kwargs or {}))


def test_a_tensor_subclass_weight_on_a_stock_linear_runs_op_by_op_against_the_product_by_hand():
    torch.manual_seed(0)
    linear = nn.Linear(10, 12)
    plain = linear.weight.detach().clone()
    linear.weight = nn.Parameter(plain.clone().as_subclass(_LinearOnlyWeight), requires_grad=False)
    assert type(linear.weight) is _LinearOnlyWeight and type(linear).forward is nn.Linear.forward
    layer, adapter = _random_u_layer(linear)
    assert type(adapter.C) is torch.Tensor and torch.equal(adapter.C, plain[:, adapter.cols])
    x = torch.randn(3, 10, requires_grad=True)
    out = layer(x)
    # Not the fused node: its backward multiplies by the weight itself (grad @ W), which the
    # subclass does not implement; only the subclass's own F.linear may touch it.
    assert type(out.grad_fn).__name__ == "AddBackward0"
    out.pow(2).sum().backward()
    with torch.no_grad():
        delta = 0.5 * plain[:, adapter.cols] @ adapter.U @ plain[adapter.rows, :]
        expected = x @ (plain + delta).t() + linear.bias
        dy = 2 * expected
        torch.testing.assert_close(out.detach(), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x.grad, dy @ (plain + delta), rtol=1e-5, atol=1e-5)
        u_grad = 0.5 * plain[:, adapter.cols].t() @ (dy.t() @ x) @ plain[adapter.rows, :].t()
        torch.testing.assert_close(adapter.U.grad, u_grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "compute, given",
    [
        (torch.bfloat16, torch.float32),  # the input must be cast to C and R's dtype
        (torch.float32, torch.bfloat16),  # that too, and the float32 adapter output back to bf16
    ],
    ids=["bf16-compute-float32-input", "float32-compute-bf16-input"],
)
def test_a_quantized_base_computing_in_another_dtype_runs_op_by_op_and_answers_in_the_input_dtype(compute, given):
    """A bitsandbytes 4-bit layer casts its input to its compute dtype and its output back to the
    input's dtype; transformers builds them with any ``bnb_4bit_compute_dtype`` (float32 by default,
    bf16 often) whatever the model's dtype. C and R are in the compute dtype: the adapter path must
    cast the input to it, and its output back to the base output's dtype."""
    import bitsandbytes as bnb

    torch.manual_seed(0)
    base = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=compute, quant_type="nf4")
    base.weight = bnb.nn.Params4bit(torch.randn(64, 64) / 8, requires_grad=False, quant_type="nf4", blocksize=64)
    base.support_avx512bf16_for_cpu = False  # bitsandbytes' CPU repacking trap (see NOTES)
    base = base.to("cpu")
    layer, adapter = _random_u_layer(base)
    assert adapter.C.dtype == adapter.R.dtype == compute
    x = torch.randn(3, 5, 64).to(given)
    with torch.no_grad():
        out, base_out = layer(x), base(x)
        wd = bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state).double()
        delta = 0.5 * wd[:, adapter.cols] @ adapter.U.double() @ wd[adapter.rows, :]
        adapter_out = x.double() @ delta.t()
    assert out.dtype == base_out.dtype == given
    assert float(adapter_out.abs().max()) > 0.5  # far above the bf16 rounding tolerated below
    torch.testing.assert_close(out.double(), base_out.double() + adapter_out, rtol=0.02, atol=0.02)
