"""Generative fine-tuning (SFT) with a CURLoRA adapter, and answering prompts with a saved one.

``curlora sft`` reads prompt/response pairs or chat ``messages`` from a local JSONL/JSON/CSV/TSV
file or a hub dataset, renders them with the tokenizer's chat template, trains with
``transformers.Trainer`` on the response tokens only (prompt tokens get label -100), and saves
the adapter. ``curlora generate`` loads it onto the base model and answers a prompt.

Why ``transformers.Trainer`` and a small collator rather than ``trl.SFTTrainer``: the loss mask is
built here (TRL's ``assistant_only_loss`` needs ``{% generation %}`` markers that SmolLM2's
template lacks), so TRL would add only its fused LM head, at the price of a hard dependency and
a patched ``forward`` (see :mod:`curlora.sft.trainer` to use it anyway). Trainer brings the rest:
checkpoints holding only the adapter, ``--resume``, gradient accumulation and checkpointing,
bf16, and data-parallel runs under ``accelerate launch`` / ``torchrun``.
"""


from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from curlora import checks
from curlora.config import CURLoRAConfig
from curlora.sft.data import IGNORE_INDEX, SFTCollator, build_dataset, check_data_source, load_conversations

SUMMARY_NAME = "sft_summary.json"

# --------------------------------------------------------------------------- training


@dataclass
class SFTSettings:
    data: str
    output_dir: str
    model: str | None = None
    prompt_field: str = "prompt"
    response_field: str = "response"
    messages_field: str = "messages"
    system: str | None = None
    split: str = "train"
    max_examples: int | None = None
    eval_fraction: float = 0.0
    r: int = 16
    alpha: float = 1.0
    target_modules: list[str] | None = None
    sampling: str = "inverse"
    epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 8
    grad_accum: int = 1
    # CURLoRA's rate, not LoRA's (U starts at zero, no 1/r scaling): validation chose 1e-2 at r 16 on
    # SmolLM2's offline suite, where 1e-3 learned nothing (docs/results/sweep-3seeds); choose yours
    # on held-out data (eval_fraction, eval_loss).
    lr: float = 1e-2
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    max_length: int = 256
    seed: int = 0
    bf16: bool = False
    gradient_checkpointing: bool = False
    save_steps: int = 0
    logging_steps: int = 10
    resume: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Refuse a bad setting before the model or the data is loaded (flag names, as the user typed them)."""
        checks.positive("--lr", self.lr)
        checks.positive("--epochs", self.epochs)
        checks.integer("--r", self.r, minimum=1)
        checks.finite("--alpha", self.alpha)
        for name in ("batch_size", "grad_accum", "max_length", "logging_steps"):
            checks.integer(f"--{name.replace('_', '-')}", getattr(self, name), minimum=1)
        checks.integer("--seed", self.seed)
        checks.integer("--max-steps", self.max_steps, minimum=-1)
        checks.integer("--save-steps", self.save_steps, minimum=0)
        if self.max_examples is not None:
            checks.integer("--max-examples", self.max_examples, minimum=1)
        checks.fraction("--eval-fraction", self.eval_fraction, low_open=False)
        checks.fraction("--warmup-ratio", self.warmup_ratio, low_open=False)
        checks.non_negative("weight_decay", self.weight_decay)
        checks.model_path(self.model)
        check_data_source(self.data)


def run_sft(settings: SFTSettings) -> dict[str, Any]:
    """Train a CURLoRA adapter on the responses and save it to ``settings.output_dir``."""
    from transformers import Trainer, TrainingArguments, set_seed

    from curlora.model import get_curlora_model
    from curlora.pretrained import load_model_and_tokenizer

    out = Path(settings.output_dir)
    set_seed(settings.seed)
    # Cheapest first: the data file's errors, then the model's (the rank must fit its layers).
    conversations = load_conversations(
        settings.data, settings.prompt_field, settings.response_field, settings.messages_field,
        settings.system, settings.split, settings.max_examples,
    )
    base, tokenizer = load_model_and_tokenizer(settings.model)
    config = CURLoRAConfig(
        r=settings.r, alpha=settings.alpha, target_modules=settings.target_modules,
        sampling=settings.sampling, seed=settings.seed,
    )
    model = get_curlora_model(base, config)
    dataset, dropped = build_dataset(tokenizer, conversations, settings.max_length)
    eval_dataset = None
    if settings.eval_fraction > 0 and len(dataset) > 1:
        parts = dataset.train_test_split(test_size=settings.eval_fraction, seed=settings.seed)
        dataset, eval_dataset = parts["train"], parts["test"]

    model.train()
    use_cpu = not torch.cuda.is_available()
    args = TrainingArguments(
        output_dir=str(out / "checkpoints"),
        num_train_epochs=settings.epochs,
        max_steps=settings.max_steps,
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.grad_accum,
        learning_rate=settings.lr,
        weight_decay=settings.weight_decay,
        warmup_steps=settings.warmup_ratio,  # a float < 1 is a fraction of the run in transformers 5
        lr_scheduler_type="linear",
        logging_steps=settings.logging_steps,
        save_strategy="steps" if settings.save_steps > 0 else "no",
        save_steps=max(settings.save_steps, 1),
        eval_strategy="epoch" if eval_dataset is not None else "no",
        bf16=settings.bf16,
        gradient_checkpointing=settings.gradient_checkpointing,
        use_cpu=use_cpu,
        seed=settings.seed,
        report_to=[],
        disable_tqdm=True,
        **settings.extra,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=dataset, eval_dataset=eval_dataset,
        data_collator=SFTCollator(tokenizer.pad_token_id),
    )
    resume = settings.resume and any((out / "checkpoints").glob("checkpoint-*"))
    result = trainer.train(resume_from_checkpoint=True if resume else None)
    losses = [round(h["loss"], 4) for h in trainer.state.log_history if "loss" in h]
    summary: dict[str, Any] = {
        "settings": asdict(settings),
        "examples": len(dataset),
        "eval_examples": len(eval_dataset) if eval_dataset is not None else 0,
        "dropped_too_long": dropped,
        "response_tokens": int(sum(sum(1 for x in r if x != IGNORE_INDEX) for r in dataset["labels"])),
        "steps": trainer.state.global_step,
        "train_loss": round(result.training_loss, 4),
        "loss_history": losses,
        "world_size": args.world_size,
        "trainable_parameters": model.get_nb_trainable_parameters()[0],
    }
    if eval_dataset is not None:
        summary["eval_loss"] = round(trainer.evaluate()["eval_loss"], 4)
    if trainer.is_world_process_zero():
        model.save_pretrained(out)
        (out / SUMMARY_NAME).write_text(json.dumps(summary, indent=2) + "\n")
    trainer.accelerator.wait_for_everyone()
    return summary

