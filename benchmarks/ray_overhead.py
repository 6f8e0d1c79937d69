"""What Ray adds to a sweep on one machine: the same sweep under ``--workers 2`` and ``--executor ray``.

    python benchmarks/ray_overhead.py [--lrs 3e-4,1e-3,3e-3,1e-2] [--eval-examples 150]
        [--examples-per-task N] [--workers 2] [--repeats 1] [--threads N] [--work-dir DIR] [--json PATH]
        [-- more curlora continual flags]

The default is the README's learning-rate sweep (default suite, one seed: 9 runs). Each executor runs
``python -m curlora.cli continual`` of this working tree in a child process, into a fresh output
directory, with the same flags and environment (sweep_time.py's ``timed_sweep``): ``local`` with
``--workers 2`` (two processes, one thread each on 2 cores), ``ray`` with ``--executor ray`` (a Ray
instance the command starts on this machine with every CPU it has, each run a task with one CPU and
one thread: on 2 cores the same two runs at a time). With ``--repeats N`` the two alternate, and the
one that goes first swaps every repeat (local, ray, ray, local, ...), so the machine's drift falls on
both. Recorded per sweep: wall time (the measure) and the child's CPU time (rusage, which counts only
processes waited for: under Ray a lower bound, as worker processes that outlive their raylet at the
end are not counted). Then every run's numbers
(all of results.json's run but its wall time, peak memory and thread count) are compared between the
executors' first sweeps, exactly. Writes benchmarks/results/ray_overhead.json (or --json).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sweep_time import REPO, alternate, comparison_flags, machine, medians, parse_comparison  # noqa: E402

from curlora.fileio import atomic_write_json  # noqa: E402

TIMINGS = ("wall_time_s", "peak_memory_mb", "threads")


def run_numbers(results_path: Path) -> dict[str, dict[str, Any]]:
    """Each run's numbers by method, rank, rate and seed: everything but how long it took, its peak
    memory and its threads."""
    runs = json.loads(results_path.read_text())["runs"]
    return {f"{r['method']} r={r['rank']} lr={r['lr']} seed={r['seed']}": {k: v for k, v in r.items() if k not in TIMINGS}
            for r in runs}


def unequal(local: dict[str, dict[str, Any]], ray: dict[str, dict[str, Any]]) -> list[str]:
    """Each run (and field) whose numbers differ between the executors, or that only one has."""
    lines = []
    for key in sorted(set(local) | set(ray)):
        if key not in local or key not in ray:
            lines.append(f"{key}: only under {'ray' if key in ray else 'local'}")
            continue
        lines += [f"{key}: {field}" for field in sorted(set(local[key]) | set(ray[key]))
                  if local[key].get(field) != ray[key].get(field)]
    return lines


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lrs", default="3e-4,1e-3,3e-3,1e-2")
    p.add_argument("--eval-examples", type=int, default=150)
    p.add_argument("--examples-per-task", type=int, help="shrink the sweep (default: the config's 240)")
    p.add_argument("--workers", type=int, default=2, help="the local pool's processes (default: %(default)s)")
    comparison_flags(p, "ray_overhead.json", 1, "the executors")
    args, extra = parse_comparison(p, argv)
    flags = ["--lrs", args.lrs, "--eval-examples", str(args.eval_examples), *extra]
    if args.examples_per_task is not None:
        flags += ["--examples-per-task", str(args.examples_per_task)]
    executor_flags = {"local": ["--workers", str(args.workers)], "ray": ["--executor", "ray"]}
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    with tempfile.TemporaryDirectory(prefix="ray-overhead-") as tmp:
        work = args.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        timings = alternate({e: (REPO / "src", flags + f) for e, f in executor_flags.items()},
                            work, args.repeats, args.threads)
        numbers = {e: run_numbers(Path(runs[0]["output_dir"]) / "results.json") for e, runs in timings.items()}
    wall, cpu = medians(timings)
    differences = unequal(numbers["local"], numbers["ray"])
    report = {
        "meta": {"flags": flags, "executor_flags": executor_flags, "repeats": args.repeats, "started": started,
                 **machine(args.threads)},
        "timings": timings,
        "median_wall_s": wall,
        "median_cpu_s": cpu,
        "wall_ratio": wall["ray"] / wall["local"],
        "cpu_ratio": cpu["ray"] / cpu["local"],
        "runs": len(numbers["local"]),
        "numbers_equal": not differences,
        "differences": differences,
    }
    atomic_write_json(args.json, report)
    print(f"ray / local (--workers {args.workers}): wall {report['wall_ratio']:.2f}x, cpu {report['cpu_ratio']:.2f}x "
          f"(median wall {wall['local']:.1f} s → {wall['ray']:.1f} s)")
    print(f"every run's numbers equal ({report['runs']} runs)" if not differences
          else "differences:\n  " + "\n  ".join(differences))
    print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
