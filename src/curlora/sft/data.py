"""SFT data: prompt/response or chat rows from files or the hub, rendered with the chat template,
with the loss on response tokens only (prompt tokens get label -100)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from curlora.checks import looks_like_path
from curlora.data.sources import read_table
from curlora.data.splits import DataError

IGNORE_INDEX = -100
Messages = list[dict[str, str]]

TABLE_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".tsv")


def check_data_source(source: str) -> None:
    """A ``--data`` value that names a file must be one; anything else is taken for a hub dataset id."""
    path = Path(source).expanduser()
    if path.is_dir():
        raise FileNotFoundError(f"--data {path} is a directory; pass a .jsonl/.csv/.tsv file or a hub dataset id.")
    if not path.is_file() and (path.suffix.lower() in TABLE_SUFFIXES or looks_like_path(source)):
        raise FileNotFoundError(f"--data file {path} does not exist; pass an existing .jsonl/.csv/.tsv file.")


def _read_rows(source: str, split: str) -> list[dict[str, Any]]:
    check_data_source(source)
    path = Path(source).expanduser()
    if path.is_file():
        return read_table(path)[1]
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
        where = f"line {row['__line__']}" if "__line__" in row else f"row {i}"
        if row.get(messages_field):
            messages = [{"role": str(m["role"]), "content": str(m["content"])} for m in row[messages_field]]
        elif row.get(prompt_field) is not None and row.get(response_field) is not None:
            messages = [
                {"role": "user", "content": str(row[prompt_field])},
                {"role": "assistant", "content": str(row[response_field])},
            ]
        else:
            raise DataError(
                f"{source}, {where}: neither a {messages_field!r} list nor {prompt_field!r} and "
                f"{response_field!r} fields (columns: {sorted(k for k in row if k != '__line__')}); set --prompt-field/--response-field "
                f"or --messages-field."
            )
        if system and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": system})
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{source}, {where}: no assistant turn to learn from.")
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
