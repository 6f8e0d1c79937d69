"""O-LoRA's benchmark files (CL_Benchmark/<type>/<name>/{train,dev,test}.json and labels.json) as task
files, on small files written here in that format: no data in the repository."""

import json
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from curlora.continual.config import ContinualConfig
from curlora.continual.prepare import load_data
from curlora.data import DataError, load_task_file
from curlora.data.splits import Example, text_key


def write_olora(root: Path, name: str, labels: list[str], per_label: int = 12, test_per_label: int = 5,
                dev: str = "test", kind: str = "TC") -> Path:
    """One dataset in O-LoRA's layout (root/CL_Benchmark/<kind>/<name>): one-line JSON lists of {"label",
    "sentence"}; ``dev``: "test" (a byte copy of test.json, as in O-LoRA's repository), "own" (texts of its
    own) or "none"."""
    folder = root / "CL_Benchmark" / kind / name
    folder.mkdir(parents=True)

    def rows(split: str, n: int) -> list[dict[str, str]]:
        return [{"label": label, "sentence": f"{name} {split} text {i} about {label}"}
                for i in range(n) for label in labels]

    (folder / "labels.json").write_text(json.dumps(labels))
    (folder / "train.json").write_text(json.dumps(rows("train", per_label)))
    (folder / "test.json").write_text(json.dumps(rows("test", test_per_label)))
    if dev == "test":
        (folder / "dev.json").write_bytes((folder / "test.json").read_bytes())
    elif dev == "own":
        (folder / "dev.json").write_text(json.dumps(rows("dev", test_per_label)))
    return folder


AGNEWS = ["World", "Sports", "Business", "Science or Technology"]


@pytest.mark.parametrize("entry", ["directory", "train.json"])
def test_a_dataset_directory_is_a_task_with_its_labels_and_test_file(tmp_path, entry):
    folder = write_olora(tmp_path, "agnews", AGNEWS)
    task = load_task_file(folder if entry == "directory" else folder / "train.json")
    assert task.name == "agnews" and task.label_names == AGNEWS
    assert task.prompt.label_words == tuple(AGNEWS)  # labels.json's strings are the answers
    assert len(task.train) == 48 and len(task.eval) == 20
    assert all(" test " in e.text for e in task.eval) and all(" train " in e.text for e in task.train)
    assert Counter(task.label_names[e.label] for e in task.eval) == {label: 5 for label in AGNEWS}
    assert any("dev.json is byte-identical to test.json, so it is not used" in note for note in task.notes)


def test_subsampling_names_the_rows_kept_of_every_label(tmp_path):
    task = load_task_file(write_olora(tmp_path, "agnews", AGNEWS), max_train=8, max_eval=12, seed=3)
    assert Counter(e.label for e in task.train) == {0: 2, 1: 2, 2: 2, 3: 2}
    assert ("train: 8 of 48 rows, a seeded (seed=3) stratified subsample (World: 2, Sports: 2, Business: 2, "
            "Science or Technology: 2)") in task.notes
    assert any(note.startswith("eval: 12 of 20 rows, a seeded (seed=4)") for note in task.notes)


@pytest.mark.parametrize("dev", ["test", "own"])
def test_dev_json_is_never_used_for_selection(tmp_path, dev):
    """Validation (what rates are chosen on) is carved from train.json's rows; dev.json, the test file again
    in O-LoRA's repository, never reaches training, validation or evaluation."""
    folder = write_olora(tmp_path, "amazon", ["very negative", "negative", "neutral", "positive", "very positive"],
                         dev=dev)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Some general text.\n")
    config = ContinualConfig(tasks=[], task_files=[{"path": str(folder)}], corpus_file=str(corpus),
                             methods=["head"], examples_per_task=40, eval_examples=25, validation_fraction=0.25)
    tokenizer = lambda text, return_tensors: SimpleNamespace(input_ids=torch.arange(8)[None])  # noqa: E731
    data = load_data(config, tokenizer)
    train_texts = {text_key(e) for e in load_task_file(folder).train}
    dev_texts = {text_key(Example(row["sentence"], 0)) for row in json.loads((folder / "dev.json").read_text())}
    validation = {text_key(e) for e in data.validation[0]}
    assert validation and validation <= train_texts and not validation & dev_texts
    assert not {text_key(e) for e in data.tasks[0].train} & dev_texts
    if dev == "own":
        assert not {text_key(e) for e in data.tasks[0].eval} & dev_texts
        assert "dev.json is not used: validation for choosing rates is carved from train.json's rows" in \
            data.tasks[0].notes


def test_a_directory_without_labels_json_or_a_table_without_columns_is_refused(tmp_path):
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match=r"plain is a directory but not one of O-LoRA's datasets \(no labels.json"):
        load_task_file(tmp_path / "plain")
    table = tmp_path / "t.csv"
    table.write_text("text,label\na,x\nb,y\n")
    with pytest.raises(DataError, match=r"t\.csv: a task file needs text_column and label_column"):
        load_task_file(table)


def test_a_bad_row_or_labels_file_is_named_by_its_item(tmp_path):
    folder = write_olora(tmp_path, "agnews", AGNEWS)
    rows = json.loads((folder / "train.json").read_text())
    rows[6]["label"] = "Weather"
    (folder / "train.json").write_text(json.dumps(rows))
    with pytest.raises(DataError, match=r"train\.json, item 7: label 'Weather' is not in the task's label set"):
        load_task_file(folder)
    (folder / "labels.json").write_text('["World", "World"]')
    with pytest.raises(DataError, match=r"labels\.json: expected a JSON list of at least 2 distinct label strings"):
        load_task_file(folder)


def test_a_config_takes_a_dataset_directory_as_a_task_file_entry(tmp_path):
    folder = write_olora(tmp_path, "agnews", AGNEWS)
    config = ContinualConfig(tasks=[], task_files=[{"path": str(folder)}], methods=["head"])
    assert config.task_files == [{"path": str(folder)}]
    (tmp_path / "t.csv").write_text("text,label\na,x\nb,y\n")
    with pytest.raises(ValueError, match="needs keys text_column and label_column"):
        ContinualConfig(tasks=[], task_files=[{"path": str(tmp_path / "t.csv")}], methods=["head"])


@pytest.mark.parametrize("split", ["train.json", "test.json"])
def test_a_dataset_directory_missing_a_file_is_refused_by_the_config(tmp_path, split):
    """As in a copy of O-LoRA's repository without its largest files: named before any model loads."""
    folder = write_olora(tmp_path, "dbpedia", AGNEWS)
    (folder / split).unlink()
    with pytest.raises(FileNotFoundError, match=rf"task_files entry .*dbpedia'?: O-LoRA's dataset file "
                                                rf".*dbpedia/{split} does not exist"):
        ContinualConfig(tasks=[], task_files=[{"path": str(folder)}], methods=["head"])


@pytest.mark.parametrize("split", ["dev.json", "test.json"])
def test_its_test_or_dev_file_is_refused_as_training_rows(tmp_path, split):
    folder = write_olora(tmp_path, "agnews", AGNEWS)
    with pytest.raises(ValueError, match=f"{split} holds O-LoRA's test rows, which are never trained or selected on"):
        ContinualConfig(tasks=[], task_files=[{"path": str(folder / split), "text_column": "sentence",
                                               "label_column": "label"}], methods=["head"])
