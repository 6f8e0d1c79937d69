"""Paper tasks from the real files in their original formats, and the hub source's errors."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter

import pytest

from curlora.data import DataError, load_corpus, load_task, sources
from curlora.data.splits import text_key


def counts(xs) -> dict[int, int]:
    return dict(sorted(Counter(e.label for e in xs).items()))


def test_mrpc_counts_and_pairs(data_dir):
    t = load_task("mrpc", source="local", data_dir=data_dir)
    assert (len(t.train), len(t.eval)) == (4076, 1725)
    assert counts(t.train) == {0: 1323, 1: 2753}
    assert counts(t.eval) == {0: 578, 1: 1147}
    assert t.label_names == ["not_paraphrase", "paraphrase"] and t.is_pair
    assert all(e.text_pair for e in t.train + t.eval)
    # quoting disabled: strings with double quotes survive intact, BOM stripped
    assert any('"' in e.text for e in t.train)
    assert not any(e.text.startswith("\ufeff") for e in t.train)


def test_sst2_counts(data_dir):
    t = load_task("sst2", data_dir=data_dir)  # data_dir => local source
    assert (len(t.train), len(t.eval)) == (67349, 872)
    assert counts(t.train) == {0: 29780, 1: 37569}
    assert counts(t.eval) == {0: 428, 1: 444}
    assert not t.is_pair


def test_sentiment140_counts_and_split(data_dir):
    t = load_task("sentiment140", data_dir=data_dir, seed=0)
    allx = t.train + t.eval
    assert len(allx) == 498
    assert counts(allx) == {0: 177, 1: 139, 2: 182}
    assert t.label_names == ["negative", "neutral", "positive"]
    assert not {text_key(e) for e in t.train} & {text_key(e) for e in t.eval}
    assert abs(len(t.eval) - 0.2 * 498) <= 3
    for lab, n in counts(allx).items():  # stratified
        assert abs(counts(t.eval)[lab] - 0.2 * n) <= 1
    t2 = load_task("sentiment140", data_dir=data_dir, seed=0)
    assert t2.train == t.train and t2.eval == t.eval
    t3 = load_task("sentiment140", data_dir=data_dir, seed=1)
    assert t3.eval != t.eval


def test_subsampling_is_seeded_and_stratified(data_dir):
    a = load_task("sst2", data_dir=data_dir, max_train=200, max_eval=50, seed=3)
    b = load_task("sst2", data_dir=data_dir, max_train=200, max_eval=50, seed=3)
    assert a.train == b.train and a.eval == b.eval
    assert (len(a.train), len(a.eval)) == (200, 50)
    assert abs(counts(a.train)[1] - 200 * 37569 / 67349) <= 1
    assert abs(counts(a.eval)[1] - 50 * 444 / 872) <= 1


def test_wikitext2_corpus(data_dir):
    text = load_corpus("wikitext2", data_dir=data_dir)
    assert "\r" not in text
    assert " = Robert Boulter = " in text
    lines = [ln for ln in text.split("\n") if ln.strip()]
    assert len(lines) == 2891
    short = load_corpus("wikitext2", data_dir=data_dir, max_chars=1000)
    assert 0 < len(short) <= 1000 and text.startswith(short)


def test_missing_dir_and_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_task("mrpc", source="local", data_dir=tmp_path / "nope")
    with pytest.raises(DataError, match="msr_paraphrase_train.txt"):
        load_task("mrpc", source="local", data_dir=tmp_path)
    with pytest.raises(DataError, match="data-dir"):
        load_task("mrpc", source="local")
    with pytest.raises(DataError, match="unknown task"):
        load_task("nope")
    with pytest.raises(DataError, match="supports"):
        load_task("mrpc", source="offline")


def test_bad_label_and_empty_split_in_local_files(tmp_path):
    d = tmp_path / "sst2"
    d.mkdir()
    (d / "train.tsv").write_text("sentence\tlabel\ngood film\t1\nbad film\t7\n")
    (d / "dev.tsv").write_text("sentence\tlabel\nok\t1\n")
    with pytest.raises(DataError, match=r"train\.tsv, line 3: label '7' is not in"):
        load_task("sst2", data_dir=tmp_path)
    (d / "train.tsv").write_text("sentence\tlabel\ngood film\t1\n")
    (d / "dev.tsv").write_text("sentence\tlabel\n")
    with pytest.raises(DataError, match="eval split is empty"):
        load_task("sst2", data_dir=tmp_path)
    (d / "dev.tsv").write_text("text\tlabel\nok\t1\n")
    with pytest.raises(DataError, match=r"dev\.tsv: missing column 'sentence'"):
        load_task("sst2", data_dir=tmp_path)
    s = tmp_path / "sentiment140"
    s.mkdir()
    (s / "testdata.manual.2009.06.14.csv").write_text('0,"sad"\n3,"odd"\n')
    with pytest.raises(DataError, match="line 2: label '3'"):
        load_task("sentiment140", data_dir=tmp_path)


def test_hub_failure_is_explained(monkeypatch):
    def boom(*a, **k):
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub")

    monkeypatch.setattr(sources, "_load_dataset", boom)
    for name in ("mrpc", "sst2", "sentiment140"):
        with pytest.raises(DataError, match="--data-dir") as ei:
            load_task(name, source="hub")
        assert "hub" in str(ei.value)
    with pytest.raises(DataError, match="--data-dir"):
        load_corpus("wikitext2", source="hub")


def test_hub_offline_mode_real_datasets(tmp_path):
    """The real ``datasets.load_dataset`` with the hub switched off fails with our hint."""
    code = (
        "from curlora.data import load_task, DataError\n"
        "try:\n    load_task('mrpc', source='hub')\n"
        "except DataError as e:\n    print('DATAERROR', e)\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               HF_HOME=str(tmp_path / "hf"))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=120)
    assert "DATAERROR" in out.stdout, out.stderr[-2000:]
    assert "--data-dir" in out.stdout and "nyu-mll/glue" in out.stdout
