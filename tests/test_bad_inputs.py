"""A new user's bad inputs through the real CLI: each is refused with exit status 2 and one line on
stderr naming what is wrong, before any work where the model is not needed, and no run directory
is left behind (an existing one stays byte-identical)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import save_tiny_llama

from curlora.cli import main


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, smol_tokenizer):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), smol_tokenizer)


@pytest.fixture
def no_model(monkeypatch):
    """Config-level errors must be refused before the model loads: loading it fails the test."""
    def refuse_to_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad setting was refused")

    import curlora.continual.prepare
    import curlora.pretrained

    monkeypatch.setattr(curlora.continual.prepare, "load_model_and_tokenizer", refuse_to_load)
    monkeypatch.setattr(curlora.pretrained, "load_model_and_tokenizer", refuse_to_load)


def refused(argv: list[str], capsys) -> str:
    """Run the CLI; it must exit 2 with one ``curlora: error:`` line as stderr's last and only message
    (transformers' weight-loading progress bar may precede it); returns that line."""
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    messages = [line for line in err.replace("\r", "\n").splitlines() if not line.startswith("Loading weights")]
    assert len(messages) == 1 and messages[0].startswith("curlora: error: "), err
    return messages[0]


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def write_rows(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def distinct_rows(n: int = 40) -> list[str]:
    return ["text,label"] + [f"review number {i} {'good' if i % 2 else 'bad'},{'pos' if i % 2 else 'neg'}"
                             for i in range(n)]


def task_yaml(tmp_path: Path, task_file: Path, **extra: object) -> Path:
    settings = {"tasks": [], "task_files": [{"path": str(task_file), "text_column": "text", "label_column": "label"}],
                **extra}
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps(settings))  # JSON is YAML
    return path


# -- settings: refused before the model loads ---------------------------------------------------
CONFIG_CASES = [
    (["--lr", "-1", "--methods", "head"], "lr must be a finite number > 0"),
    (["--ranks", "0", "--methods", "curlora"], "ranks"),
    (["--workers", "0"], "workers"),
    (["--lrs", "1e-3,-1e-3"], "lrs"),
    (["--head-lr", "0"], "head_lr"),
    (["--alpha", "nan"], "alpha"),
    (["--batch-size", "0"], "batch_size"),
    (["--epochs", "0"], "epochs"),
    (["--device", "tpu"], "Unknown device 'tpu'"),
    (["--model", "/nonexistent"], "model path /nonexistent does not exist"),
    (["--model", "./missing-model.gguf"], "does not exist"),
    (["--ppl-window", "64", "--ppl-stride", "64"], "ppl_window (64) must be larger than ppl_stride (64)"),
    (["--corpus", "shakespeare"], "Unknown corpus 'shakespeare'"),
    (["--corpus-file", "/nonexistent/style-guide.txt"], "corpus_file /nonexistent/style-guide.txt does not exist"),
    (["--tasks", "imdb"], "Unknown task 'imdb'"),
    (["--data-dir", "/nonexistent-data"], "data_dir /nonexistent-data"),
    (["--u-penalties", "-0.5"], "u_penalties"),
    (["--method-lrs", "dora=1e-2"], "method_lrs names 'dora', which is not one of this run's methods"),
    (["--method-lrs", "head=1e-2"], "method_lrs names 'head'"),
    (["--method-lrs", "lora=1e-2,0"], "every value of method_lrs['lora']"),
    (["--ranks", "8,16", "--method-lrs", "lora@8=1e-2"],
     "method_lrs['lora'] gives rates per rank for ranks [8], but this run's ranks are [8, 16]"),
    (["--method-lrs", "lora@16=1e-2", "--method-lrs", "lora=3e-3"], "both one grid for all ranks"),
    (["--method-lrs", "lora@16=-1e-2"], "every value of method_lrs['lora'][16]"),
]


@pytest.mark.parametrize(("flags", "message"), CONFIG_CASES, ids=[" ".join(c[0]) for c in CONFIG_CASES])
def test_continual_flags_are_refused_before_any_work(flags, message, tmp_path, capsys, no_model):
    run_dir = tmp_path / "run"
    assert message in refused(["continual", *flags, "--output-dir", str(run_dir)], capsys)
    assert not run_dir.exists()


def test_a_malformed_method_rate_grid_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["continual", "--method-lrs", "curlora:1e-2"])
    assert exit_.value.code == 2
    assert "argument --method-lrs: expected METHOD=RATE,RATE,... or METHOD@RANK=RATE,..." in capsys.readouterr().err


YAML_CASES = [
    ({"seeds": [0.5]}, "seeds must be an integer"),
    ({"ranks": 8}, "'ranks' must be a list, e.g. [8]"),
    ({"validation_fraction": 1.5}, "validation_fraction must be in (0, 1)"),
    ({"lr": "1e-3"}, "YAML needs a dot"),
    ({"max_warmup_fraction": -0.1}, "max_warmup_fraction"),
    ({"task_files": [{"path": "/nonexistent/tasks.csv", "text_column": "t", "label_column": "l"}]},
     "task file /nonexistent/tasks.csv does not exist"),
]


@pytest.mark.parametrize(("settings", "message"), YAML_CASES, ids=[next(iter(c[0])) for c in YAML_CASES])
def test_continual_yaml_settings_are_refused_before_any_work(settings, message, tmp_path, capsys, no_model):
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps(settings))
    run_dir = tmp_path / "run"
    assert message in refused(["continual", "--config", str(config), "--output-dir", str(run_dir)], capsys)
    assert not run_dir.exists()


# A YAML file's mistakes are named by file and line (PyYAML alone names "<unicode string>").
YAML_FILE_CASES = {
    "unclosed-list": ("lr: 0.01\nranks: [8, 16\nseeds: [0]\n",
                      "line 3, column 6: not valid YAML (expected ',' or ']', but got ':', while parsing a flow "
                      "sequence started at line 2, column 8)"),
    "tab-indent": ("lr: 0.01\n\tseeds: [0]\n", "line 2, column 1: not valid YAML (found character '\\t'"),
    "bad-value": ("lr: 0.01\n# fractions are not seeds\nseeds: [0.5]\n",
                  "line 3: every value of seeds must be an integer, got 0.5"),
    "run-set-task-key": ("methods: [head]\ntask_files:\n  - {path: TASK, text_column: text, label_column: label, seed: 1}\n",
                         "line 2: task_files entry 'TASK' has key 'seed', which it cannot take: the run sets it "
                         "for every task from data_seed"),
}


@pytest.mark.parametrize("case", sorted(YAML_FILE_CASES))
def test_config_file_mistakes_name_the_file_and_line(case, tmp_path, capsys, no_model):
    text, message = YAML_FILE_CASES[case]
    task = write_rows(tmp_path / "task.csv", distinct_rows())
    config = tmp_path / "run.yaml"
    config.write_text(text.replace("TASK", str(task)))
    run_dir = tmp_path / "run"
    error = refused(["continual", "--config", str(config), "--output-dir", str(run_dir)], capsys)
    assert f"{config}, {message.replace('TASK', str(task))}" in error
    assert not run_dir.exists()


def test_a_flag_that_replaces_a_file_setting_is_not_blamed_on_the_file(tmp_path, capsys, no_model):
    config = tmp_path / "run.yaml"
    config.write_text("methods: [head]\nlr: 0.01\n")
    error = refused(["continual", "--config", str(config), "--lr", "-1", "--output-dir", str(tmp_path / "run")], capsys)
    assert "lr must be a finite number > 0" in error and str(config) not in error


# -- data files: named with line (and column), refused before the run directory exists ---------
def _binary(path: Path) -> Path:
    path.write_bytes(b"text,label\nfine words,pos\nbad \x80\x81 bytes,neg\n")
    return path


DATA_CASES = {
    "binary": (_binary, "line 3, column 5: not UTF-8"),
    "ragged": (lambda p: write_rows(p, distinct_rows()[:5] + ["one, two, three,pos"] + distinct_rows()[5:]),
               "line 6: 4 comma-separated fields, but the header has 2"),
    "empty": (lambda p: write_rows(p, []), "file is empty"),
    "header-only": (lambda p: write_rows(p, ["text,label"]), "only a header line (text, label), no data rows"),
    "duplicate-only": (lambda p: write_rows(p, ["text,label"] + ["great film,pos", "dull film,neg"] * 20),
                       "40 rows, 38 of them repeating an earlier text; 2 distinct texts remain"),
    # The 41 rows: two texts repeated twenty times and one ragged row; the ragged row is named.
    "issue-41-rows": (lambda p: write_rows(p, ["text,label"] + ["great film,pos", "dull film,neg"] * 20
                                            + ["great, dull film,pos"]), "line 42: 3 comma-separated fields"),
}


@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_bad_task_files_are_named_and_leave_no_run_directory(case, tmp_path, capsys, tiny_model_dir):
    make, message = DATA_CASES[case]
    task_file = make(tmp_path / f"{case}.csv")
    config = task_yaml(tmp_path, task_file, model=tiny_model_dir)
    run_dir = tmp_path / "run"
    error = refused(["continual", "--config", str(config), "--output-dir", str(run_dir)], capsys)
    assert str(task_file) in error and message in error
    assert not run_dir.exists()


@pytest.mark.parametrize(("content", "message"), [
    (b"Style guide.\n\nUse short \xff sentences.\n", "line 3, column 11: not UTF-8"),
    (b" \n\n", "is empty"),
])
def test_bad_corpus_files_are_named(content, message, tmp_path, capsys, tiny_model_dir):
    corpus = tmp_path / "style.txt"
    corpus.write_bytes(content)
    config = task_yaml(tmp_path, write_rows(tmp_path / "task.csv", distinct_rows()), model=tiny_model_dir)
    run_dir = tmp_path / "run"
    error = refused(["continual", "--config", str(config), "--corpus-file", str(corpus),
                     "--output-dir", str(run_dir)], capsys)
    assert str(corpus) in error and message in error
    assert not run_dir.exists()


def test_a_rank_larger_than_the_layers_is_refused_before_the_data(tmp_path, capsys, tiny_model_dir):
    # The tiny Llama's k/v projections are 32 → 16: r = 17 cannot fit; the task file is never read.
    config = task_yaml(tmp_path, _binary(tmp_path / "never-read.csv"), model=tiny_model_dir)
    run_dir = tmp_path / "run"
    error = refused(["continual", "--config", str(config), "--ranks", "4,17", "--methods", "lora",
                     "--output-dir", str(run_dir)], capsys)
    assert "ranks" in error and "k_proj' (16 × 32); choose r ≤ 16" in error  # the narrowest layer named
    assert not run_dir.exists()
    # curlora-wide adapts at 4 × the rank: ranks 5 means r = 20, which does not fit either.
    error = refused(["continual", "--config", str(config), "--ranks", "5", "--methods", "curlora,curlora-wide",
                     "--output-dir", str(run_dir)], capsys)
    assert "'curlora-wide' adapts at 4 × each of ranks" in error and "choose r ≤ 16" in error
    assert not run_dir.exists()


# -- an existing run directory is never modified by a refused command -------------------------
def test_a_refused_command_leaves_an_existing_run_directory_byte_identical(tmp_path, capsys, tiny_model_dir):
    task_file = write_rows(tmp_path / "task.csv", distinct_rows())
    config = task_yaml(tmp_path, task_file, model=tiny_model_dir, methods=["head"], examples_per_task=16,
                       eval_examples=8, max_length=16, ppl_max_tokens=48, ppl_window=32, ppl_stride=16,
                       progress=False)
    run_dir = tmp_path / "run"
    assert main(["continual", "--config", str(config), "--output-dir", str(run_dir)]) == 0
    capsys.readouterr()
    before = snapshot(run_dir)
    base = ["continual", "--config", str(config), "--output-dir", str(run_dir)]
    assert "--resume" in refused(base, capsys)  # no --resume
    assert "differs in epochs (1 there, 2 here)" in refused([*base, "--resume", "--epochs", "2"], capsys)
    assert "lr" in refused([*base, "--resume", "--lr", "-1"], capsys)
    _binary(task_file)  # same settings, but the data went bad: refused after the model loads
    assert "not UTF-8" in refused([*base, "--resume"], capsys)
    assert snapshot(run_dir) == before


def test_an_output_dir_that_is_a_file_is_refused(tmp_path, capsys, no_model, monkeypatch):
    target = tmp_path / "results.txt"
    target.write_text("mine")
    assert "is a file" in refused(["continual", "--methods", "head", "--output-dir", str(target)], capsys)
    assert target.read_text() == "mine"


# -- curlora sft and generate ------------------------------------------------------------------
def test_sft_settings_and_files_are_refused_before_the_model_loads(tmp_path, capsys, no_model):
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"prompt": "Hi?", "response": "Hello."}) + "\n")
    out = tmp_path / "adapter"
    base = ["sft", "--output-dir", str(out)]
    assert "--lr must be a finite number > 0" in refused([*base, "--data", str(data), "--lr", "-1"], capsys)
    assert "--r must be at least 1" in refused([*base, "--data", str(data), "--r", "0"], capsys)
    assert "--eval-fraction" in refused([*base, "--data", str(data), "--eval-fraction", "1"], capsys)
    assert "model path /nonexistent does not exist" in refused(
        [*base, "--data", str(data), "--model", "/nonexistent"], capsys)
    missing = tmp_path / "missing.jsonl"
    assert f"--data file {missing} does not exist" in refused([*base, "--data", str(missing)], capsys)
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b'{"prompt": "Hi?", "response": "Hello."}\n{"prompt": "\xc3\x28"}\n')
    assert f"{binary}, line 2, column 13: not UTF-8" in refused([*base, "--data", str(binary)], capsys)
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"prompt": "Hi?", "response": "Hello."}\n{"prompt": "Hi?",\n')
    assert f"{bad_json}, line 2, column 18: not valid JSON" in refused([*base, "--data", str(bad_json)], capsys)
    no_fields = tmp_path / "fields.csv"
    write_rows(no_fields, ["question,answer", "Hi?,Hello."])
    assert f"{no_fields}, line 2: neither" in refused([*base, "--data", str(no_fields)], capsys)
    assert not out.exists()


def test_generate_refuses_before_the_model_loads(tmp_path, capsys, no_model):
    assert "adapter_config.json" in refused(["generate", "--adapter", str(tmp_path), "--prompt", "Hi"], capsys)
    assert "--max-new-tokens must be at least 1" in refused(
        ["generate", "--adapter", str(tmp_path), "--prompt", "Hi", "--max-new-tokens", "0"], capsys)


def test_the_real_command_prints_one_line(tmp_path):
    """As a user sees it: a fresh process (imports and all) prints exactly the one error line."""
    import os
    import subprocess
    import sys

    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "curlora.cli", "continual", "--lr", "-1", "--methods", "head",
         "--output-dir", str(run_dir)],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["curlora: error: lr must be a finite number > 0, got -1.0."]
    assert not run_dir.exists()
