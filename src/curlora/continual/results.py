"""A command's results: collected into one mapping (results.json's content), then written with the
report beside it. Collecting writes nothing, so a program can take the mapping and keep its own files."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from curlora.continual.config import ContinualConfig
from curlora.continual.frontier import analyse
from curlora.continual.metrics import SCHEMA_VERSION, summarize
from curlora.continual.report import write_report
from curlora.fileio import atomic_write_json


def collect_results(config: ContinualConfig, described: Mapping[str, Any],
                    runs: list[dict[str, Any]]) -> dict[str, Any]:
    """results.json's content: the config, what the base model described (model, protocol, tasks,
    corpus), every run, the learning-rate frontier and the summary."""
    results = {
        "schema_version": SCHEMA_VERSION,
        "config": config.to_dict(),
        **described,
        "runs": runs,
        "frontier": analyse(runs, config.seeds),
    }
    results["summary"] = summarize(results)
    return results


def write_results(results: dict[str, Any], run_dir: Path) -> None:
    """``results.json`` and the report (``report.md`` and its plots) in ``run_dir``."""
    atomic_write_json(run_dir / "results.json", results)
    write_report(results, run_dir)
