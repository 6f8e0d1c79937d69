"""The method registry: lookup, variants, PEFT sizing, and what each entry builds."""

import warnings

import pytest
import torch
from conftest import tiny_llama

from curlora import CURLoRAModel, curlora_layers
from curlora.continual import ContinualConfig, run_specs
from curlora.continual.methods import REGISTRY, BuildContext, peft_size_argument, resolve

CALIBRATION = torch.randint(0, 128, (24, 16), generator=torch.Generator().manual_seed(1))
CONTEXT = BuildContext(rank=4, seed=0, alpha=1.0, target_modules=None, calibration_ids=lambda: CALIBRATION)
IDS = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))


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
        else:  # a rank-sized adapter is a small share of the model; OSF trains half of each layer's spectrum
            total = sum(p.numel() for p in adapted.model.parameters())
            assert 0 < n < (total // 10 if method.takes_rank else total // 2), name
        assert bool(adapted.u_params) == method.takes_u_penalty, name


# What Python prints by default: every category but these, which it hides outside __main__.
HIDDEN_BY_DEFAULT = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)


def test_no_registered_method_prints_a_library_warning():
    # PEFT 0.21 read transformers' deprecated is_gradient_checkpointing: a FutureWarning in every default run.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for method in REGISTRY.values():
            adapted = method.adapt(tiny_llama(), CONTEXT)
            for task in range(2):  # O-LoRA adds a PEFT adapter per task
                adapted.start_task(task)
    shown = [f"{w.category.__name__}: {w.message}" for w in caught if not issubclass(w.category, HIDDEN_BY_DEFAULT)]
    assert not shown


def test_every_registered_method_leaves_the_output_unchanged_at_init():
    # PiSSA, MiCA and CorDA rewrite the base weights: the before-row and base perplexity, measured on
    # the untouched base, hold for them only because residual + adapter = W.
    with torch.no_grad():
        before = tiny_llama()(input_ids=IDS).logits
        for name, method in REGISTRY.items():
            model = method.adapt(tiny_llama(), CONTEXT).model
            torch.testing.assert_close(model(input_ids=IDS).logits, before, rtol=1e-4, atol=1e-4, msg=name)


def test_curlora_variants_differ_only_in_sampling():
    plain = resolve("curlora").adapt(tiny_llama(), CONTEXT).model
    standard = resolve("curlora-standard").adapt(tiny_llama(), CONTEXT).model
    assert isinstance(standard, CURLoRAModel)
    assert standard.peft_config["default"].sampling == "standard"
    cols = [layer.adapters["default"].cols for _, layer in curlora_layers(plain)]
    cols_std = [layer.adapters["default"].cols for _, layer in curlora_layers(standard)]
    assert any(not torch.equal(a, b) for a, b in zip(cols, cols_std))


def test_curlora_wide_trains_a_u_four_times_the_rank():
    plain = resolve("curlora").adapt(tiny_llama(), CONTEXT).model
    wide = resolve("curlora-wide").adapt(tiny_llama(), CONTEXT).model
    assert wide.peft_config["default"].r == 4 * CONTEXT.rank
    assert trainable(wide) == 16 * trainable(plain)


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
    assert peft_size_argument("OSF") is None  # its effective_rank is what it freezes: see the osf entry
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
    for name in ("lora-pissa", "lora-mica", "lora-corda-kpm"):
        with pytest.raises(ValueError, match="SVD of the full-precision base weights"):
            ContinualConfig(methods=[name], quantize="nf4")


def _lora_parts(model, module="model.layers.0.self_attn.q_proj"):
    layer = model.get_submodule("base_model.model." + module)
    return layer.base_layer.weight.detach(), layer.lora_A["default"].weight.detach(), \
        layer.lora_B["default"].weight.detach(), layer.scaling["default"]


def test_pissa_residual_plus_adapter_is_the_original_weight_and_output_unchanged():
    original = tiny_llama()
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = original(input_ids=ids).logits
    w0 = original.model.layers[0].self_attn.q_proj.weight.detach().clone()
    model = resolve("lora-pissa").adapt(original, CONTEXT).model
    residual, a, b, scale = _lora_parts(model)
    torch.testing.assert_close(residual + scale * b @ a, w0, rtol=1e-5, atol=1e-5)
    # The adapter holds the r principal directions: B's columns span W's top-r left singular vectors.
    u = torch.linalg.svd(w0).U[:, : CONTEXT.rank]
    q = torch.linalg.qr(b).Q
    torch.testing.assert_close((u.T @ q).abs().pow(2).sum(), torch.tensor(float(CONTEXT.rank)), rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=1e-4, atol=1e-4)


def test_mica_b_spans_the_minor_singular_directions_and_is_frozen():
    original = tiny_llama()
    w0 = original.model.layers[0].self_attn.q_proj.weight.detach().clone()
    model = resolve("lora-mica").adapt(original, CONTEXT).model
    weight, a, b, _ = _lora_parts(model)
    assert torch.equal(weight, w0)  # MiCA leaves the base weight alone
    assert torch.count_nonzero(a) == 0  # A starts at zero: output unchanged at init
    u_minor = torch.linalg.svd(w0).U[:, -CONTEXT.rank:]
    q = torch.linalg.qr(b).Q
    # Projection of B's column space onto the minor subspace keeps all of it (squared norm r).
    torch.testing.assert_close((u_minor.T @ q).pow(2).sum(), torch.tensor(float(CONTEXT.rank)), rtol=1e-4, atol=1e-4)
    layer = model.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")
    assert not layer.lora_B["default"].weight.requires_grad and layer.lora_A["default"].weight.requires_grad


def test_osf_trains_only_the_low_singular_subspace_and_keeps_the_output():
    original = tiny_llama()
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = original(input_ids=ids).logits
    model = resolve("osf").adapt(original, CONTEXT, {"effective_rank": 16}).model
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all("_low" in n for n in trained)
    assert all(any(t in n for t in ("q_proj", "k_proj", "v_proj")) for n in trained)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=1e-4, atol=1e-4)


def test_corda_kpm_adapts_what_the_calibration_text_uses_least_and_keeps_the_output():
    original = tiny_llama()
    w0 = original.model.layers[0].self_attn.q_proj.weight.detach().clone()
    model = resolve("lora-corda-kpm").adapt(original, CONTEXT).model
    assert model.peft_config["default"].corda_config.corda_method == "kpm"
    residual, a, b, scale = _lora_parts(model)
    torch.testing.assert_close(residual + scale * b @ a, w0, rtol=1e-5, atol=1e-5)
    assert {n.split(".")[-2] for n, p in model.named_parameters() if p.requires_grad} == {"default"}
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    # By hand: C = mean over calibration rows of the layer's (max-scaled) input covariance, damped as
    # PEFT does; B's columns span the left singular vectors of W·C with the r smallest values.
    probe, inputs = tiny_llama(), []
    hook = probe.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, i, o: inputs.append(i[0][0]))
    with torch.no_grad():
        for row in CALIBRATION:
            probe(input_ids=row[None])
    hook.remove()
    cov = sum((x / x.max()).T @ (x / x.max()) for x in inputs) / len(inputs)
    cov = cov + torch.eye(len(cov)) * cov.diagonal().mean() * 0.01
    u_least = torch.linalg.svd(w0 @ cov).U[:, -CONTEXT.rank:]
    q = torch.linalg.qr(b).Q
    torch.testing.assert_close((u_least.T @ q).pow(2).sum(), torch.tensor(float(CONTEXT.rank)), rtol=1e-3, atol=1e-3)
    # The adapter comes from the calibration activations: other text gives another adapter.
    other = torch.randint(0, 128, (24, 16), generator=torch.Generator().manual_seed(2))
    context = BuildContext(rank=4, seed=0, alpha=1.0, target_modules=None, calibration_ids=lambda: other)
    _, a_other, _, _ = _lora_parts(resolve("lora-corda-kpm").adapt(tiny_llama(), context).model)
    assert not torch.allclose(a, a_other, atol=1e-3)
    with pytest.raises(ValueError, match="calibration"):
        resolve("lora-corda-kpm").adapt(tiny_llama(), BuildContext(rank=4, seed=0, alpha=1.0, target_modules=None))


def test_corda_calibrates_on_text_that_is_not_the_perplexity_corpus(smol_tokenizer):
    from curlora.continual.prepare import calibration_windows
    from curlora.data import CALIBRATION_CORPUS, load_corpus

    windows = calibration_windows(smol_tokenizer, samples=4, tokens=64)
    assert windows.shape == (4, 64)
    corpus = load_corpus("wiki_summaries")
    for row in windows:
        assert smol_tokenizer.decode(row[8:40]) not in corpus
    with pytest.raises(ValueError, match="cannot also be the perplexity corpus"):
        ContinualConfig(methods=["lora-corda-kpm"], corpus=CALIBRATION_CORPUS)
    with pytest.raises(ValueError, match="fewer than corda_samples"):
        calibration_windows(smol_tokenizer, samples=10_000, tokens=1_000)


def char_collator(examples):
    """A tokenizer-free collator for tiny models: one id per character (vocab 128), left padded."""
    width = max(len(e.text) for e in examples)
    ids = torch.zeros(len(examples), width, dtype=torch.long)
    mask = torch.zeros(len(examples), width, dtype=torch.long)
    for i, e in enumerate(examples):
        row = torch.tensor([ord(c) % 128 for c in e.text])
        ids[i, width - len(row):], mask[i, width - len(row):] = row, 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([e.label for e in examples])}


def test_ewc_fisher_is_the_mean_squared_per_example_gradient_and_the_penalty_pulls_back():
    from curlora.continual.methods import EWC, FinishedTask
    from curlora.continual.forward import last_hidden
    from curlora.data import Example

    torch.manual_seed(0)
    examples = [Example("a good film", 1), Example("dull and long", 0), Example("fine", 1)]
    head = torch.nn.Linear(48, 2)
    adapted = resolve("curlora+ewc").adapt(tiny_llama(), CONTEXT)
    assert isinstance(adapted, EWC)
    params = [p for p in adapted.model.parameters() if p.requires_grad]
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.3)
    # By hand: one backward per example, squared gradients averaged.
    expected = [torch.zeros_like(p) for p in params]
    for e in examples:
        inputs = char_collator([e])
        for p in params:
            p.grad = None
        logits = head(last_hidden(adapted.model, inputs["input_ids"], inputs["attention_mask"]))
        torch.nn.functional.cross_entropy(logits, inputs["labels"]).backward()
        for acc, p in zip(expected, params):
            acc += p.grad.pow(2) / len(examples)
    assert adapted.penalty() is None  # nothing to hold on to before the first task ends
    def loss(model, items, backbone_trains):  # the heads protocol's loss for these rows: CE through `head`
        inputs = char_collator([e for e, _ in items])
        features = last_hidden(model, inputs["input_ids"], inputs["attention_mask"])
        return torch.nn.functional.cross_entropy(head(features), inputs["labels"], reduction="sum")

    adapted.end_task(0, FinishedTask(examples, 0, loss))
    (fisher, anchor), = adapted.anchors
    for got, want in zip(fisher, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8)
    assert float(adapted.penalty()) == 0.0  # at the anchor
    with torch.no_grad():
        params[0].add_(0.1)
    want = 0.5 * CONTEXT.knobs.get("ewc_lambda", 1.0) * (fisher[0] * 0.01).sum()
    torch.testing.assert_close(adapted.penalty(), want)


def test_modifiers_combine_with_adapters_only():
    assert resolve("lora+ewc").name == "lora+ewc" and resolve("lora+ewc").takes_rank
    with pytest.raises(ValueError, match="trains nothing"):
        resolve("head+ewc")
    with pytest.raises(ValueError, match="Unknown modifier"):
        resolve("curlora+magic")
    for per_task in ("curlora-bank", "o-lora"):
        with pytest.raises(ValueError, match="new parameters for every task"):
            resolve(f"{per_task}+ewc")
    assert resolve("curlora-bank+replay").name == "curlora-bank+replay"


def test_olora_orthogonality_loss_and_frozen_earlier_adapters():
    from curlora.continual.methods import OLoRA

    adapted = resolve("o-lora").adapt(tiny_llama(), CONTEXT, None)
    assert isinstance(adapted, OLoRA)
    adapted.start_task(0)
    assert adapted.penalty() is None  # nothing to be orthogonal to yet
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for n, p in adapted.model.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.2)  # "trained" task 0
    first = {n: p.detach().clone() for n, p in adapted.model.named_parameters() if ".default." in n}
    adapted.start_task(1)
    trainable = [n for n, p in adapted.model.named_parameters() if p.requires_grad]
    assert trainable and all(".task1." in n for n in trainable)
    layers = adapted._layers()
    with torch.no_grad():  # make every new A orthogonal to the old A: the loss vanishes
        for layer in layers:
            a_old, a_new = layer.lora_A["default"].weight, layer.lora_A["task1"].weight
            projector = a_old.t() @ torch.linalg.inv(a_old @ a_old.t()) @ a_old  # onto a_old's row space
            a_new.copy_(a_new - a_new @ projector)
    assert float(adapted.penalty()) < 1e-10
    with torch.no_grad():
        layers[0].lora_A["task1"].weight.copy_(layers[0].lora_A["default"].weight)
    expected = CONTEXT.knobs.get("olora_lambda", 0.5) * (layers[0].lora_A["default"].weight
                                                       @ layers[0].lora_A["default"].weight.t()).pow(2).sum()
    torch.testing.assert_close(adapted.penalty(), expected, rtol=1e-4, atol=1e-6)
    # Training task 1 moves only task 1's LoRA: task 0's stays bit-identical.
    opt = torch.optim.SGD([p for p in adapted.model.parameters() if p.requires_grad], lr=0.1)
    (adapted.model(input_ids=ids).logits.pow(2).mean() + adapted.penalty()).backward()
    opt.step()
    after = {n: p.detach() for n, p in adapted.model.named_parameters() if ".default." in n}
    assert all(torch.equal(first[n], after[n]) for n in first)
    assert set(adapted.model.base_model.active_adapters) == {"default", "task1"}
