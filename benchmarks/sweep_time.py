"""Time the README's learning-rate sweep for two code versions, back to back, and compare numbers.

    python benchmarks/sweep_time.py [--before REF] [--after REF|worktree] [--lrs 3e-4,1e-3,3e-3,1e-2]
        [--eval-examples 150] [--examples-per-task N] [--repeats 1] [--threads N]
        [--after-flags "--workers 2"] [--work-dir DIR] [--json PATH] [-- more curlora continual flags]

"before" is a git ref (default: the main commit before the harness speedups), exported with
``git archive`` into a temporary directory (a checkout of that commit that leaves no worktree
entry behind); "after" is this working tree unless a ref is given. Each version runs
``python -m curlora.cli continual`` in a child process with PYTHONPATH at that tree's ``src``
(the same interpreter and packages), into a fresh output directory, with the same environment:
OMP_WAIT_POLICY=PASSIVE and, with --threads, OMP_NUM_THREADS/MKL_NUM_THREADS. With --repeats N
the versions alternate (before, after, before, ...). Recorded per run: wall time and the child's
CPU time (user + system, from its rusage). Then the two results.json files are compared on their
headline numbers (each run's ACC and final perplexity, the chosen learning rates); any difference
is printed. ``--after-flags`` go to the after version only (flags the old code does not know,
such as ``--workers 2``). Writes benchmarks/results/sweep_time.json (or --json).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from statistics import median
from typing import Any

from curlora.fileio import atomic_write_json

REPO = Path(__file__).resolve().parents[1]
BEFORE_SPEEDUPS = "301ae4fc005fb83e43774926b855faa9c585c76c"  # main before the harness speedups
WORKTREE = "worktree"


def export_ref(ref: str, into: Path) -> Path:
    """The tree of ``ref`` unpacked under ``into``; refused with a clear message if git does not know it."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", ref],
                             capture_output=True, check=False)
    if archive.returncode != 0:
        raise SystemExit(f"--before/--after {ref!r} is not a commit git knows here: "
                         f"{archive.stderr.decode().strip()}")
    into.mkdir(parents=True)
    tar_path = into.with_suffix(".tar")
    tar_path.write_bytes(archive.stdout)
    with tarfile.open(tar_path) as tar:
        tar.extractall(into, filter="data")
    tar_path.unlink()
    return into


def cpu_name() -> str:
    """The CPU model (timings compare only within one machine: chips differ, e.g. in bf16 speed)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def comparison_flags(p: argparse.ArgumentParser, results: str, repeats: int, what: str) -> None:
    """The flags every side-by-side benchmark takes: repeats, threads, where runs and results go."""
    p.add_argument("--repeats", type=int, default=repeats, help=f"alternate {what} this many times")
    p.add_argument("--threads", type=int, help="OMP/MKL threads for every run (default: torch's own choice)")
    p.add_argument("--work-dir", type=Path, help="keep run directories here (default: a temporary one)")
    p.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / results)


def parse_comparison(p: argparse.ArgumentParser, argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """Parsed flags and the rest (for curlora continual, after an optional ``--``); repeats checked."""
    args, extra = p.parse_known_args(argv)
    extra = extra[1:] if extra[:1] == ["--"] else extra
    if args.repeats < 1:
        p.error(f"--repeats must be at least 1, got {args.repeats}")
    return args, extra


def machine(threads: int | None) -> dict[str, Any]:
    """Where and how a timing ran: the CPU and the thread settings the children got."""
    return {"cpu": cpu_name(), "threads": {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": threads or "unset",
                                           "cpu_count": os.cpu_count()}}


def child_env(src: Path, threads: int | None) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_WAIT_POLICY": "PASSIVE"}
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def timed_sweep(src: Path, output_dir: Path, flags: list[str], threads: int | None) -> dict[str, Any]:
    """One sweep in a child process: wall seconds, the child's CPU seconds, its exit status."""
    command = [sys.executable, "-m", "curlora.cli", "continual", "--output-dir", str(output_dir),
               "--no-progress", *flags]
    log = output_dir.with_suffix(".log")
    started = time.perf_counter()
    with log.open("wb") as out:
        child = subprocess.Popen(command, env=child_env(src, threads), stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - started
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"the sweep under {src} failed (exit {code}); its output: {log}\n"
                         + log.read_text(errors="replace")[-2000:])
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "output_dir": str(output_dir)}


def alternate(variants: dict[str, tuple[Path, list[str]]], work: Path, repeats: int,
              threads: int | None) -> dict[str, list[dict[str, Any]]]:
    """Each variant's sweep (its source tree, its flags) ``repeats`` times into ``work/NAME-REPEAT``,
    the variants taking turns and the one that goes first swapping every repeat (A, B, B, A, ...), so
    that the machine's drift and warm-up fall on both."""
    timings: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    for repeat in range(repeats):
        order = list(variants) if repeat % 2 == 0 else list(reversed(variants))
        for name in order:
            src, flags = variants[name]
            run = timed_sweep(src, work / f"{name}-{repeat}", flags, threads)
            timings[name].append(run)
            print(f"{name} #{repeat}: wall {run['wall_s']:.1f} s, cpu {run['cpu_s']:.1f} s", flush=True)
    return timings


def medians(timings: dict[str, list[dict[str, Any]]]) -> tuple[dict[str, float], dict[str, float]]:
    """The median wall and CPU seconds of each variant's sweeps."""
    return ({name: median([r["wall_s"] for r in runs]) for name, runs in timings.items()},
            {name: median([r["cpu_s"] for r in runs]) for name, runs in timings.items()})


def headline(results_path: Path) -> dict[str, Any]:
    """Per run (method, rank, lr, seed): ACC (mean final-row accuracy) and final perplexity; the
    chosen learning rate per (method, rank)."""
    results = json.loads(results_path.read_text())
    runs = {}
    for run in results["runs"]:
        key = f"{run['method']} r={run['rank']} lr={run['lr']} seed={run['seed']}"
        if run["status"] != "ok":
            runs[key] = {"status": run["status"]}
            continue
        final_row = run["accuracy_matrix"][-1]
        runs[key] = {"acc": sum(final_row) / len(final_row), "ppl_final": run["perplexity"]["final"]}
    chosen = {f"{c['method']} r={c['rank']}": c["lr"] for c in results["frontier"]["selection"]}
    return {"runs": runs, "chosen_lr": chosen}


def differences(before: dict[str, Any], after: dict[str, Any], digits: int = 3) -> list[str]:
    """Every headline number that differs at ``digits`` decimals, as a readable line."""
    lines = []
    for section in ("runs", "chosen_lr"):
        for key in sorted(set(before[section]) | set(after[section])):
            a, b = before[section].get(key), after[section].get(key)
            if isinstance(a, dict) and isinstance(b, dict):
                for name in sorted(set(a) | set(b)):
                    x, y = a.get(name), b.get(name)
                    same = round(x, digits) == round(y, digits) if isinstance(x, float) and isinstance(y, float) else x == y
                    if not same:
                        lines.append(f"{key} {name}: before {x} after {y}")
            elif a != b:
                lines.append(f"{section} {key}: before {a} after {b}")
    return lines


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", default=BEFORE_SPEEDUPS, help="git ref (default: main before the speedups)")
    p.add_argument("--after", default=WORKTREE, help=f"git ref, or {WORKTREE!r} (default) for this working tree")
    p.add_argument("--lrs", default="3e-4,1e-3,3e-3,1e-2")
    p.add_argument("--eval-examples", type=int, default=150)
    p.add_argument("--examples-per-task", type=int, help="shrink the sweep (default: the config's 240)")
    p.add_argument("--after-flags", default="", help='flags for the after version only, e.g. "--workers 2"')
    comparison_flags(p, "sweep_time.json", 1, "before/after")
    args, extra = parse_comparison(p, argv)
    flags = ["--lrs", args.lrs, "--eval-examples", str(args.eval_examples)]
    if args.examples_per_task is not None:
        flags += ["--examples-per-task", str(args.examples_per_task)]
    return args, flags + extra


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args, flags = parse_args(argv)
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    with tempfile.TemporaryDirectory(prefix="sweep-time-") as tmp:
        work = args.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        trees = {"before": export_ref(args.before, Path(tmp) / "tree-before") / "src"}
        trees["after"] = (REPO / "src" if args.after == WORKTREE
                          else export_ref(args.after, Path(tmp) / "tree-after") / "src")
        timings = alternate({"before": (trees["before"], flags),
                             "after": (trees["after"], flags + shlex.split(args.after_flags))},
                            work, args.repeats, args.threads)
        numbers = {v: headline(Path(timings[v][0]["output_dir"]) / "results.json") for v in timings}
    wall, cpu = medians(timings)
    report = {
        "meta": {"before": args.before, "after": args.after, "flags": flags, "after_flags": args.after_flags,
                 "repeats": args.repeats, "started": started, **machine(args.threads)},
        "timings": timings,
        "wall_ratio": wall["before"] / wall["after"],
        "cpu_ratio": cpu["before"] / cpu["after"],
        "headline": numbers,
        "differences": differences(numbers["before"], numbers["after"]),
    }
    atomic_write_json(args.json, report)
    print(f"before/after: wall {report['wall_ratio']:.2f}x, cpu {report['cpu_ratio']:.2f}x "
          f"(median wall {wall['before']:.1f} s → {wall['after']:.1f} s)")
    print("headline numbers identical at 3 decimals" if not report["differences"]
          else "differences:\n  " + "\n  ".join(report["differences"]))
    print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
