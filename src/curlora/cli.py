"""The ``curlora`` command line: ``curlora continual`` runs the continual-learning benchmark."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from curlora.experiment_config import PRESETS, load_config


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _strings(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _continual_parser(sub) -> None:
    p = sub.add_parser(
        "continual",
        help="run tasks in sequence through several fine-tuning methods and report learning and forgetting",
        description="The CURLoRA paper's continual-learning experiment with baselines and honest metrics. "
        "Settings come from --preset, then --config (YAML), then the flags below.",
    )
    p.add_argument("--preset", choices=sorted(PRESETS), help="default: offline suite on SmolLM2 (~15 min on 2 cores)")
    p.add_argument("--config", type=Path, help="YAML file with any ContinualConfig field")
    p.add_argument("--output-dir", type=Path, default=Path("runs/continual"), help="run directory (default: %(default)s)")
    p.add_argument("--resume", action="store_true", help="continue a killed run in --output-dir")
    p.add_argument("--data-dir", help="directory with the paper's data files (e.g. ../shared/data)")
    p.add_argument("--source", choices=["offline", "local", "hub"], help="where task data comes from")
    p.add_argument("--model", help="hub id or local directory (default: SmolLM2-135M-Instruct, offline)")
    p.add_argument("--tasks", type=_strings, help="comma-separated task names, in training order")
    p.add_argument("--corpus", help="perplexity corpus name")
    p.add_argument("--methods", type=_strings, help="curlora, curlora-standard, curlora-uniform, lora, head, full, peft:<type>")
    p.add_argument("--ranks", type=_ints)
    p.add_argument("--seeds", type=_ints)
    p.add_argument("--examples-per-task", type=int)
    p.add_argument("--eval-examples", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float, help="adapter learning rate")
    p.add_argument("--lrs", type=_floats, help="adapter learning-rate sweep, e.g. 1e-4,3e-4,1e-3")
    p.add_argument("--head-lr", type=float, help="task-head learning rate (same for every method)")
    p.add_argument("--u-penalties", type=_floats, help="λ values of the paper's Eq. 11 (loss + λ‖U‖_F)")
    p.add_argument("--alpha", type=float)
    p.add_argument("--max-length", type=int)
    p.add_argument("--ppl-max-tokens", type=int, help="score only the corpus's first N tokens (0: all)")
    p.add_argument("--bf16", action="store_true", default=None, help="bf16 autocast for training and accuracy")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None)


def _run_continual(args: argparse.Namespace) -> int:
    from curlora.continual import ContinualRunner

    overrides = {
        key: getattr(args, key)
        for key in (
            "data_dir", "source", "model", "tasks", "corpus", "methods", "ranks", "seeds", "examples_per_task",
            "eval_examples", "epochs", "batch_size", "lr", "lrs", "head_lr", "u_penalties", "alpha",
            "max_length", "ppl_max_tokens", "bf16", "device", "progress",
        )
    }
    if overrides["ppl_max_tokens"] == 0:
        overrides["ppl_max_tokens"] = None
    config = load_config(args.preset, args.config, overrides)
    results = ContinualRunner(config, args.output_dir, resume=args.resume).run()
    print((args.output_dir / "report.md").read_text())
    failed = [r for r in results["runs"] if r["status"] != "ok"]
    print(f"Wrote {args.output_dir / 'results.json'} and {args.output_dir / 'report.md'}"
          + (f"; {len(failed)} run(s) failed" if failed else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="curlora", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _continual_parser(sub)
    args = parser.parse_args(argv)
    try:
        return _run_continual(args)
    except (ValueError, FileNotFoundError, FileExistsError, OSError) as error:
        print(f"curlora: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
