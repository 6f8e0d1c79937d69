"""Issue 39: a hostile cache, config, task file or run directory, each tried as an attacker would. Every
case ends in one line on stderr and exit status 2 before any work (or is used correctly), writes nothing
outside the run directory and never uses what it cannot check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama

from curlora import pretrained


# -- 1. a model planted in the cache ---------------------------------------------------------------------
@pytest.fixture
def tiny_gguf(tmp_path, monkeypatch) -> tuple[Path, torch.nn.Module]:
    """A tiny GGUF file standing in for SmolLM2's (pinned by its own sha256), and the model in it."""
    from test_pretrained_gguf import TOKENS, write_tiny_gguf

    monkeypatch.setenv("CURLORA_CACHE", str(tmp_path / "cache"))
    source = tiny_llama(seed=3, hidden=32, vocab=len(TOKENS))
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, source)
    monkeypatch.setattr(pretrained, "smollm2_gguf_path", lambda: path)
    monkeypatch.setattr(pretrained, "SMOLLM2_SHA256", pretrained._file_sha256(path))
    return path, source


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([[1, 5, 7, 31, 32, 6]])).logits


def _same_as_source(source: torch.nn.Module) -> bool:
    model, _ = pretrained.load_model_and_tokenizer(None)
    return torch.equal(_logits(model), _logits(source))


def test_a_model_planted_in_the_cache_is_never_used(tiny_gguf, tmp_path, capsys):
    _, source = tiny_gguf
    planted = tmp_path / "cache" / "models" / pretrained.SMOLLM2_NAME
    tiny_llama(seed=9, hidden=32, vocab=len(source.model.embed_tokens.weight)).save_pretrained(planted)
    assert _same_as_source(source)  # converted again from the pinned file
    err = capsys.readouterr().err
    assert "has no curlora-manifest.json" in err and "converting it again" in err
    assert _same_as_source(source)  # and from then on read back after its check
    assert "converting" not in capsys.readouterr().err


def _swap_weights(target: Path) -> None:
    other = tiny_llama(seed=9, hidden=32, vocab=57)
    other.save_pretrained(target.parent / "other")
    (target / "model.safetensors").write_bytes((target.parent / "other" / "model.safetensors").read_bytes())


def _forge_manifest(target: Path) -> None:
    manifest = json.loads((target / pretrained.MANIFEST).read_text())
    (target / pretrained.MANIFEST).write_text(json.dumps({**manifest, "source_sha256": "0" * 64}))


def _link_tokenizer(target: Path) -> None:
    (target / "tokenizer.json").rename(target.parent / "elsewhere.json")
    (target / "tokenizer.json").symlink_to(target.parent / "elsewhere.json")


@pytest.mark.parametrize(("tamper", "message"), [
    (_swap_weights, "model.safetensors, whose sha256 differs"),
    (_forge_manifest, "was not converted from the pinned GGUF"),
    (lambda t: (t / "extra.py").write_text("print('hi')"), "holds files"),
    (_link_tokenizer, "tokenizer.json, which is not a regular file"),
    (lambda t: (t / pretrained.MANIFEST).unlink(), "has no curlora-manifest.json"),
])
def test_a_tampered_cache_entry_is_converted_again(tiny_gguf, tmp_path, capsys, tamper, message):
    _, source = tiny_gguf
    assert _same_as_source(source)
    tamper(tmp_path / "cache" / "models" / pretrained.SMOLLM2_NAME)
    capsys.readouterr()
    assert _same_as_source(source)
    assert message in capsys.readouterr().err
    assert tamper is not _link_tokenizer or (tmp_path / "cache" / "models" / "elsewhere.json").exists()  # not followed


def test_a_pinned_input_that_changed_is_refused(tiny_gguf, monkeypatch):
    monkeypatch.setattr(pretrained, "SMOLLM2_SHA256", "1" * 64)
    with pytest.raises(ValueError, match="tiny.gguf has sha256 .* expected 1111"):
        pretrained.resolve_model_path(None)
