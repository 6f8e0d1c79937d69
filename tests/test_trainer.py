"""A CURLoRAModel trains with transformers.Trainer and TRL's SFTTrainer as it is.

Tiny Llama (hidden 32, 2 layers) with the real SmolLM2 tokenizer's vocabulary.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from curlora import CURLoRAConfig, CURLoRAModel, get_curlora_model
from curlora.sft import SFTCollator, build_dataset

QA = [(f"What is item {i}?", f"Item {i} is a {w} thing.") for i, w in enumerate(
    ["red", "blue", "green", "small", "large", "round", "square", "soft"])]


def tiny_smol_llama(vocab: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True, initializer_range=0.3,
    )
    return LlamaForCausalLM(config)


def wrapped(tokenizer, seed: int = 0) -> CURLoRAModel:
    return get_curlora_model(tiny_smol_llama(len(tokenizer), seed), CURLoRAConfig(r=4, seed=seed))


@pytest.fixture(scope="module")
def qa_dataset(smol_tokenizer):
    conversations = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in QA]
    dataset, _ = build_dataset(smol_tokenizer, conversations, max_length=64)
    # An extra text column: Trainer must drop it and keep the model's inputs.
    return dataset.add_column("text", [q for q, _ in QA])


def args(tmp_path, **kw) -> TrainingArguments:
    base = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=4, learning_rate=5e-2, max_steps=6,
        logging_steps=1, save_strategy="steps", save_steps=3, use_cpu=True, report_to=[],
        disable_tqdm=True, seed=0, lr_scheduler_type="constant",
    )
    base.update(kw)
    return TrainingArguments(**base)


def dataset_loss(model, dataset, tokenizer) -> float:
    batch = SFTCollator(tokenizer.pad_token_id)([{k: r[k] for k in ("input_ids", "labels")} for r in dataset])
    with torch.no_grad():
        return model(**batch).loss.item()


def adapter_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_forward_signature_and_labels(smol_tokenizer, qa_dataset, tmp_path):
    model = wrapped(smol_tokenizer)
    assert "input_ids" in inspect.signature(model.forward).parameters
    trainer = Trainer(model=model, args=args(tmp_path), train_dataset=qa_dataset,
                      data_collator=SFTCollator(smol_tokenizer.pad_token_id))
    assert trainer.label_names == ["labels"]
    batch = next(iter(trainer.get_train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}


def test_state_dict_is_adapter_only_and_round_trips(smol_tokenizer):
    model = wrapped(smol_tokenizer)
    keys = set(model.state_dict())
    assert keys and all(k.rsplit(".", 1)[-1] in ("U", "cols", "rows") for k in keys)
    assert len(keys) == 3 * 3 * 2  # q/k/v in two layers
    other = wrapped(smol_tokenizer, seed=1)  # other sampled indices
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    x = torch.randint(0, 100, (2, 7))
    frozen = {k: v for k, v in model.base_model.state_dict().items() if ".adapters." not in k}
    other.base_model.load_state_dict(frozen, strict=False)  # same base weights, other indices
    other.load_state_dict(model.state_dict())  # C and R are rebuilt from the loaded indices
    torch.testing.assert_close(other(input_ids=x).logits, model(input_ids=x).logits)
    with pytest.raises(RuntimeError, match="missing keys"):
        other.load_state_dict({})


def test_trainer_trains_only_u_checkpoints_adapter_and_resumes(smol_tokenizer, qa_dataset, tmp_path):
    model = wrapped(smol_tokenizer)
    frozen = {k: v.clone() for k, v in model.base_model.state_dict().items() if ".adapters." not in k}
    before = dataset_loss(model, qa_dataset, smol_tokenizer)
    trainer = Trainer(model=model, args=args(tmp_path), train_dataset=qa_dataset,
                      data_collator=SFTCollator(smol_tokenizer.pad_token_id))
    trainer.train()
    assert dataset_loss(model, qa_dataset, smol_tokenizer) < before - 0.05
    after = model.base_model.state_dict()
    for key, value in frozen.items():
        assert torch.equal(after[key], value), key
    assert all(model.state_dict()[k].abs().sum() > 0 for k in model.state_dict() if k.endswith(".U"))

    checkpoint = tmp_path / "checkpoint-3"
    saved = load_file(checkpoint / "model.safetensors")
    assert set(saved) == set(model.state_dict())
    assert (checkpoint / "model.safetensors").stat().st_size < 5_000

    first_run = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    resumed_model = wrapped(smol_tokenizer)
    resumed = Trainer(model=resumed_model, args=args(tmp_path / "again"), train_dataset=qa_dataset,
                      data_collator=SFTCollator(smol_tokenizer.pad_token_id))
    resumed.train(resume_from_checkpoint=str(checkpoint))
    second_run = [h["loss"] for h in resumed.state.log_history if "loss" in h]
    assert second_run[-3:] == pytest.approx(first_run[3:], rel=1e-5)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(resumed_model.state_dict()[key], value)

    model.save_pretrained(tmp_path / "adapter")
    loaded = CURLoRAModel.from_pretrained(tiny_smol_llama(len(smol_tokenizer)), tmp_path / "adapter")
    x = torch.randint(0, 1000, (2, 9))
    model.eval()
    torch.testing.assert_close(loaded(input_ids=x).logits, model(input_ids=x).logits)


def test_gradient_checkpointing_reaches_u(smol_tokenizer, qa_dataset):
    batch = SFTCollator(smol_tokenizer.pad_token_id)(
        [{k: r[k] for k in ("input_ids", "labels")} for r in qa_dataset.select(range(4))])
    grads = []
    for checkpointing in (False, True):
        model = wrapped(smol_tokenizer)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.normal_(std=0.1)  # non-zero U, so every U gets a gradient
        if checkpointing:
            model.gradient_checkpointing_enable()
            assert model.base_model.model.gradient_checkpointing
        model.train()
        model(**batch).loss.backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    assert all(g.abs().sum() > 0 for g in grads[1])
    for plain, checkpointed in zip(*grads):
        torch.testing.assert_close(checkpointed, plain)


def test_trl_sft_trainer(smol_tokenizer, tmp_path):
    import trl
    from datasets import Dataset

    from curlora.sft.trainer import CURLoRASFTTrainer

    data = Dataset.from_list([
        {"prompt": [{"role": "user", "content": q}], "completion": [{"role": "assistant", "content": a}]}
        for q, a in QA
    ])
    model = wrapped(smol_tokenizer)
    frozen = {k: v.clone() for k, v in model.base_model.state_dict().items() if ".adapters." not in k}
    config = trl.SFTConfig(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=5e-2,
        lr_scheduler_type="constant", logging_steps=1, save_strategy="steps", save_steps=4, use_cpu=True,
        bf16=False, report_to=[], disable_tqdm=True, max_length=64,
    )
    trainer = CURLoRASFTTrainer(model=model, args=config, train_dataset=data, processing_class=smol_tokenizer)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0]
    after = model.base_model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())
    assert set(load_file(tmp_path / "checkpoint-4" / "model.safetensors")) == set(model.state_dict())
    # generation (no fused head) still goes through the ordinary forward
    out = model.generate(input_ids=torch.tensor([[1, 2, 3]]), max_new_tokens=2, do_sample=False)
    assert out.shape == (1, 5)
