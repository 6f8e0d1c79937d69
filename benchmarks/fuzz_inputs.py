"""Hostile inputs for ``curlora continual``, generated from a grammar (hypothesis): config YAML, task
files and run directories of wrong types, deep nesting, aliases, links, FIFOs and odd characters.

Each case must either pass every check (the command goes on to load the model, which here raises
:class:`ReachedModel` instead) or end in exactly one ``curlora: error:`` line on stderr with exit
status 2; the user's files (the config, the task file, whatever a run directory's links point at)
stay as they were. The test suite runs a few dozen cases of each (tests/test_fuzz.py); this script
runs many more with fresh random seeds and saves what it found:

    python benchmarks/fuzz_inputs.py [--examples 2000] [--json benchmarks/results/fuzz_inputs.json]

Left out of the grammar: the executor, Ray and ``workers`` settings (a valid value starts worker
processes or a Ray cluster, where loading the model is not intercepted) and ``device``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import stat  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from dataclasses import fields  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402
from unittest import mock  # noqa: E402

import yaml  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from curlora.cli import main  # noqa: E402
from curlora.continual import ContinualRunner  # noqa: E402
from curlora.continual.config import ContinualConfig  # noqa: E402
from curlora.continual.rundir import RunFileError, read_perplexity, read_run, read_task_state  # noqa: E402
from curlora.data import load_task_file  # noqa: E402
from curlora.fileio import atomic_write_json  # noqa: E402

# -- the grammar ------------------------------------------------------------------------------------------
ODD = ["$5_$10", "<img src=x onerror=alert(1)>", "a\rb", "a\nb", "x|y", "{text!a}", "{text:.0}",
       "{text:{text_pair}}", "{text:>2000000}", "{text}", "Review: {text}\nAnswer:", "{text} {text_pair}",
       "../x", "/etc/passwd", "peft:lora", "peft-lora", "sst2", "rotten_tomatoes", "<|im_end|>", "", " ",
       "1e-3", "nan", "heads", "generative", "lora", "head", "curlora", "zero-shot", "k-shot", "pos", "neg",
       "text", "label", "*a", "&a", "\x00", "é", "🙂"]
STRINGS = st.one_of(st.sampled_from(ODD), st.text(max_size=12))
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(10 ** 12), 10 ** 12),
                    st.floats(allow_nan=True, allow_infinity=True), STRINGS)
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(STRINGS, inner, max_size=3)),
                      max_leaves=12)
UNSAFE_FIELDS = {"executor", "ray_address", "ray_num_cpus", "ray_num_gpus", "ray_max_retries", "workers", "device"}
FIELDS = sorted(f.name for f in fields(ContinualConfig) if f.name not in UNSAFE_FIELDS)
TASK_KEYS = ["text_column", "label_column", "text_pair_column", "label_names", "eval_fraction", "name",
             "template", "label_words", "eval_path", "seed", "bogus"]


@st.composite
def _nested_text(draw: Any) -> str:
    """YAML nested past any bound, an alias bomb, or an alias that contains itself."""
    kind = draw(st.sampled_from(["deep", "bomb", "self"]))
    if kind == "deep":
        depth = draw(st.integers(10, 3000))
        return "[" * depth + "]" * depth
    if kind == "self":
        return "&s [1, *s]"
    levels = draw(st.integers(1, 9))
    anchors = "{a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]" + "".join(
        f", a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels)) + "}"
    return anchors


@st.composite
def task_entries(draw: Any, task_path: str) -> dict[str, Any]:
    """A task_files entry: the real file's path and columns (mostly), hostile values for the rest."""
    entry = {"path": draw(st.sampled_from([task_path, task_path, 5, "/no/such.csv"])),
             "text_column": "text", "label_column": "label"}
    for key in draw(st.lists(st.sampled_from(TASK_KEYS), max_size=3, unique=True)):
        entry[key] = draw(st.one_of(VALUES, st.sampled_from(ODD)))
    return entry


@st.composite
def config_texts(draw: Any, task_path: str) -> str:
    """A config file: a mapping of (mostly real) fields to hostile values, sometimes with nesting or
    aliases written into it as text, sometimes plain garbage."""
    settings: dict[str, Any] = {"methods": draw(st.sampled_from([["head"], ["zero-shot"], ["lora"]]))}
    for name in draw(st.lists(st.sampled_from([*FIELDS, "bogus"]), max_size=4, unique=True)):
        settings[name] = draw(VALUES)
    if draw(st.booleans()):
        settings["tasks"], settings["task_files"] = [], [draw(task_entries(task_path))]
        if draw(st.booleans()):
            settings["protocol"] = "generative"
    text = yaml.safe_dump(settings, allow_unicode=True)
    shape = draw(st.sampled_from(["plain", "plain", "nested", "garbage"]))
    if shape == "nested":
        field = draw(st.sampled_from(["method_variants", "peft_kwargs", "tasks", "ranks", "bogus"]))
        text += f"{field}: {draw(_nested_text())}\n"
    elif shape == "garbage":
        text = draw(st.text(max_size=80))
    return text


TABLE_CELLS = st.one_of(st.sampled_from(ODD), st.text(max_size=10))


@st.composite
def task_files(draw: Any) -> tuple[str, bytes]:
    """A task file's suffix and bytes: CSV or JSONL rows of odd text and labels, ragged rows, rows
    nested deep, bytes that are not UTF-8."""
    suffix = draw(st.sampled_from([".csv", ".jsonl", ".tsv"]))
    rows = draw(st.lists(st.tuples(TABLE_CELLS, st.sampled_from(["pos", "neg", "neu", "", "$", "<b>"])),
                         min_size=0, max_size=30))
    if suffix == ".jsonl":
        lines = [json.dumps({"text": t, "label": label}) for t, label in rows]
        if draw(st.booleans()):
            depth = draw(st.integers(1, 200_000))
            lines.insert(draw(st.integers(0, len(lines))), "[" * depth + "]" * depth)
        data = "\n".join(lines).encode()
    else:
        sep = "," if suffix == ".csv" else "\t"
        data = ("text" + sep + "label\n" + "".join(f"{t}{sep}{label}\n" for t, label in rows)).encode()
    if draw(st.integers(0, 9)) == 0:
        data += draw(st.binary(max_size=20))
    return suffix, data


RUN_PATHS = ["config.yaml", "base_perplexity.json", "results.json", ".lock", "runs", "runs/head_s0.json",
             "checkpoints", "checkpoints/head_s0", "checkpoints/head_s0/task1.json",
             "checkpoints/head_s0/task1.safetensors", "checkpoints/head_s0/taskX.json",
             "checkpoints/head_s0/task2.json"]


@st.composite
def run_dir_edits(draw: Any) -> list[tuple[str, str, Any]]:
    """Edits of a run directory: (what, relative path, payload): a file of hostile JSON or YAML, a link
    to the outside (file or directory), a FIFO, a directory."""
    edits = []
    for _ in range(draw(st.integers(1, 4))):
        what = draw(st.sampled_from(["json", "yaml", "link", "fifo", "dir"]))
        payload: Any = None
        if what == "json":
            payload = draw(st.one_of(VALUES.map(lambda v: json.dumps(v, allow_nan=True)),
                                     st.integers(1, 100_000).map(lambda d: "[" * d + "]" * d),
                                     st.just('{"value": NaN}'), st.text(max_size=20)))
        elif what == "yaml":
            payload = draw(st.one_of(VALUES.map(lambda v: yaml.safe_dump({"peft_kwargs": v})),
                                     _nested_text().map(lambda t: f"methods: {t}\n"),
                                     st.text(max_size=40)))
        elif what == "link":
            payload = draw(st.sampled_from(["dir", "file"]))
        edits.append((what, draw(st.sampled_from(RUN_PATHS)), payload))
    return edits


# -- running one case --------------------------------------------------------------------------------------
class ReachedModel(Exception):
    """Every check before the model passed: the command went on to load it (intercepted here)."""


def _refuse_model(*args: Any, **kwargs: Any) -> None:
    raise ReachedModel


@contextlib.contextmanager
def no_model() -> Iterator[None]:
    """Loading the model raises ReachedModel (not caught by the CLI): a case that gets this far ran."""
    with mock.patch("curlora.continual.prepare.load_model_and_tokenizer", _refuse_model), \
            mock.patch("curlora.pretrained.load_model_and_tokenizer", _refuse_model):
        yield


def run_cli(argv: list[str]) -> tuple[int | str, str]:
    """The CLI's exit status (or "model" if it reached the model) and what it wrote on stderr."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            code: int | str = main(argv)
        except ReachedModel:
            code = "model"
    return code, err.getvalue()


def check_outcome(code: int | str, err: str) -> None:
    """Ran, or refused in one line with exit status 2."""
    if code == "model":
        return
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("curlora: error: "), (code, err)


def snapshot(root: Path) -> dict[str, bytes | str]:
    """Every entry under ``root`` (links not followed, FIFOs not opened): regular files by content."""
    found: dict[str, bytes | str] = {}
    for path in sorted(root.rglob("*")):
        mode = path.lstat().st_mode
        found[str(path.relative_to(root))] = path.read_bytes() if stat.S_ISREG(mode) else stat.filemode(mode)
    return found


def check_config_case(work: Path, text: str) -> int | str:
    """A config file through ``curlora continual``: ran or refused in one line, before any run
    directory exists; the config and the task file unchanged."""
    config = work / "run.yaml"
    config.write_text(text, encoding="utf-8", errors="surrogatepass")
    before = snapshot(work)
    run_dir = work / "run"
    with no_model():
        code, err = run_cli(["continual", "--config", str(config), "--output-dir", str(run_dir)])
    check_outcome(code, err)
    assert snapshot(work) == before, "the command changed the user's files"
    return code


def check_task_file_case(work: Path, suffix: str, data: bytes) -> str:
    """A task file through load_task_file: loaded, or a one-line ValueError naming the file."""
    path = work / f"mine{suffix}"
    path.write_bytes(data)
    try:
        load_task_file(path, "text", "label", max_train=16, max_eval=8)
    except ValueError as error:
        assert "\n" not in str(error).strip() and path.name in str(error), str(error)
        return "refused"
    finally:
        assert path.read_bytes() == data
    return "loaded"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


def check_run_dir_case(work: Path, edits: list[tuple[str, str, Any]]) -> int | str:
    """A run directory edited as someone else might, resumed: ran or refused in one line; nothing
    outside it changed; its files read back as results or refused as a RunFileError."""
    run_dir, outside = work / "run", work / "outside"
    outside.mkdir()
    (outside / "precious.json").write_text('{"value": 17.0}')
    (outside / "task1.safetensors").write_bytes(b"someone's tensors")
    config = ContinualConfig(methods=["head"])
    runner = ContinualRunner(config, run_dir)
    runner.run_dir.create(config)
    runner.run_dir.unlock()
    for what, relative, payload in edits:
        path = run_dir / relative
        if any(parent.is_symlink() for parent in path.parents):  # an earlier edit linked it away: not here
            continue
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError:  # an earlier edit made a parent a file or a FIFO
            continue
        _remove(path)
        if what in ("json", "yaml"):
            path.write_text(payload, encoding="utf-8", errors="surrogatepass")
        elif what == "link":
            path.symlink_to(outside if payload == "dir" else outside / "precious.json")
        elif what == "fifo":
            os.mkfifo(path)
        else:
            path.mkdir()
    before = snapshot(outside)
    with no_model():
        code, err = run_cli(["continual", "--methods", "head", "--output-dir", str(run_dir), "--resume"])
    check_outcome(code, err)
    assert snapshot(outside) == before, "the command changed files outside the run directory"
    if code == "model":  # past every check before the model: what it reads later is checked too
        readers = {"runs/head_s0.json": lambda p: read_run(p, 3), "base_perplexity.json": read_perplexity,
                   "checkpoints/head_s0/task1.json": lambda p: read_task_state(p, 1)}
        for relative, read in readers.items():
            if (run_dir / relative).is_file():
                try:
                    read(run_dir / relative)
                except RunFileError as error:
                    assert "\n" not in str(error).strip() and relative.split("/")[-1] in str(error)
    return code


def fresh_work() -> tuple[Path, str]:
    """A scratch directory with a good task file in it (its path for configs to name)."""
    work = Path(tempfile.mkdtemp(prefix="curlora-fuzz-"))
    task = work / "reviews.csv"
    task.write_text("text,label\n" + "".join(f"review {i} {'good' if i % 2 else 'bad'},{'pos' if i % 2 else 'neg'}\n"
                                             for i in range(40)))
    return work, str(task)


# -- the long run ---------------------------------------------------------------------------------------------
def _long_run(examples: int) -> dict[str, Any]:
    from hypothesis import HealthCheck, given, settings

    outcomes: dict[str, dict[str, int]] = {"config": {}, "task_file": {}, "run_dir": {}}

    def count(kind: str, outcome: int | str) -> None:
        outcomes[kind][str(outcome)] = outcomes[kind].get(str(outcome), 0) + 1

    fuzz = settings(max_examples=examples, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck))
    _, task_path = fresh_work()

    @fuzz
    @given(st.data())
    def configs(data: Any) -> None:
        work, _ = fresh_work()
        try:
            count("config", check_config_case(work, data.draw(config_texts(task_path))))
        finally:
            shutil.rmtree(work)

    @fuzz
    @given(task_files())
    def tasks(case: tuple[str, bytes]) -> None:
        work, _ = fresh_work()
        try:
            count("task_file", check_task_file_case(work, *case))
        finally:
            shutil.rmtree(work)

    @fuzz
    @given(run_dir_edits())
    def run_dirs(edits: list[tuple[str, str, Any]]) -> None:
        work, _ = fresh_work()
        try:
            count("run_dir", check_run_dir_case(work, edits))
        finally:
            shutil.rmtree(work)

    started = time.perf_counter()
    for test in (configs, tasks, run_dirs):
        test()
    return {"examples_per_kind": examples, "outcomes": outcomes, "failures": 0,
            "wall_s": round(time.perf_counter() - started, 1)}


def main_(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=2000, help="cases of each kind (config, task file, run dir)")
    parser.add_argument("--json", type=Path, help="save the outcome counts here")
    args = parser.parse_args(argv)
    result = _long_run(args.examples)  # a failing case raises, with hypothesis' shrunk example
    print(json.dumps(result, indent=2))
    if args.json:
        atomic_write_json(args.json, {"date": time.strftime("%Y-%m-%d"), **result})


if __name__ == "__main__":
    main_()
