"""The core/harness boundary and the light install: the library core imports nothing from the
benchmark, the data layer, SFT or the CLI, and works with every extra's package missing."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

from curlora.cli import main
from curlora.extras import EXTRAS

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "curlora"
HARNESS = ("curlora.continual", "curlora.data", "curlora.sft", "curlora.cli", "curlora.extras")
CORE = sorted(
    p for p in PACKAGE.rglob("*.py")
    if p.relative_to(PACKAGE).parts[0].removesuffix(".py") not in {h.split(".")[1] for h in HARNESS}
)
# Import names of every extra's packages; pyyaml and tqdm are left out: transformers needs them.
OPTIONAL = ("accelerate", "bitsandbytes", "datasets", "gguf", "matplotlib", "peft", "ray", "tensorboard", "trl")


def _imported_names(path: Path) -> set[str]:
    """Every module ``path`` imports, ``from curlora import x`` also counted as ``curlora.x``."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_core_modules_are_the_expected_ones():
    """The boundary test below really sees the core (a rename must not make it vacuous)."""
    names = {p.relative_to(PACKAGE).as_posix() for p in CORE}
    assert {"__init__.py", "config.py", "layer.py", "model.py", "saving.py", "sampling.py",
            "diagnostics.py", "fileio.py", "pretrained.py", "quantization/registry.py",
            "quantization/bitsandbytes.py"} <= names
    assert not any(n.startswith(("continual/", "data/", "sft/")) or n == "cli.py" for n in names)


@pytest.mark.parametrize("path", CORE, ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_core_imports_nothing_from_the_harness(path):
    bad = sorted(n for n in _imported_names(path) if any(n == h or n.startswith(h + ".") for h in HARNESS))
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_core_names_no_optional_package_at_module_level():
    """Only the bitsandbytes backend may import bitsandbytes, and only inside functions."""
    for path in CORE:
        tree = ast.parse(path.read_text())
        top = {alias.name.split(".")[0] for node in tree.body if isinstance(node, ast.Import) for alias in node.names}
        top |= {node.module.split(".")[0] for node in tree.body
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0}
        assert not top & set(OPTIONAL), f"{path.relative_to(ROOT)} imports {top & set(OPTIONAL)} at import time"


def test_no_module_imports_ray_at_import_time():
    """Ray is imported only when a command runs under executor ray (curlora.continual.executors)."""
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        top = {alias.name.split(".")[0] for node in tree.body if isinstance(node, ast.Import) for alias in node.names}
        top |= {node.module.split(".")[0] for node in tree.body
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0}
        assert "ray" not in top, f"{path.relative_to(ROOT)} imports ray at import time"


def test_executor_ray_names_its_extra_before_any_work(monkeypatch):
    import curlora.extras
    from curlora.continual.config import ContinualConfig

    monkeypatch.setattr(curlora.extras, "missing_packages", lambda e: ["ray"] if e == "ray" else [])
    with pytest.raises(ImportError, match=re.escape("executor ray (--executor ray) needs ray: pip install 'curlora[ray]'")):
        ContinualConfig(executor="ray")


def test_import_layers_hold():
    """pyproject.toml's import-linter contracts (the layers of docs/library.md): the core imports none of
    the harness, the benchmark's layers import one way, and no package has an import circle."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    result = subprocess.run([str(Path(sys.executable).parent / "lint-imports"), "--no-cache"], cwd=ROOT,
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "0 broken" in result.stdout


def test_extras_match_pyproject():
    optional = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    declared = {
        extra: tuple(sorted(r.split(">")[0].split("=")[0].split("<")[0] for r in reqs))
        for extra, reqs in optional.items() if extra not in ("all", "dev")
    }
    assert declared == {extra: tuple(sorted(d)) for extra, d in EXTRAS.items()}
    assert optional["all"] == [f"curlora[{','.join(EXTRAS)}]"]


def _run(script: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_WAIT_POLICY": "PASSIVE"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                          env=env, timeout=300)


ADAPT_SAVE_LOAD = """
    import sys, tempfile
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from curlora import CURLoRAConfig, CURLoRAModel, get_curlora_model

    def tiny():
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=48, intermediate_size=96,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)).eval()

    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    model = get_curlora_model(tiny(), CURLoRAConfig(r=4, target_modules=TARGETS))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        loaded = CURLoRAModel.from_pretrained(tiny(), directory)
    with torch.no_grad():
        after = loaded(input_ids=ids).logits
    assert not torch.equal(before, tiny()(input_ids=ids).logits), "the training step changed nothing"
    assert torch.equal(before, after), (before - after).abs().max()
    merged = loaded.merge_and_unload()
    print("ok", "bitsandbytes" in sys.modules)
"""


def test_core_adapts_saves_and_loads_without_any_extra():
    """The light install: every extra's package unimportable (``sys.modules[name] = None`` makes
    both ``import`` and ``importlib.util.find_spec``, which transformers asks, see it missing)."""
    block = f"import sys\nfor name in {OPTIONAL!r}:\n    sys.modules[name] = None\n"
    result = _run(block + "TARGETS = None\n" + textwrap.dedent(ADAPT_SAVE_LOAD))  # default targets
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["ok", "True"]  # True: the blocker's None entry for bitsandbytes


def test_unquantized_model_never_imports_bitsandbytes_and_peft_prints_no_kernel_warning():
    """With everything installed: adapting a plain model leaves bitsandbytes unimported, and
    importing PEFT and bitsandbytes afterwards (the harness does both; PEFT up to 0.21 imported
    bitsandbytes itself whenever it was installed, 0.22 no longer does) prints no kernels-community
    warning. Explicit targets: the default ones are looked up in PEFT's table (curlora.targets)."""
    result = _run("TARGETS = ['q_proj', 'v_proj']\n" + textwrap.dedent(ADAPT_SAVE_LOAD) + textwrap.dedent("""
    from peft import get_peft_config, get_peft_model
    import bitsandbytes
    """))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["ok", "False"]
    assert "kernels-community" not in result.stderr, result.stderr


def test_the_kernel_warning_is_real_without_curlora():
    """The warning the filter drops does appear when bitsandbytes is imported first (on CPUs with
    avx512_bf16, where bitsandbytes looks for the kernel): the test above is not vacuous."""
    result = _run("""
        import bitsandbytes
        from bitsandbytes.functional import has_avx512bf16
        print(bool(has_avx512bf16()))
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    if result.stdout.strip() != "True":
        pytest.skip("this CPU has no avx512_bf16: bitsandbytes does not look for the kernel")
    assert "Failed to load CPU gemm_4bit_forward from kernels-community" in result.stderr


@pytest.mark.parametrize("argv, extra", [
    (["continual", "--methods", "lora"], "bench"),
    (["continual", "--quantize", "nf4"], "quant"),
    (["continual", "--quantize=int8"], "quant"),
    (["continual", "--log-dir", "tb"], "tensorboard"),
    (["continual", "--log-dir=tb"], "tensorboard"),
    (["continual", "--executor", "ray"], "ray"),
    (["continual", "--executor=ray"], "ray"),
    (["sft", "--data", "x.jsonl", "--output-dir", "out"], "sft"),
    (["generate", "--adapter", "a", "--prompt", "p"], "gguf"),
])
def test_command_names_the_missing_extra_before_any_work(monkeypatch, capsys, argv, extra):
    import curlora.extras

    monkeypatch.setattr(curlora.extras, "missing_packages", lambda e: ["pkg"] if e == extra else [])

    def parser_built():
        raise AssertionError("the parser (and with it the harness) was imported before the extras were checked")

    monkeypatch.setattr("curlora.cli.build_parser", parser_built)
    assert main(argv) == 2
    assert f"pip install 'curlora[{extra}]'" in capsys.readouterr().err
