"""The ``curlora`` command line: ``curlora continual`` runs the continual-learning benchmark,
``curlora sft`` trains an adapter on prompt/response data, ``curlora generate`` answers with one."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from curlora.extras import needed_extras, require_extra
from curlora.quantization import SCHEMES


def _numbers(kind: type, text: str) -> list:
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, got {text!r}") from None


def _floats(text: str) -> list[float]:
    return _numbers(float, text)


def _ints(text: str) -> list[int]:
    return _numbers(int, text)


def _strings(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _orders(entries: list[list[str]]) -> list[Any]:
    """The ``orders`` override from repeated --orders flags: each a permutation of the task names
    (b,a,c), or each one name of an order the preset or config defines (load_config picks those)."""
    names = [entry for entry in entries if len(entry) == 1]
    if names and len(names) < len(entries):
        raise ValueError("--orders mixes names of the preset's orders with task lists; give one form.")
    return [name for (name,) in names] if names else entries


def _method_rates(text: str) -> tuple[str, int | None, list[float]]:
    """``curlora=1e-3,1e-2`` -> ("curlora", None, [0.001, 0.01]); ``curlora@8=1e-2`` -> ("curlora", 8, [0.01])."""
    name, sep, rates = text.partition("=")
    method, at, rank = name.strip().partition("@")
    if not sep or not method or (at and not rank.strip().isdigit()):
        raise argparse.ArgumentTypeError(f"expected METHOD=RATE,RATE,... or METHOD@RANK=RATE,... (e.g. "
                                         f"curlora=1e-3,1e-2 or curlora@8=1e-2), got {text!r}")
    return method, int(rank) if at else None, _floats(rates)


def _method_rate_grid(entries: list[tuple[str, int | None, list[float]]]) -> dict[str, Any]:
    """The ``method_lrs`` config field from repeated --method-lrs flags."""
    grid: dict[str, Any] = {}
    for method, rank, rates in entries:
        if method in grid and isinstance(grid[method], dict) != (rank is not None):
            raise ValueError(f"--method-lrs gives {method!r} both one grid for all ranks ({method}=...) and "
                             f"grids per rank ({method}@RANK=...); use one form.")
        if rank is None:
            grid[method] = rates
        else:
            grid.setdefault(method, {})[rank] = rates
    return grid


def _continual_parser(sub) -> None:
    from curlora.continual.config import PRESETS
    from curlora.continual.methods import describe
    from curlora.continual.protocols import PROTOCOLS

    p = sub.add_parser(
        "continual",
        help="run tasks in sequence through several fine-tuning methods and report learning and forgetting",
        description="The CURLoRA paper's continual-learning experiment with baselines and honest metrics. "
        "Settings come from --preset, then --config (YAML), then the flags below.",
    )
    p.add_argument("--preset", choices=sorted(PRESETS), help="quick-verdict: what `make run` runs (each method at its chosen rate, about 14 min on 2 "
                   "CPU cores); paper, paper-small: the paper's setup; olora-standard, olora-long: O-LoRA's "
                   "benchmarks; default: the library's defaults (also without --preset)")
    p.add_argument("--config", type=Path, help="YAML file with any ContinualConfig field")
    p.add_argument("--output-dir", type=Path, default=Path("runs/continual"), help="run directory (default: %(default)s)")
    p.add_argument("--resume", action="store_true",
                   help="continue a killed run in --output-dir, or extend it with other --seeds, --lrs, "
                        "--methods or --ranks (finished runs are kept)")
    p.add_argument("--report-only", action="store_true",
                   help="write results.json and report.md of the runs finished in --output-dir so far, training none "
                        "(an interim report of a long experiment, marked as such; the same settings as its command)")
    p.add_argument("--reuse-runs-from", type=Path, metavar="DIR",
                   help="take the finished runs of another experiment's run directory made with the same settings "
                        "(its config may differ only in which runs there are) as this one's, e.g. an earlier "
                        "sweep's seed 0; refused, naming the settings, where they differ")
    p.add_argument("--data-dir", help="directory with the paper's data files (e.g. ../shared/data)")
    p.add_argument("--source", choices=["offline", "local", "hub"], help="where task data comes from")
    p.add_argument("--model", help="smollm2 (default, offline), gemma3-270m (fetched at first use, Gemma terms), a .gguf file, a local directory or a hub id")
    p.add_argument("--protocol", choices=sorted(PROTOCOLS),
                   help="heads: a fresh classification head per task (the paper's, the default); generative: "
                        "prompt -> answer text, loss on the answer only, no heads (floors: zero-shot, k-shot)")
    p.add_argument("--chat-template", action=argparse.BooleanOptionalAction, default=None,
                   help="generative: prompts as chat turns (default: when the tokenizer has a chat template)")
    p.add_argument("--k-shot", type=int, help="generative: training rows of each label shown in the k-shot floor's prompts (default 4)")
    p.add_argument("--generation-examples", type=int,
                   help="generative: evaluation rows per task checked for a valid greedy answer (default 32)")
    p.add_argument("--tasks", type=_strings, help="comma-separated task names, in training order")
    p.add_argument("--corpus", help="perplexity corpus name (wiki_summaries, wikitext2)")
    p.add_argument("--corpus-file", help="your own plain UTF-8 text file as the perplexity corpus (replaces --corpus)")
    p.add_argument("--methods", type=_strings, help="comma-separated: " + describe() + "; peft:<type> (any PEFT method); or a variant declared under method_variants in --config")
    p.add_argument("--ranks", type=_ints)
    p.add_argument("--seeds", type=_ints)
    p.add_argument("--confirm-seeds", type=_ints,
                   help="more seeds, run once the --seeds runs finished, at the rate each method × rank chose "
                        "on their validation accuracy, e.g. --seeds 0 --confirm-seeds 1,2")
    p.add_argument("--orders", type=_strings, action="append",
                   help="task orders, an axis like --seeds: repeat per order, each the task names in the order "
                        "learned (--orders b,a,c --orders c,b,a), or the name of an order the preset or --config "
                        "defines (--orders 2 --orders 3); every run repeats in every order")
    p.add_argument("--examples-per-task", type=int)
    p.add_argument("--eval-examples", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float, help="adapter learning rate")
    p.add_argument("--lrs", type=_floats, help="adapter learning-rate sweep, e.g. 1e-4,3e-4,1e-3")
    p.add_argument("--method-lrs", type=_method_rates, action="append",
                   help="one method's own rates instead of --lrs, e.g. curlora=1e-3,1e-2,3e-2 (repeat per method), "
                        "or per rank: curlora@8=1e-2 --method-lrs curlora@16=3e-3 (every rank of the run)")
    p.add_argument("--head-lr", type=float, help="task-head learning rate (same for every method)")
    p.add_argument("--u-penalties", type=_floats, help="λ values of the paper's Eq. 11 (loss + λ‖U‖_F)")
    p.add_argument("--ewc-lambda", type=float, help="X+ewc methods: EWC strength λ (default 1)")
    p.add_argument("--olora-lambda", type=float, help="o-lora: weight of the orthogonality loss (default 0.5)")
    p.add_argument("--replay-per-task", type=int, help="X+replay methods: training rows kept per task (default 20)")
    p.add_argument("--ewc-fisher-examples", type=int, help="X+ewc methods: training rows per task for the Fisher (default 64)")
    p.add_argument("--corda-samples", type=int,
                   help="lora-corda-kpm: calibration windows from the 2012 US convention speeches (default 64)")
    p.add_argument("--corda-sample-tokens", type=int, help="lora-corda-kpm: tokens per calibration window (default 256)")
    p.add_argument("--alpha", type=float)
    p.add_argument("--max-length", type=int)
    p.add_argument("--ppl-max-tokens", type=int, help="score only the corpus's first N tokens (0: all)")
    p.add_argument("--ppl-window", type=int, help="tokens per perplexity window")
    p.add_argument("--ppl-stride", type=int, help="tokens between window starts (less than --ppl-window)")
    p.add_argument("--ppl-after-every-task", action=argparse.BooleanOptionalAction, default=None,
                   help="score perplexity after every task (default: yes, except for a method swept over rates)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast for training and accuracy (default: on a GPU with bf16, float32 on a CPU, where its speed varies by chip); "
                   "perplexity is always computed in float32")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--workers", type=int,
                   help="on a CPU: run this many runs side by side, each in its own process with its share of "
                   "the threads (same numbers; a sweep finishes sooner). Default 1. With --executor ray: at "
                   "most this many runs at once (default: as many as the cluster's free resources fit)")
    p.add_argument("--executor", choices=["local", "ray"],
                   help="where runs train: local (this machine, default) or ray (each run a Ray task on a "
                   "cluster, retried from its last finished task if its node dies; docs/distributed.md). Ray "
                   "needs pip install 'curlora[ray]'")
    p.add_argument("--ray-address",
                   help="--executor ray: auto or HOST:PORT of a running Ray cluster (default: $RAY_ADDRESS, else "
                   "a Ray instance on this machine for the command)")
    p.add_argument("--ray-num-cpus", type=float,
                   help="--executor ray: CPUs per run, also its torch threads (default 1)")
    p.add_argument("--ray-num-gpus", type=float, help="--executor ray: GPUs per run, with --device cuda (default 0)")
    p.add_argument("--ray-max-retries", type=int,
                   help="--executor ray: times a run whose worker or node died is started again (default 3; -1: "
                   "without limit)")
    p.add_argument("--quantize", choices=SCHEMES,
                   help="quantize the base model's linear layers with bitsandbytes (QCURLoRA)")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    p.add_argument("--log-dir",
                   help="also write TensorBoard event files here as runs train, one directory per run (step "
                   "losses, accuracies after each task, perplexity, final ACC); watch with tensorboard --logdir. "
                   "Needs pip install 'curlora[tensorboard]'")


def _run_continual(args: argparse.Namespace) -> int:
    from curlora.continual import ContinualRunner, load_config

    overrides = {
        key: getattr(args, key)
        for key in (
            "data_dir", "source", "model", "protocol", "chat_template", "k_shot", "generation_examples", "tasks", "corpus", "corpus_file", "methods", "ranks", "seeds", "confirm_seeds", "examples_per_task",
            "eval_examples", "epochs", "batch_size", "lr", "lrs", "head_lr", "u_penalties", "ewc_lambda", "ewc_fisher_examples", "replay_per_task", "olora_lambda",
            "corda_samples", "corda_sample_tokens", "alpha",
            "max_length", "ppl_max_tokens", "ppl_window", "ppl_stride", "ppl_after_every_task", "bf16", "device", "workers", "progress", "quantize", "log_dir",
            "executor", "ray_address", "ray_num_cpus", "ray_num_gpus", "ray_max_retries",
        )
    }
    if args.method_lrs:
        overrides["method_lrs"] = _method_rate_grid(args.method_lrs)
    if args.orders:
        overrides["orders"] = _orders(args.orders)
    if overrides["ppl_max_tokens"] == 0:
        overrides["ppl_max_tokens"] = None
    config = load_config(args.preset, args.config, overrides)
    results = ContinualRunner(config, args.output_dir, resume=args.resume, reuse_from=args.reuse_runs_from,
                              report_only=args.report_only).run()
    if results is None:  # a data-parallel process other than rank 0: rank 0 reports
        return 0
    print((args.output_dir / "report.md").read_text())
    failed = [r for r in results["runs"] if r["status"] != "ok"]
    print(f"Wrote {args.output_dir / 'results.json'} and {args.output_dir / 'report.md'}"
          + (f"; {len(failed)} run(s) failed" if failed else ""))
    return 0


def _sft_parser(sub) -> None:
    from curlora.sft.train import SFTSettings

    p = sub.add_parser(
        "sft",
        help="fine-tune a CURLoRA adapter on prompt/response or chat data (loss on responses only)",
        description="Supervised fine-tuning with transformers.Trainer: data from a local .jsonl/.csv/.tsv "
        "file or a hub dataset id, rendered with the tokenizer's chat template; prompt tokens are masked "
        "out of the loss. Runs under `accelerate launch` / `torchrun` for data-parallel training.",
    )
    p.add_argument("--data", required=True, help="local file or hub dataset id")
    p.add_argument("--output-dir", type=Path, required=True, help="where the adapter is saved")
    p.add_argument("--model", help="smollm2 (default, offline), gemma3-270m (fetched at first use, Gemma terms), a .gguf file, a local directory or a hub id")
    p.add_argument("--prompt-field", default="prompt", help="(default: %(default)s)")
    p.add_argument("--response-field", default="response", help="(default: %(default)s)")
    p.add_argument("--messages-field", default="messages", help="chat list of {role, content} (default: %(default)s)")
    p.add_argument("--system", help="system message prepended to every conversation")
    p.add_argument("--split", default="train", help="hub dataset split (default: %(default)s)")
    p.add_argument("--max-examples", type=int)
    p.add_argument("--eval-fraction", type=float, default=0.0, help="held-out share for an eval loss")
    p.add_argument("--r", type=int, default=16, help="CURLoRA rank (default: %(default)s)")
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--target-modules", type=_strings, help="default: the architecture's attention projections")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=-1, help="overrides --epochs when > 0")
    p.add_argument("--batch-size", type=int, default=8, help="per process (default: %(default)s)")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=SFTSettings.lr,
                   help="(default: %(default)s, the rate validation chose for CURLoRA at r 16 on SmolLM2's offline "
                   "suite; at 1e-3 it learned nothing there: docs/choosing.md). Yours depends on the model, rank "
                   "and data: train at a few rates (e.g. 3e-3, 1e-2, 3e-2) with --eval-fraction 0.1 and keep the "
                   "one with the lowest eval_loss"),
    p.add_argument("--warmup-ratio", type=float, default=0.0)
    p.add_argument("--max-length", type=int, default=256, help="tokens per example (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--save-steps", type=int, default=0, help="checkpoint every N steps (0: none)")
    p.add_argument("--logging-steps", type=int, default=10)
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output-dir")


def _run_sft(args: argparse.Namespace) -> int:
    import json

    from curlora.sft import run_sft
    from curlora.sft.train import SFTSettings

    fields = {k: getattr(args, k) for k in SFTSettings.__dataclass_fields__ if k != "extra" and hasattr(args, k)}
    fields["data"], fields["output_dir"] = str(args.data), str(args.output_dir)
    summary = run_sft(SFTSettings(**fields))
    shown = {k: v for k, v in summary.items() if k != "settings"}
    print(json.dumps(shown, indent=2))
    print(f"Wrote the adapter to {args.output_dir}")
    return 0


def _generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="answer a prompt with a saved adapter (greedy)")
    p.add_argument("--adapter", type=Path, required=True, help="directory written by `curlora sft`")
    p.add_argument("--prompt", required=True, action="append", help="repeat for several prompts")
    p.add_argument("--model", help="base model (default: the one the adapter records, if it is smollm2, gemma3-270m or an "
                   "existing absolute path; else SmolLM2)")
    p.add_argument("--system", help="system message (use the one used in training)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--compare", action="store_true", help="also print the base model's answer")


def _run_generate(args: argparse.Namespace) -> int:
    from curlora import checks
    from curlora.sft import generate, load_for_generation

    checks.integer("--max-new-tokens", args.max_new_tokens, minimum=1)
    checks.model_path(args.model)
    model, tokenizer = load_for_generation(args.adapter, args.model)
    for prompt in args.prompt:
        answer = generate(model, tokenizer, prompt, args.max_new_tokens, args.system)
        if not args.compare:
            print(answer)
            continue
        with model.disable_adapter():
            before = generate(model, tokenizer, prompt, args.max_new_tokens, args.system)
        print(f"prompt:  {prompt}\nbase:    {before}\nadapter: {answer}\n")
    return 0


COMMANDS = {"continual": _run_continual, "sft": _run_sft, "generate": _run_generate}


def build_parser() -> argparse.ArgumentParser:
    """The whole ``curlora`` parser, built without running anything: ``main`` parses with it, and
    the docs generate their CLI reference from it and check their examples against it."""
    parser = argparse.ArgumentParser(prog="curlora", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _continual_parser(sub)
    _sft_parser(sub)
    _generate_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The ``curlora`` command: check the extras the subcommand needs, then run it. The harness is
    imported only after that check (inside the parser's functions), so a missing package is named
    with its pip command instead of failing an import."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        for extra, purpose in needed_extras(argv):
            require_extra(extra, purpose)
    except ImportError as error:
        print(f"curlora: error: {error}", file=sys.stderr)
        return 2
    try:
        parser = build_parser()
    except ModuleNotFoundError as error:  # the parser itself lists the benchmark's presets
        print(f"curlora: error: the command needs {error.name}: pip install 'curlora[all]'", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError, FileExistsError, OSError) as error:
        print(f"curlora: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
