"""Fetching pinned files, tried as an attacker would: a local index serves look-alike packages whose
build backend (or a ``pip/`` folder in the current directory) writes a marker file when it runs."""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from curlora import fetch
from curlora.fetch import FetchError, Pin, fetch_pinned


def sdist(name: str, version: str, marker: Path) -> bytes:
    """A source distribution whose in-tree build backend writes ``marker`` as soon as it is imported."""
    root = f"{name.replace('-', '_')}-{version}"
    files = {
        "PKG-INFO": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        "pyproject.toml": '[build-system]\nrequires = []\nbuild-backend = "backend"\nbackend-path = ["."]\n',
        "backend.py": f"open({str(marker)!r}, 'w').write('ran')\n",
        "data/payload.txt": "the data\n",
    }
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for member, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"{root}/{member}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def wheel(name: str, version: str, payload: bytes) -> bytes:
    """A minimal valid wheel holding ``payload`` as ``<module>/data.bin``."""
    module = name.replace("-", "_")
    info = f"{module}-{version}.dist-info"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(f"{module}/data.bin", payload)
        archive.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        archive.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        archive.writestr(f"{info}/RECORD", "")
    return buffer.getvalue()


def pin_of(package: str, filename: str, data: bytes) -> Pin:
    return Pin(package, "1.0", filename, hashlib.sha256(data).hexdigest(), len(data))


def test_pip_itself_runs_an_sdist_backend_even_with_its_hash_pinned(local_index, tmp_path):
    """Why sdists do not go through pip: its hash-checking mode still prepares the sdist's metadata."""
    marker = tmp_path / "backend-ran"
    data = sdist("evil-pkg", "1.0", marker)
    local_index.add("evil-pkg", "evil_pkg-1.0.tar.gz", data)
    requirements = tmp_path / "req.txt"
    requirements.write_text(pin_of("evil-pkg", "evil_pkg-1.0.tar.gz", data).requirement() + "\n")
    subprocess.run([sys.executable, "-I", "-m", "pip", "download", "--no-deps", "--no-binary=:all:",
                    "--require-hashes", "-r", str(requirements), "-d", str(tmp_path / "out")],
                   cwd=tmp_path, capture_output=True, timeout=300)
    assert marker.exists()


def test_sdist_is_fetched_without_running_its_backend(local_index, tmp_path):
    marker = tmp_path / "backend-ran"
    data = sdist("evil-pkg", "1.0", marker)
    local_index.add("evil-pkg", "evil_pkg-1.0.tar.gz", data)
    [path] = fetch_pinned([pin_of("evil-pkg", "evil_pkg-1.0.tar.gz", data)], tmp_path / "cache")
    assert path.read_bytes() == data
    with tarfile.open(path) as archive:  # read straight from the archive
        assert archive.extractfile("evil_pkg-1.0/data/payload.txt").read() == b"the data\n"
    assert not marker.exists()


def test_look_alike_sdist_is_refused_and_not_kept(local_index, tmp_path):
    marker = tmp_path / "backend-ran"
    genuine = sdist("evil-pkg", "1.0", tmp_path / "elsewhere")
    local_index.add("evil-pkg", "evil_pkg-1.0.tar.gz", sdist("evil-pkg", "1.0", marker))
    cache = tmp_path / "cache"
    with pytest.raises(FetchError, match=r"evil_pkg-1\.0\.tar\.gz from the package index is not the pinned file"):
        fetch_pinned([pin_of("evil-pkg", "evil_pkg-1.0.tar.gz", genuine)], cache)
    assert list(cache.iterdir()) == [] and not marker.exists()


def test_look_alike_wheel_is_refused_by_pip(local_index, tmp_path):
    filename = "good_pkg-1.0-py3-none-any.whl"
    local_index.add("good-pkg", filename, wheel("good-pkg", "1.0", b"forged"))
    cache = tmp_path / "cache"
    with pytest.raises(FetchError, match="(?s)could not download good-pkg==1.0 with pip.*HASHES"):
        fetch_pinned([pin_of("good-pkg", filename, wheel("good-pkg", "1.0", b"genuine"))], cache)
    assert list(cache.iterdir()) == []


def test_pip_folder_in_the_current_directory_does_not_run(local_index, tmp_path, monkeypatch):
    marker = tmp_path / "fake-pip-ran"
    fake = tmp_path / "cwd" / "pip"
    fake.mkdir(parents=True)
    for name in ("__init__.py", "__main__.py"):
        (fake / name).write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    monkeypatch.chdir(fake.parent)
    monkeypatch.setenv("PYTHONPATH", str(fake.parent))
    data = wheel("good-pkg", "1.0", b"genuine")
    local_index.add("good-pkg", "good_pkg-1.0-py3-none-any.whl", data)
    [path] = fetch_pinned([pin_of("good-pkg", "good_pkg-1.0-py3-none-any.whl", data)], tmp_path / "cache")
    assert path.read_bytes() == data and not marker.exists()


def test_damaged_cache_is_fetched_again_once_then_trusted(local_index, tmp_path, monkeypatch):
    data = wheel("good-pkg", "1.0", b"genuine")
    filename = "good_pkg-1.0-py3-none-any.whl"
    local_index.add("good-pkg", filename, data)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / filename).write_bytes(data[:100])  # truncated
    calls = []
    real = fetch._run_pip
    monkeypatch.setattr(fetch, "_run_pip", lambda args, cwd: calls.append(args) or real(args, cwd))
    pin = pin_of("good-pkg", filename, data)
    assert fetch_pinned([pin], cache)[0].read_bytes() == data
    assert fetch_pinned([pin], cache)[0].read_bytes() == data
    assert len(calls) == 1 and [p.name for p in cache.iterdir()] == [filename]  # no temporary leftovers


def test_damaged_cache_with_the_file_gone_from_the_index_fails_clearly(local_index, tmp_path):
    data = wheel("good-pkg", "1.0", b"genuine")
    filename = "good_pkg-1.0-py3-none-any.whl"
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / filename).write_bytes(data[:-1])
    with pytest.raises(FetchError, match="could not download good-pkg==1.0 with pip"):
        fetch_pinned([pin_of("good-pkg", filename, data)], cache)
    assert list(cache.iterdir()) == []  # the damaged file is not kept
