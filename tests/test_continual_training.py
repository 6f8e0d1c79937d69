"""Training mechanics (curlora.continual.training): the last real token's state under padding, the
optimizer's learning rates and the warm-up cap, read back from what train_task built."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama

from curlora import CURLoRAConfig, get_curlora_model
from curlora.continual import forward, training
from curlora.data.splits import Example
from curlora.data.tokenization import ClassificationCollator


def _alone(model, ids: list[int]) -> torch.Tensor:
    """The backbone's final state at the last token of one unpadded sequence, run by itself."""
    with torch.no_grad():
        return forward.backbone_of(model)(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama], ids=["gpt2", "llama"])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("lengths", [(3, 12, 7, 1), (12, 11, 12, 10)], ids=["sparse-packed", "dense-padded"])
def test_last_hidden_of_a_padded_batch_is_each_sequence_run_alone(make, side, lengths):
    """GPT-2's absolute positions would shift under left padding without position ids counted from the
    first real token: each row must give its unpadded sequence's last-token state."""
    model = make()
    gen = torch.Generator().manual_seed(0)
    sequences = [torch.randint(1, 128, (n,), generator=gen).tolist() for n in lengths]
    width = max(lengths)
    ids = torch.full((len(lengths), width), 0)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(sequences):
        where = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
        ids[row, where] = torch.tensor(seq)
        mask[row, where] = 1
    with torch.no_grad():
        got = forward.last_hidden(model, ids, mask)
    for row, seq in enumerate(sequences):
        torch.testing.assert_close(got[row], _alone(model, seq), rtol=1e-5, atol=1e-5)
    # Without the position ids (positions counted from the row's first slot), GPT-2's left-padded rows differ.
    if make is tiny_gpt2 and side == "left":
        with torch.no_grad():
            shifted = forward.backbone_of(model)(input_ids=ids, attention_mask=mask).last_hidden_state[:, -1]
        short = lengths.index(min(lengths))
        assert not torch.allclose(shifted[short], _alone(model, sequences[short]), atol=1e-3)


def _settings(**overrides) -> training.TrainSettings:
    values = dict(lr=3e-3, head_lr=7e-2, epochs=2, batch_size=4, warmup_steps=100, max_warmup_fraction=0.25,
                  weight_decay=0.0)
    values.update(overrides)
    return training.TrainSettings(**values)


@pytest.mark.parametrize("warmup_steps, expected", [(100, 2), (1, 1), (0, 0)])
def test_train_task_uses_separate_adapter_and_head_rates_and_caps_the_warm_up(smol_tokenizer, monkeypatch,
                                                                             warmup_steps, expected):
    """12 examples, batch 4, 2 epochs: 6 steps; max_warmup_fraction 0.4 caps the warm-up at int(2.4) = 2
    steps, so 100 configured warm-up steps become 2 (fewer configured ones stay as they are)."""
    model = get_curlora_model(tiny_llama(vocab=len(smol_tokenizer), hidden=32), CURLoRAConfig(r=2))
    head = torch.nn.Linear(32, 2)
    collator = ClassificationCollator(smol_tokenizer, max_length=16)
    examples = [Example(f"example number {i} is {'good' if i % 2 else 'bad'}", i % 2) for i in range(12)]
    built = {}
    real = training.get_cosine_schedule_with_warmup

    def spy(optimizer, warmup, total):
        built.update(optimizer=optimizer, warmup=warmup, total=total)
        built["scheduler"] = real(optimizer, warmup, total)
        built["lrs"] = []
        # The rate each optimizer step actually uses, per group.
        optimizer.register_step_pre_hook(
            lambda opt, args, kwargs: built["lrs"].append([group["lr"] for group in opt.param_groups]))
        return built["scheduler"]

    monkeypatch.setattr(training, "get_cosine_schedule_with_warmup", spy)
    settings = _settings(warmup_steps=warmup_steps, max_warmup_fraction=0.4)
    assert training.warmup_for(6, settings) == expected
    def loss(model, items, backbone_trains):  # the heads protocol's loss: CE of `head` on the last token
        inputs = collator([e for e, _ in items])
        features = forward.last_hidden(model, inputs["input_ids"], inputs["attention_mask"])
        return torch.nn.functional.cross_entropy(head(features), inputs["labels"], reduction="sum")

    losses = training.train_task(model, [(e, 0) for e in examples], loss, list(head.parameters()), settings,
                                 torch.Generator().manual_seed(0), progress=False)
    assert len(losses) == 6 and built["total"] == 6 and built["warmup"] == expected
    head_group, adapter_group = built["optimizer"].param_groups
    assert [id(p) for p in head_group["params"]] == [id(p) for p in head.parameters()]
    u = [p for n, p in model.named_parameters() if n.endswith(".U")]
    assert [id(p) for p in adapter_group["params"]] == [id(p) for p in u] and len(u) == 6
    assert head_group["initial_lr"] == 7e-2 and adapter_group["initial_lr"] == 3e-3
    # Linear warm-up over `expected` steps, then cosine decay from the peak, for each group's own rate.
    for step, (head_lr, adapter_lr) in enumerate(built["lrs"]):
        if step < expected:
            factor = step / expected
        else:
            progress = (step - expected) / max(1, 6 - expected)
            factor = 0.5 * (1 + torch.cos(torch.tensor(torch.pi * progress)).item())
        assert head_lr == pytest.approx(7e-2 * factor) and adapter_lr == pytest.approx(3e-3 * factor)


def test_warm_up_is_the_configured_steps_or_the_fraction_of_the_run_whichever_is_smaller():
    assert training.warmup_for(1000, _settings(warmup_steps=100, max_warmup_fraction=0.25)) == 100
    assert training.warmup_for(375, _settings(warmup_steps=500, max_warmup_fraction=0.1)) == 37
    assert training.warmup_for(10, _settings(warmup_steps=500, max_warmup_fraction=0.0)) == 0
