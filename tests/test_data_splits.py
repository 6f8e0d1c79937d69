"""Splits, subsampling and user files (CSV / TSV / JSONL) with their error messages."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from curlora.data import (
    DataError,
    Example,
    TaskSplits,
    load_task_file,
    make_validation_split,
    stratified_split,
    stratified_subsample,
)
from curlora.data.splits import deduplicate, text_key


def make(n_per_label=(50, 30, 20)) -> list[Example]:
    return [Example(f"text {lab} {i}", lab) for lab, n in enumerate(n_per_label) for i in range(n)]


def test_stratified_split_deterministic_disjoint_stratified():
    xs = make() + [Example("Dup  Text", 0), Example("dup text", 0)]
    a = stratified_split(xs, 0.2, seed=7)
    b = stratified_split(xs, 0.2, seed=7)
    c = stratified_split(xs, 0.2, seed=8)
    assert a == b and a != c
    train, held = a
    assert sorted(map(repr, train + held)) == sorted(map(repr, xs))
    assert not {text_key(e) for e in train} & {text_key(e) for e in held}
    assert Counter(e.label for e in held) == {0: 10, 1: 6, 2: 4}


def test_make_validation_split_and_tiny_classes():
    xs = make((10, 2))
    tr, va = make_validation_split(xs, 0.1, seed=0)
    assert {e.label for e in va} == {0, 1} and {e.label for e in tr} == {0, 1}
    with pytest.raises(DataError):
        make_validation_split(xs, 1.5, seed=0)


def test_subsample_keeps_classes_and_is_seeded():
    xs = make((90, 9, 1))
    s = stratified_subsample(xs, 20, seed=1)
    assert len(s) == 20 and s == stratified_subsample(xs, 20, seed=1)
    c = Counter(e.label for e in s)
    assert c[2] == 1 and c[1] in (1, 2) and c[0] >= 17


def test_dedup_drops_conflicts():
    xs = [Example("a", 0), Example("A ", 0), Example("b", 0), Example("b", 1), Example("c", 1)]
    kept, dups, conflicts = deduplicate(xs)
    assert [e.text for e in kept] == ["a", "c"] and (dups, conflicts) == (1, 1)


def test_majority_accuracy_uses_train_majority():
    t = TaskSplits("t", ["a", "b"], [Example("x", 1), Example("y", 1), Example("z", 0)],
                   [Example("u", 0), Example("v", 0), Example("w", 1)])
    assert t.majority_accuracy() == pytest.approx(1 / 3)


def test_user_csv_tsv_jsonl(tmp_path):
    rows = [(f"sentence number {i}", f"other {i}", ["neg", "pos"][i % 2]) for i in range(40)]
    csv_p = tmp_path / "t.csv"
    csv_p.write_text("text,pair,label\n" + "".join(f'"{a}, quoted",{b},{c}\n' for a, b, c in rows))
    t = load_task_file(csv_p, "text", "label", text_pair_column="pair", seed=0)
    assert t.label_names == ["neg", "pos"] and len(t.train) + len(t.eval) == 40
    assert t.train[0].text.endswith(", quoted") and t.is_pair
    assert not {text_key(e) for e in t.train} & {text_key(e) for e in t.eval}
    tsv_p = tmp_path / "t.tsv"
    tsv_p.write_text("text\tlabel\n" + "".join(f'say "{a}"\t{i % 2}\n' for i, (a, _, _) in enumerate(rows)))
    t = load_task_file(tsv_p, "text", "label", label_names=["neg", "pos"], eval_fraction=0.25)
    assert len(t.eval) == 10 and t.train[0].text.startswith('say "')
    jl = tmp_path / "t.jsonl"
    jl.write_text("\n".join(json.dumps({"s": a, "y": c}) for a, _, c in rows) + "\n")
    t = load_task_file(jl, "s", "y", max_train=10, max_eval=4)
    assert (len(t.train), len(t.eval)) == (10, 4)
    assert Counter(e.label for e in t.train) == {0: 5, 1: 5}
    ev = tmp_path / "ev.jsonl"
    ev.write_text(json.dumps({"s": "new one", "y": "pos"}) + "\n")
    t = load_task_file(jl, "s", "y", eval_path=ev)
    assert len(t.train) == 40 and t.eval == [Example("new one", 1)]


def test_user_file_errors(tmp_path):
    with pytest.raises(DataError, match=r"missing file .*nope\.csv"):
        load_task_file(tmp_path / "nope.csv", "text", "label")
    p = tmp_path / "a.csv"
    p.write_text("text,label\nhello,pos\nbye,neg\n")
    with pytest.raises(DataError, match=r"a\.csv: missing column 'sentence'"):
        load_task_file(p, "sentence", "label")
    with pytest.raises(DataError, match=r"a\.csv: missing column 'lab'"):
        load_task_file(p, "text", "lab")
    with pytest.raises(DataError, match=r"a\.csv, line 3: label 'neg' is not in the task's label set"):
        load_task_file(p, "text", "label", label_names=["pos", "neutral"])
    bad_files = [
        ("empty.csv", "text,label\n", r"empty\.csv"),
        ("one.csv", "text,label\nhello,pos\n", "fewer than 2 distinct labels"),
        ("blank.csv", "text,label\n,pos\nbye,neg\n", r"blank\.csv, line 2: empty"),
        ("bad.jsonl", '{"text": "a", "label": 1}\nnot json\n', r"bad\.jsonl, line 2, column 1: not valid JSON"),
        ("a.xlsx", "", "unsupported file type"),
    ]
    for name, content, message in bad_files:
        bad = tmp_path / name
        bad.write_text(content)
        with pytest.raises(DataError, match=message):
            load_task_file(bad, "text", "label")
    ev = tmp_path / "ev.csv"
    ev.write_text("text,label\nhm,maybe\n")
    with pytest.raises(DataError, match=r"ev\.csv, line 2: label 'maybe'"):
        load_task_file(p, "text", "label", eval_path=ev)
    assert issubclass(DataError, ValueError)


def test_a_split_that_cannot_be_made_says_why():
    # Two distinct texts per label, each repeated: the eval split takes one of each, leaving nothing to validate on.
    texts = [Example("good one", 1), Example("fine one", 1), Example("bad one", 0), Example("poor one", 0)]
    train, _ = stratified_split(texts * 5, 0.5, seed=0)
    with pytest.raises(DataError, match=r"task 'x': cannot make the validation split \(fraction 0.15\): 10 rows, "
                                        r"8 of them repeating an earlier text; 2 distinct texts remain "
                                        r"\(label 0: 1, label 1: 1\)"):
        make_validation_split(train, 0.15, origin="task 'x'")
