"""`curlora sft` / `curlora generate`: data reading, response-only loss masks, end to end, two processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_port
import torch
from safetensors.torch import load_file

from curlora.cli import build_parser, main
from curlora.data.splits import DataError
from curlora.sft import IGNORE_INDEX, SFTCollator, SFTSettings, load_conversations, tokenize_conversation, wiki_qa_pairs
from test_trainer import tiny_smol_llama

CHAT = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "6."},
]


def test_prompt_tokens_are_masked(smol_tokenizer):
    out = tokenize_conversation(smol_tokenizer, CHAT)
    ids, labels = out["input_ids"], out["labels"]
    # Same tokens as rendering the whole conversation at once.
    full = smol_tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert ids == smol_tokenizer(full, add_special_tokens=False)["input_ids"]
    learned = [i for i, label in zip(ids, labels) if label != IGNORE_INDEX]
    assert smol_tokenizer.decode(learned) == "4.<|im_end|>\n6.<|im_end|>\n"
    assert all(label in (IGNORE_INDEX, i) for i, label in zip(ids, labels))
    # Everything up to and including "<|im_start|>assistant\n" of the first answer is masked.
    prompt = smol_tokenizer.apply_chat_template(CHAT[:1], tokenize=False, add_generation_prompt=True)
    n_prompt = len(smol_tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert labels[n_prompt] == ids[n_prompt]
    # Truncation keeps the prompt and cuts the answer.
    assert len(tokenize_conversation(smol_tokenizer, CHAT, max_length=n_prompt + 1)["labels"]) == n_prompt + 1


def test_collator_pads():
    batch = SFTCollator(pad_token_id=0)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
                                         {"input_ids": [8], "labels": [8]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_load_conversations_formats(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"q": "Hi?", "a": "Hello."}) + "\n"
                                      + json.dumps({"messages": CHAT}) + "\n")
    rows = load_conversations(str(tmp_path / "a.jsonl"), prompt_field="q", response_field="a", system="Be brief.")
    assert rows[0] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
                       {"role": "assistant", "content": "Hello."}]
    assert rows[1][1:] == CHAT
    (tmp_path / "b.csv").write_text('prompt,response\n"What, exactly?",Yes.\n')
    assert load_conversations(str(tmp_path / "b.csv"))[0][1]["content"] == "Yes."
    with pytest.raises(DataError, match="neither"):
        load_conversations(str(tmp_path / "b.csv"), response_field="answer")
    with pytest.raises(FileNotFoundError):
        load_conversations(str(tmp_path / "missing.jsonl"))


def test_wiki_qa_pairs():
    pairs = wiki_qa_pairs(limit=50)
    assert len(pairs) == 50
    assert all(p["prompt"].startswith("What ") and p["prompt"].endswith("?") for p in pairs)
    assert all(p["response"].endswith(".") for p in pairs)


@pytest.fixture(scope="module")
def tiny_model_dir(smol_tokenizer, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-smol")
    tiny_smol_llama(len(smol_tokenizer)).save_pretrained(path)
    smol_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def qa_file(tmp_path_factory) -> Path:
    rows = [{"prompt": f"What is item {i}?", "response": f"Item {i} is blue."} for i in range(12)]
    path = tmp_path_factory.mktemp("data") / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_without_a_rate_sft_trains_curlora_at_one_where_it_learns():
    """The default is the rate validation chose for CURLoRA r 16 on SmolLM2's offline suite (1e-2),
    not 1e-3, where CURLoRA learned nothing (docs/results/sweep-3seeds); CLI and library agree."""
    args = build_parser().parse_args(["sft", "--data", "x.jsonl", "--output-dir", "out"])
    assert args.lr == SFTSettings.lr == 1e-2


def test_cli_sft_then_generate(tiny_model_dir, qa_file, tmp_path, capsys):
    out = tmp_path / "adapter"
    code = main(["sft", "--data", str(qa_file), "--model", str(tiny_model_dir), "--output-dir", str(out),
                 "--max-steps", "6", "--batch-size", "4", "--lr", "0.05", "--r", "4", "--logging-steps", "1",
                 "--eval-fraction", "0.25", "--save-steps", "3"])
    assert code == 0
    summary = json.loads((out / "sft_summary.json").read_text())
    assert summary["steps"] == 6 and summary["examples"] == 9 and summary["world_size"] == 1
    assert summary["loss_history"][-1] < summary["loss_history"][0]
    assert "eval_loss" in summary
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in out.iterdir()}
    checkpoint = load_file(out / "checkpoints" / "checkpoint-3" / "model.safetensors")
    assert all(k.rsplit(".", 1)[-1] in ("U", "cols", "rows") for k in checkpoint)
    capsys.readouterr()

    code = main(["generate", "--adapter", str(out), "--prompt", "What is item 3?", "--max-new-tokens", "5",
                 "--compare"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "prompt:  What is item 3?" in printed and "adapter:" in printed

    # A bad data path is a clean CLI error, not a traceback.
    assert main(["sft", "--data", str(tmp_path / "nope.jsonl"), "--output-dir", str(tmp_path / "x")]) == 2


WORKER = """
import json, os, sys
import torch.distributed as dist
from curlora.sft import SFTSettings, run_sft
from curlora.model import CURLoRAModel
import transformers

captured = {}
original = transformers.Trainer.train
def train(self, *a, **k):
    out = original(self, *a, **k)
    captured["model"] = self.model if isinstance(self.model, CURLoRAModel) else self.accelerator.unwrap_model(self.model)
    return out
transformers.Trainer.train = train

data, model, out, dump = sys.argv[1:5]
summary = run_sft(SFTSettings(data=data, model=model, output_dir=out, max_steps=3, batch_size=2, lr=0.05, r=4,
                              logging_steps=1))
rank = dist.get_rank()
state = {k: v.tolist() for k, v in captured["model"].state_dict().items() if k.endswith(".U")}
with open(os.path.join(dump, f"rank{rank}.json"), "w") as f:
    json.dump({"world": dist.get_world_size(), "summary_world": summary["world_size"], "U": state}, f)
"""


def test_two_process_data_parallel(tiny_model_dir, qa_file, tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    dump = tmp_path / "dump"
    dump.mkdir()
    out = tmp_path / "adapter"
    torchrun = str(Path(sys.executable).parent / "torchrun")  # ships with torch
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    proc = subprocess.run(
        [torchrun, "--nproc_per_node", "2", "--master_port", str(free_port()), str(worker),
         str(qa_file), str(tiny_model_dir), str(out), str(dump)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((dump / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2] and ranks[0]["summary_world"] == 2
    u0, u1 = ranks[0]["U"], ranks[1]["U"]
    assert u0 and u0 == u1  # DDP kept the ranks in step
    assert any(torch.tensor(v).abs().sum() > 0 for v in u0.values())
    # Only rank 0 wrote the adapter (no duplicate or partial files).
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == ["adapter_config.json", "adapter_model.safetensors", "sft_summary.json"]
    saved = load_file(out / "adapter_model.safetensors")
    assert saved
