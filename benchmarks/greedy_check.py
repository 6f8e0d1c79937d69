"""What sharing the prompt prefix saves in the generative protocol's floors, side by side: the
greedy-answer check and the scoring of answers.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/greedy_check.py [--model smollm2] [--data-dir ../shared/data]
        [--tasks rotten_tomatoes,vader_tweets,bbc_news] [--k-shot 4] [--rows 32] [--repeats 2] [--json PATH]

The check (``final_checks``'s valid-answer rate) decodes greedily from the first ``generation_examples``
evaluation rows of each task. Under the k-shot floor every prompt starts with the same demonstrations
(``k`` training rows of every label: most of the prompt's tokens). On real task rows as chat prompts
(the protocol's PromptCollator, the registered prompts), one process times, interleaved round by round:

* ``generate``: transformers' ``generate(do_sample=False)`` on the padded batch (the code before);
* ``greedy_tokens``: curlora's greedy decoding, the shared prefix run once (curlora.continual.forward);

and the answers' scores (``answer_log_probs``, what accuracy reads) with the prefix shared against
plain (``forward.SHARE_PREFIX_FROM`` beyond any prompt, the code before sharing); with and without
demonstrations (zero-shot prompts share only the chat template's opening). On a model with a sliding
attention window that the k-shot prompts outgrow (Gemma-3's 512 tokens), sharing runs each row
alone after the prefix. Reported per task: the fastest round's seconds, the ratios, whether the two
decodings wrote the same tokens up to each row's end of turn (what the check reads), and the largest
difference between the two scorings. Writes benchmarks/results/greedy_check.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sweep_time import REPO, machine  # noqa: E402

from curlora.continual import forward  # noqa: E402
from curlora.data import Example, PromptCollator, load_task  # noqa: E402
from curlora.data.prompts import PROMPTS  # noqa: E402
from curlora.fileio import atomic_write_json  # noqa: E402
from curlora.pretrained import load_model_and_tokenizer  # noqa: E402


def demonstrations(train: list[Example], k: int) -> list[Example]:
    """``k`` training rows of every label, labels interleaved (the k-shot floor's shape; which rows
    does not matter for timing)."""
    by_label: dict[int, list[Example]] = {}
    for row in train:
        by_label.setdefault(row.label, []).append(row)
    return [rows[i] for i in range(k) for rows in by_label.values() if i < len(rows)]


def until_end(rows: torch.Tensor, end: int) -> list[list[int]]:
    """Each row's tokens up to its first ``end`` (what the check decodes)."""
    return [row[: row.index(end)] if end in row else row for row in rows.tolist()]


@contextmanager
def sharing_from(tokens: int) -> Iterator[None]:
    """Prefixes shared from ``tokens`` on (beyond any prompt: never, the plain computation)."""
    before = forward.SHARE_PREFIX_FROM
    forward.SHARE_PREFIX_FROM = tokens
    try:
        yield
    finally:
        forward.SHARE_PREFIX_FROM = before


def measure_task(lm: torch.nn.Module, tokenizer: Any, name: str, data_dir: str | None, k_shot: int, rows: int,
                 repeats: int) -> dict[str, Any]:
    task = load_task(name, None, data_dir, seed=0, max_train=240, max_eval=rows)
    prompt, collator = PROMPTS[name], PromptCollator(tokenizer, 64)
    end = collator.end_ids[0]
    steps = max(map(len, collator.answers(prompt))) + len(collator.end_ids)
    out: dict[str, Any] = {"task": name}
    for shots in (0, k_shot):
        demos = demonstrations(task.train, shots) if shots else []
        batch = collator.prompt_batch(task.eval[:rows], prompt, demos)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        answers = collator.answers(prompt)
        times: dict[str, list[float]] = {"generate": [], "greedy_tokens": [], "scores_plain": [], "scores_shared": []}
        written: dict[str, torch.Tensor] = {}
        for _ in range(repeats):
            start = time.perf_counter()
            generated = lm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id, eos_token_id=end)
            times["generate"].append(time.perf_counter() - start)
            written["generate"] = generated[:, ids.shape[1]:]
            start = time.perf_counter()
            written["greedy_tokens"] = forward.greedy_tokens(lm, ids, mask, steps, end)
            times["greedy_tokens"].append(time.perf_counter() - start)
            for mode, share_from in (("scores_plain", 10**9), ("scores_shared", forward.SHARE_PREFIX_FROM)):
                with sharing_from(share_from):
                    start = time.perf_counter()
                    written[mode] = forward.answer_log_probs(lm, ids, mask, answers)
                    times[mode].append(time.perf_counter() - start)
        best = {mode: min(t) for mode, t in times.items()}
        out[f"{shots}-shot"] = {
            "prompt_tokens_mean": float(mask.sum(-1).float().mean()),
            "prompt_tokens_max": int(mask.sum(-1).max()), "rows": len(ids), "seconds": best,
            "generate_over_greedy_tokens": best["generate"] / best["greedy_tokens"],
            "same_answers": until_end(written["generate"], end) == until_end(written["greedy_tokens"], end),
            "plain_over_shared_scoring": best["scores_plain"] / best["scores_shared"],
            "max_score_difference": float((written["scores_plain"] - written["scores_shared"]).abs().max()),
            "same_predictions": torch.equal(written["scores_plain"].argmax(-1), written["scores_shared"].argmax(-1)),
        }
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="smollm2 (default), gemma3-270m, or a model directory")
    p.add_argument("--data-dir", default=None, help="the tasks' data (default: the offline suite's own)")
    p.add_argument("--tasks", default="rotten_tomatoes,vader_tweets,bbc_news")
    p.add_argument("--k-shot", type=int, default=4, help="training rows of every label in the k-shot prompts")
    p.add_argument("--rows", type=int, default=32, help="evaluation rows per task (generation_examples)")
    p.add_argument("--repeats", type=int, default=2, help="interleaved rounds; the fastest is reported")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "greedy_check.json")
    args = p.parse_args(argv)
    if min(args.k_shot, args.rows, args.repeats) < 1:
        p.error("--k-shot, --rows and --repeats must be at least 1")
    torch.set_num_threads(args.threads)
    lm, tokenizer = load_model_and_tokenizer(args.model)
    lm.eval()
    report = {"machine": machine(args.threads), "threads": args.threads, "model": args.model or "smollm2",
              "k_shot": args.k_shot, "repeats": args.repeats,
              "tasks": [measure_task(lm, tokenizer, name, args.data_dir, args.k_shot, args.rows, args.repeats)
                        for name in args.tasks.split(",")]}
    for t in report["tasks"]:
        for shots in ("0-shot", f"{args.k_shot}-shot"):
            m = t[shots]
            print(f"{t['task']} {shots} ({m['prompt_tokens_mean']:.0f} prompt tokens, at most "
                  f"{m['prompt_tokens_max']}): generate {m['seconds']['generate']:.1f} s, greedy_tokens "
                  f"{m['seconds']['greedy_tokens']:.1f} s, {m['generate_over_greedy_tokens']:.2f}x, same answers: "
                  f"{m['same_answers']}; scoring plain {m['seconds']['scores_plain']:.1f} s, shared "
                  f"{m['seconds']['scores_shared']:.1f} s, {m['plain_over_shared_scoring']:.2f}x, largest score "
                  f"difference {m['max_score_difference']:.1e}, same predictions: {m['same_predictions']}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
