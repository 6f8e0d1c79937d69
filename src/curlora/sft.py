"""Generative fine-tuning (SFT) with a CURLoRA adapter, and answering prompts with a saved one.

``curlora sft`` reads prompt/response pairs or chat ``messages`` from a local JSONL/JSON/CSV/TSV
file or a hub dataset, renders them with the tokenizer's chat template, trains with
``transformers.Trainer`` on the response tokens only (prompt tokens get label -100), and saves
the adapter. ``curlora generate`` loads it onto the base model and answers a prompt.

Why ``transformers.Trainer`` and a small collator rather than ``trl.SFTTrainer``: the loss mask is
built here (TRL's ``assistant_only_loss`` needs ``{% generation %}`` markers that SmolLM2's
template lacks), so TRL would add only its fused LM head, at the price of a hard dependency and
a patched ``forward`` (see :mod:`curlora.integrations` to use it anyway). Trainer brings the rest:
checkpoints holding only the adapter, ``--resume``, gradient accumulation and checkpointing,
bf16, and data-parallel runs under ``accelerate launch`` / ``torchrun``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from curlora.config import CURLoRAConfig
from curlora.data.sources import read_table
from curlora.data.splits import DataError

SUMMARY_NAME = "sft_summary.json"
IGNORE_INDEX = -100
Messages = list[dict[str, str]]


# --------------------------------------------------------------------------- data


def _read_rows(source: str, split: str) -> list[dict[str, Any]]:
    path = Path(source).expanduser()
    if path.is_file():
        return read_table(path)[1]
    if path.suffix.lower() in (".jsonl", ".ndjson", ".json", ".csv", ".tsv") or path.parent != Path("."):
        raise FileNotFoundError(f"No such data file: {path}")
    try:
        import datasets

        return list(datasets.load_dataset(source, split=split))
    except Exception as error:  # noqa: BLE001 - offline hub errors come in many types
        raise DataError(
            f"Could not load {source!r} as a local file or hub dataset ({type(error).__name__}: {error}). "
            f"Without access to the Hugging Face hub, pass a local .jsonl/.csv file."
        ) from error


def load_conversations(
    source: str,
    prompt_field: str = "prompt",
    response_field: str = "response",
    messages_field: str = "messages",
    system: str | None = None,
    split: str = "train",
    limit: int | None = None,
) -> list[Messages]:
    """Chat conversations from a file or hub dataset: a ``messages`` list per row, or a
    prompt/response pair turned into a user turn and an assistant turn."""
    rows = _read_rows(source, split)
    conversations: list[Messages] = []
    for i, row in enumerate(rows):
        if row.get(messages_field):
            messages = [{"role": str(m["role"]), "content": str(m["content"])} for m in row[messages_field]]
        elif row.get(prompt_field) is not None and row.get(response_field) is not None:
            messages = [
                {"role": "user", "content": str(row[prompt_field])},
                {"role": "assistant", "content": str(row[response_field])},
            ]
        else:
            raise DataError(
                f"{source}: row {i} has neither a {messages_field!r} list nor {prompt_field!r} and "
                f"{response_field!r} fields (columns: {sorted(row)}); set --prompt-field/--response-field "
                f"or --messages-field."
            )
        if system and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": system})
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{source}: row {i} has no assistant turn to learn from.")
        conversations.append(messages)
        if limit is not None and len(conversations) >= limit:
            break
    if not conversations:
        raise DataError(f"{source}: no examples found")
    return conversations


def _render(tokenizer, messages: Messages, add_generation_prompt: bool) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    # No chat template: a plain "role: text" transcript; the EOS token ends each answer.
    text = "".join(
        f"{m['role']}: {m['content']}" + (tokenizer.eos_token or "" if m["role"] == "assistant" else "") + "\n"
        for m in messages
    )
    return text + ("assistant: " if add_generation_prompt else "")


def prompt_text(tokenizer, prompt: str, system: str | None = None) -> str:
    """What the model sees before answering ``prompt`` (chat template with the generation prompt)."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return _render(tokenizer, messages, add_generation_prompt=True)


def tokenize_conversation(tokenizer, messages: Messages, max_length: int | None = None) -> dict[str, list[int]]:
    """``input_ids`` and ``labels`` where only the assistant turns' tokens (their end-of-turn
    marker included) are labelled; everything else, the chat template's own text included, is
    -100. The conversation is rendered turn by turn; each rendering must extend the previous one."""
    input_ids: list[int] = []
    labels: list[int] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], add_generation_prompt=True)
        after = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not (before.startswith(done) and after.startswith(before)):
            raise DataError(
                "The chat template does not render conversations prefix by prefix, so prompt tokens "
                "cannot be told from response tokens; flatten the data to prompt/response pairs."
            )
        context = tokenizer(before[len(done):], add_special_tokens=not done)["input_ids"]
        answer = tokenizer(after[len(before):], add_special_tokens=False)["input_ids"]
        input_ids += context + answer
        labels += [IGNORE_INDEX] * len(context) + answer
        done = after
    if max_length is not None:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return {"input_ids": input_ids, "labels": labels}


@dataclass
class SFTCollator:
    """Right-pads ``input_ids`` (with the pad token) and ``labels`` (with -100); adds the mask."""

    pad_token_id: int

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            ids[row, :n] = torch.as_tensor(f["input_ids"])
            labels[row, :n] = torch.as_tensor(f["labels"])
            mask[row, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def build_dataset(tokenizer, conversations: Sequence[Messages], max_length: int):
    """A ``datasets.Dataset`` of tokenized conversations; ones whose answer was cut away are dropped."""
    import datasets

    rows = [tokenize_conversation(tokenizer, c, max_length) for c in conversations]
    kept = [r for r in rows if any(label != IGNORE_INDEX for label in r["labels"])]
    if not kept:
        raise DataError(f"Every example's answer lies beyond --max-length {max_length}; raise it.")
    return datasets.Dataset.from_list(kept), len(rows) - len(kept)


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
    lr: float = 1e-3
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


def run_sft(settings: SFTSettings) -> dict[str, Any]:
    """Train a CURLoRA adapter on the responses and save it to ``settings.output_dir``."""
    from transformers import Trainer, TrainingArguments, set_seed

    from curlora.model import get_curlora_model
    from curlora.pretrained import load_model_and_tokenizer

    out = Path(settings.output_dir)
    set_seed(settings.seed)
    base, tokenizer = load_model_and_tokenizer(settings.model)
    conversations = load_conversations(
        settings.data, settings.prompt_field, settings.response_field, settings.messages_field,
        settings.system, settings.split, settings.max_examples,
    )
    dataset, dropped = build_dataset(tokenizer, conversations, settings.max_length)
    eval_dataset = None
    if settings.eval_fraction > 0 and len(dataset) > 1:
        parts = dataset.train_test_split(test_size=settings.eval_fraction, seed=settings.seed)
        dataset, eval_dataset = parts["train"], parts["test"]

    config = CURLoRAConfig(
        r=settings.r, alpha=settings.alpha, target_modules=settings.target_modules,
        sampling=settings.sampling, seed=settings.seed,
    )
    model = get_curlora_model(base, config)
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


# --------------------------------------------------------------------------- generation


def load_for_generation(adapter: str | Path, model: str | None = None):
    """(CURLoRAModel, tokenizer): the base from ``model``, else the one the adapter was trained
    with by ``curlora sft``, else the default SmolLM2."""
    from curlora.model import CURLoRAModel
    from curlora.pretrained import load_model_and_tokenizer

    adapter = Path(adapter)
    if model is None and (adapter / SUMMARY_NAME).is_file():
        model = json.loads((adapter / SUMMARY_NAME).read_text())["settings"].get("model")
    base, tokenizer = load_model_and_tokenizer(model)
    return CURLoRAModel.from_pretrained(base, adapter).eval(), tokenizer


@torch.no_grad()
def generate(model, tokenizer, prompt: str, max_new_tokens: int = 64, system: str | None = None) -> str:
    """Greedy answer to ``prompt``, rendered with the chat template as in training."""
    text = prompt_text(tokenizer, prompt, system)
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=not getattr(tokenizer, "chat_template", None))
    enc = {k: v.to(next(model.parameters()).device) for k, v in enc.items()}
    end_ids = [i for i in {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")} if isinstance(i, int) and i >= 0]
    output = model.generate(
        **enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=end_ids or None,
        pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer.decode(output[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def wiki_qa_pairs(limit: int | None = None, min_chars: int = 20, max_chars: int = 300) -> list[dict[str, str]]:
    """Question/answer pairs from the offline Wikipedia lead summaries (CC BY-SA): a summary that
    opens "X is/was ..." gives "What is X?" → its first sentence."""
    import re

    from curlora.data import load_corpus

    pattern = re.compile(r"^(?P<subject>[^.()]{2,60}?) (?P<verb>is|was|are|were) (?P<rest>.+)$")
    pairs = []
    for summary in load_corpus("wiki_summaries").split("\n\n"):
        first = re.split(r"(?<=[a-z0-9)\]])\. (?=[A-Z])", summary.strip(), maxsplit=1)[0].rstrip(".") + "."
        match = pattern.match(first)
        if not match or not min_chars <= len(first) <= max_chars:
            continue
        subject = match["subject"].split(",")[0].strip()  # "Squash, sometimes called ..." → "Squash"
        subject = re.sub(r"^(A|An|The) ", lambda m: m[1].lower() + " ", subject)
        pairs.append({"prompt": f"What {match['verb']} {subject}?", "response": first})
        if limit is not None and len(pairs) >= limit:
            break
    return pairs


def write_jsonl(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


__all__ = [
    "SFTCollator", "SFTSettings", "build_dataset", "generate", "load_conversations", "load_for_generation",
    "prompt_text", "run_sft", "tokenize_conversation", "wiki_qa_pairs", "write_jsonl",
]
