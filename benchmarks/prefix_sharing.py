"""What running a batch's shared prompt prefix once saves in the generative protocol, side by side.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/prefix_sharing.py [--model smollm2] [--data-dir ../shared/data]
        [--tasks rotten_tomatoes,vader_tweets,bbc_news] [--batches 6] [--repeats 3] [--json PATH]

On real task rows as chat prompts (the protocol's PromptCollator, the registered prompts), one
process times, interleaved round by round so that drift in machine load falls on all of them:

* ``shared``: a training step (CURLoRA r16 on q/k/v: forward with the answer loss + backward) the
  way the protocol runs it, the rows' common prefix once;
* ``unshared``: the same step with prefix sharing off (``forward.SHARE_PREFIX_FROM`` beyond any
  prompt), i.e. the code before it;
* ``heads``: the heads protocol's step on the same rows (last-token states, a loss on them, backward);

and the scoring of evaluation batches (``answer_log_probs``) shared against unshared. Reported per
task: the fastest round's seconds, the ratios, and how far the shared path's loss, gradients and
scores are from the unshared ones (float rounding). Writes benchmarks/results/prefix_sharing.json.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sweep_time import REPO, machine  # noqa: E402

from curlora import CURLoRAConfig, get_curlora_model  # noqa: E402
from curlora.continual import forward  # noqa: E402
from curlora.data import ClassificationCollator, PromptCollator, load_task  # noqa: E402
from curlora.data.prompts import PROMPTS  # noqa: E402
from curlora.fileio import atomic_write_json  # noqa: E402
from curlora.pretrained import load_model_and_tokenizer  # noqa: E402

SHARING = {"shared": forward.SHARE_PREFIX_FROM, "unshared": 10**9}


def _answer_step(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[float, list[torch.Tensor]]:
    model.zero_grad()
    targets = batch["targets"]
    wanted = torch.zeros_like(targets, dtype=torch.bool)
    wanted[:, :-1] = targets[:, 1:] != -100
    logits = forward.lm_logits(model, batch["input_ids"], batch["attention_mask"], wanted)
    loss = F.cross_entropy(logits.float(), targets[:, 1:][wanted[:, :-1]], reduction="sum")
    loss.backward()
    return float(loss.detach()), [p.grad.clone() for p in model.parameters() if p.requires_grad]


def _heads_step(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> None:
    model.zero_grad()
    forward.last_hidden(model, batch["input_ids"], batch["attention_mask"]).square().sum().backward()


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure_task(model: torch.nn.Module, tokenizer: Any, name: str, data_dir: str | None, batches: int,
                 repeats: int, batch_size: int = 8, eval_batch_size: int = 32) -> dict[str, Any]:
    """One task's timings and differences (see the module docstring)."""
    rows = batches * batch_size
    task = load_task(name, None, data_dir, seed=0, max_train=rows, max_eval=2 * eval_batch_size)
    prompt, prompts, heads = PROMPTS[name], PromptCollator(tokenizer, 64), ClassificationCollator(tokenizer, 64)
    train = [task.train[i: i + batch_size] for i in range(0, len(task.train), batch_size)]
    answer_batches = [prompts.training_batch([(e, prompt) for e in chunk]) for chunk in train]
    head_batches = [heads(chunk) for chunk in train]
    scoring = [prompts.prompt_batch(task.eval[i: i + eval_batch_size], prompt)
               for i in range(0, len(task.eval), eval_batch_size)]
    answers = prompts.answers(prompt)
    train_s: dict[str, list[float]] = {"shared": [], "unshared": [], "heads": []}
    score_s: dict[str, list[float]] = {"shared": [], "unshared": []}
    for _ in range(repeats):
        model.train()
        for mode in train_s:
            forward.SHARE_PREFIX_FROM = SHARING.get(mode, SHARING["shared"])
            step = _heads_step if mode == "heads" else _answer_step
            train_s[mode].append(_timed(lambda: [step(model, b) for b in (head_batches if mode == "heads" else answer_batches)]))
        model.eval()
        for mode in score_s:
            forward.SHARE_PREFIX_FROM = SHARING[mode]
            score_s[mode].append(_timed(lambda: [forward.answer_log_probs(model, b["input_ids"], b["attention_mask"], answers)
                                                 for b in scoring]))
    model.train()
    outcome = {}
    for mode in ("shared", "unshared"):
        forward.SHARE_PREFIX_FROM = SHARING[mode]
        loss, grads = _answer_step(model, answer_batches[0])
        with torch.no_grad():
            model.eval()
            scores = torch.cat([forward.answer_log_probs(model, b["input_ids"], b["attention_mask"], answers) for b in scoring])
            model.train()
        outcome[mode] = (loss, grads, scores)
    forward.SHARE_PREFIX_FROM = SHARING["shared"]
    (loss, grads, scores), (plain_loss, plain_grads, plain_scores) = outcome["shared"], outcome["unshared"]
    best = {mode: min(times) for mode, times in train_s.items()}
    best_score = {mode: min(times) for mode, times in score_s.items()}
    return {
        "task": name, "train_batches": len(answer_batches), "score_batches": len(scoring),
        "train_s": best, "score_s": best_score,
        "train_unshared_over_shared": best["unshared"] / best["shared"],
        "train_shared_over_heads": best["shared"] / best["heads"],
        "train_unshared_over_heads": best["unshared"] / best["heads"],
        "score_unshared_over_shared": best_score["unshared"] / best_score["shared"],
        "loss_difference": abs(loss - plain_loss),
        "gradient_difference_relative": max(float((g - p).abs().max() / p.abs().max().clamp_min(1e-30))
                                            for g, p in zip(grads, plain_grads)),
        "score_difference": float((scores - plain_scores).abs().max()),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="smollm2 (default), gemma3-270m, or a model directory")
    p.add_argument("--data-dir", default=None, help="the tasks' data (default: the offline suite's own)")
    p.add_argument("--tasks", default="rotten_tomatoes,vader_tweets,bbc_news")
    p.add_argument("--batches", type=int, default=6, help="training batches of 8 rows per task")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the fastest is reported")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "prefix_sharing.json")
    args = p.parse_args(argv)
    if args.batches < 1 or args.repeats < 1:
        p.error("--batches and --repeats must be at least 1")
    torch.set_num_threads(args.threads)
    base, tokenizer = load_model_and_tokenizer(args.model)
    torch.manual_seed(0)
    model = get_curlora_model(copy.deepcopy(base), CURLoRAConfig(r=16, seed=0))
    for param in model.parameters():  # a trained-looking U: the zero init would make every gradient path trivial
        if param.requires_grad:
            torch.nn.init.normal_(param, std=0.02)
    report = {"machine": machine(args.threads), "threads": args.threads, "model": args.model or "smollm2",
              "tasks": [measure_task(model, tokenizer, name, args.data_dir, args.batches, args.repeats)
                        for name in args.tasks.split(",")]}
    for t in report["tasks"]:
        print(f"{t['task']}: training step unshared/shared {t['train_unshared_over_shared']:.2f}x, "
              f"generative/heads {t['train_shared_over_heads']:.2f}x (was {t['train_unshared_over_heads']:.2f}x); "
              f"scoring unshared/shared {t['score_unshared_over_shared']:.2f}x; differences: loss "
              f"{t['loss_difference']:.1e}, gradients {t['gradient_difference_relative']:.1e} (relative), "
              f"scores {t['score_difference']:.1e}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
