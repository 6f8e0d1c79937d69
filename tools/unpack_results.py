"""Turn an experiment folder that holds only ``results.json`` (how docs/results/ kept experiments before
the run files were committed beside it) into a run directory that ``curlora continual --resume``
continues: ``config.yaml``, ``base_perplexity.json`` and one ``runs/<key>.json`` per finished run,
each written exactly as the runner would have written it.

Usage: ``PYTHONPATH=src python tools/unpack_results.py docs/results/frontier``

Nothing is overwritten: a folder that already holds any of those files is refused. The run files are
checked as ``--resume`` checks them (``curlora.continual.rundir.read_run``) before anything is written.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import yaml

from curlora.continual.rundir import RunFileError, read_json, read_run
from curlora.continual.plan import RunSpec
from curlora.fileio import atomic_write_json, atomic_write_text


def unpack(folder: Path) -> int:
    """Write the run directory's files from ``folder/results.json``; the number of run files written."""
    results = read_json(folder / "results.json")
    if not isinstance(results, dict) or not isinstance(results.get("config"), dict) or not isinstance(results.get("runs"), list):
        raise RunFileError(f"{folder / 'results.json'} must hold a config and a list of runs.")
    tasks = len(results.get("tasks") or [])
    files: dict[Path, dict] = {}
    for run in results["runs"]:
        read_run_dict = {k: v for k, v in run.items() if k != "selected"}  # the report's mark, not the run's
        spec = RunSpec(read_run_dict["base_method"], read_run_dict["rank"], read_run_dict["lr"],
                       read_run_dict["u_penalty"], read_run_dict["seed"])
        path = folder / "runs" / f"{spec.key}.json"
        if path in files:
            raise RunFileError(f"{folder / 'results.json'} holds two runs with the key {spec.key}.")
        files[path] = read_run_dict
    befores = {run["perplexity"]["before"] for run in results["runs"] if run.get("status") == "ok"}
    if len(befores) != 1:
        raise RunFileError(f"{folder / 'results.json'}: the runs disagree on the base perplexity ({sorted(befores)}).")
    targets = [folder / "config.yaml", folder / "base_perplexity.json", *files]
    if any(path.exists() for path in targets):
        raise FileExistsError(f"{folder} already holds run files (config.yaml, base_perplexity.json or runs/); "
                              f"nothing was written.")
    with tempfile.TemporaryDirectory() as scratch:  # check every run the way --resume reads it first
        for path, run in files.items():
            read_run(atomic_write_json(Path(scratch) / path.name, run), tasks)
    for path, run in files.items():
        atomic_write_json(path, run)
    atomic_write_json(folder / "base_perplexity.json", {"value": befores.pop()})
    atomic_write_text(folder / "config.yaml", yaml.safe_dump(results["config"], sort_keys=False))
    return len(files)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="an experiment folder holding results.json")
    args = parser.parse_args(argv)
    try:
        count = unpack(args.folder)
    except (RunFileError, FileExistsError, KeyError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{args.folder}: config.yaml, base_perplexity.json and {count} run files written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
