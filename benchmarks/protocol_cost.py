"""What the generative protocol costs beside the heads protocol: the same runs, side by side.

    python benchmarks/protocol_cost.py [--method-lrs curlora=1e-2 --method-lrs lora=1e-3] [--repeats 2]
        [--threads N] [--work-dir DIR] [--json PATH] [-- more curlora continual flags]
    python benchmarks/protocol_cost.py --summarise benchmarks/results/protocol_cost.json  # ratios again

Each protocol runs ``python -m curlora.cli continual --protocol P`` in a child process (this working
tree, one process, no workers) with the same flags: the default offline suite and model, the
adapter methods at the given rates, nothing else. The protocols alternate, the one that goes first
swapping every repeat (heads, generative, generative, heads, ...), so that the machine's drift falls
on both; the ratio of the median wall times (and of
CPU times) is the generative protocol's cost. The floors are left out: the heads floor trains
heads, the generative ones train nothing, so they measure different work. Besides the totals,
each run's own wall time (from results.json) is compared per method. Writes
benchmarks/results/protocol_cost.json (or --json).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from statistics import median
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sweep_time import REPO, alternate, comparison_flags, machine, medians, parse_comparison  # noqa: E402

from curlora.fileio import atomic_write_json  # noqa: E402

PROTOCOLS = ("heads", "generative")


def run_times(results_path: Path) -> dict[str, float]:
    """Each run's own wall time, by its method label and rate."""
    results = json.loads(results_path.read_text())
    return {f"{r['method']} lr={r['lr']}": r["wall_time_s"] for r in results["runs"] if r["status"] == "ok"}


def summarise(timings: dict[str, list[dict[str, Any]]], meta: dict[str, Any]) -> dict[str, Any]:
    """The ratios of ``timings`` (each protocol's runs, in the order they ran): of the median wall and
    CPU times, of each repeat's pair (spread), and of each run's own median wall time."""
    wall, cpu = medians(timings)
    pairs = list(zip(timings["generative"], timings["heads"]))
    per_run = {key: median([r["runs"][key] for r in timings["generative"]])
               / median([r["runs"][key] for r in timings["heads"]]) for key in timings["heads"][0]["runs"]}
    return {
        "meta": meta,
        "timings": timings,
        "median_wall_s": wall,
        "median_cpu_s": cpu,
        "wall_ratio": wall["generative"] / wall["heads"],
        "cpu_ratio": cpu["generative"] / cpu["heads"],
        "wall_ratio_per_repeat": [g["wall_s"] / h["wall_s"] for g, h in pairs],
        "per_run_wall_ratio": per_run,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method-lrs", action="append", default=None,
                   help="METHOD=RATE as in curlora continual (default: curlora=1e-2 and lora=1e-3)")
    p.add_argument("--summarise", type=Path, metavar="JSON",
                   help="run nothing: write the ratios of the timings an earlier run stored in JSON")
    comparison_flags(p, "protocol_cost.json", 2, "the protocols")
    args, extra = parse_comparison(p, argv)
    if args.summarise:
        earlier = json.loads(args.summarise.read_text())
        report = summarise(earlier["timings"], earlier["meta"])
    else:
        rates = args.method_lrs or ["curlora=1e-2", "lora=1e-3"]
        methods = ",".join(entry.split("=", 1)[0] for entry in rates)
        flags = ["--methods", methods, *[f for entry in rates for f in ("--method-lrs", entry)], *extra]
        started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        with tempfile.TemporaryDirectory(prefix="protocol-cost-") as tmp:
            work = args.work_dir or Path(tmp)
            work.mkdir(parents=True, exist_ok=True)
            timings = alternate({p: (REPO / "src", ["--protocol", p, *flags]) for p in PROTOCOLS},
                                work, args.repeats, args.threads)
            for run in (run for runs in timings.values() for run in runs):
                run["runs"] = run_times(Path(run["output_dir"]) / "results.json")
        report = summarise(timings, {"flags": flags, "repeats": args.repeats, "started": started,
                                     **machine(args.threads)})
    atomic_write_json(args.json, report)
    wall = report["median_wall_s"]
    print(f"generative / heads: wall {report['wall_ratio']:.2f}x (per repeat "
          + ", ".join(f"{r:.2f}x" for r in report["wall_ratio_per_repeat"])
          + f"), cpu {report['cpu_ratio']:.2f}x (median wall {wall['heads']:.1f} s → {wall['generative']:.1f} s); "
          "per run: " + ", ".join(f"{k} {v:.2f}x" for k, v in report["per_run_wall_ratio"].items()))
    print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
