"""Hostile config files, task files and run directories from a grammar (benchmarks/fuzz_inputs.py):
every case runs or ends in one line on stderr with exit status 2, and leaves the user's files as they
were. A few dozen fixed cases of each kind here (under a minute); the benchmark script runs thousands."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

_spec = importlib.util.spec_from_file_location(
    "bench_fuzz_inputs", Path(__file__).resolve().parents[1] / "benchmarks" / "fuzz_inputs.py")
fuzz = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = fuzz
_spec.loader.exec_module(fuzz)

# Derandomized: the same cases on every run, so the suite is stable; new ones come from the benchmark.
CASES = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@CASES
@given(st.data())
def test_hostile_config_files_run_or_are_refused_in_one_line(data):
    work, task_path = fuzz.fresh_work()
    try:
        fuzz.check_config_case(work, data.draw(fuzz.config_texts(task_path)))
    finally:
        shutil.rmtree(work)


@CASES
@given(fuzz.task_files())
def test_hostile_task_files_load_or_are_refused_in_one_line(case):
    work, _ = fuzz.fresh_work()
    try:
        fuzz.check_task_file_case(work, *case)
    finally:
        shutil.rmtree(work)


@CASES
@given(fuzz.run_dir_edits())
def test_hostile_run_directories_resume_or_are_refused_in_one_line(edits):
    work, _ = fuzz.fresh_work()
    try:
        fuzz.check_run_dir_case(work, edits)
    finally:
        shutil.rmtree(work)
