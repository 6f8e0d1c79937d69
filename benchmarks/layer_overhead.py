"""Where an adapted layer's extra time goes: one projection, forward + backward, at SmolLM2's shapes.

Times, interleaved in one process, a frozen bias-free ``nn.Linear`` (the floor: gradient to its
input only) against the same layer wrapped by CURLoRA three ways: the library's fused path, the
op-by-op path (``base(x) + adapter(x)``, what the library ran before the fused path and still
runs for quantized bases or adapter dropout) and the reference implementation's materialised
C·U·R. It also times one tiny (out × r by r × r) matmul: on a CPU its cost is mostly the thread
wake-up that every parallel kernel pays, which is what the adapter's few small kernels add up to.

    python benchmarks/layer_overhead.py [--tokens 1024] [--in-features 576]
        [--out-features 576,192] [--r 16] [--repeats 40] [--json out.json]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from typing import Callable  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

from curlora.fileio import atomic_write_json  # noqa: E402
from curlora.layer import CURLoRALayer  # noqa: E402

VARIANTS = ("floor", "curlora-fused", "curlora-op-by-op", "reference")


def build(in_f: int, out_f: int, r: int, dtype: torch.dtype) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    torch.manual_seed(0)
    base = nn.Linear(in_f, out_f, bias=False).to(dtype).requires_grad_(False)
    layer = CURLoRALayer(base)
    gen = torch.Generator().manual_seed(0)
    cols, rows = torch.randperm(in_f, generator=gen)[:r], torch.randperm(out_f, generator=gen)[:r]
    adapter = layer.add_adapter("a", cols, rows, alpha=1.0)
    layer.active_adapter = "a"
    with torch.no_grad():
        adapter.U.normal_(0.0, 1e-2, generator=gen)

    def op_by_op(x: torch.Tensor) -> torch.Tensor:
        return base(x) + adapter(x).to(x.dtype)

    def reference(x: torch.Tensor) -> torch.Tensor:
        return base(x) + x @ (adapter.C @ adapter.U.to(dtype) @ adapter.R).t()

    return {"floor": base, "curlora-fused": layer, "curlora-op-by-op": op_by_op, "reference": reference}


def fwd_bwd(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, grad: torch.Tensor) -> None:
    fn(x.requires_grad_(True)).backward(grad)
    x.grad = None


def median_ms(times: list[float]) -> float:
    return 1e3 * statistics.median(times)


def run(tokens: int, in_f: int, outs: list[int], r: int, repeats: int, dtype: torch.dtype) -> dict:
    results: dict = {
        "meta": {"tokens": tokens, "in_features": in_f, "r": r, "repeats": repeats,
                 "dtype": str(dtype).replace("torch.", ""), "torch": torch.__version__,
                 "threads": torch.get_num_threads(), "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY")},
        "layers": {},
    }
    for out_f in outs:
        fns = build(in_f, out_f, r, dtype)
        x = torch.randn(tokens, in_f, dtype=dtype)
        grad = torch.randn(tokens, out_f, dtype=dtype)
        small_a, small_b = torch.randn(out_f, r, dtype=dtype), torch.randn(r, r, dtype=dtype)
        times: dict[str, list[float]] = {k: [] for k in (*VARIANTS, "tiny-matmul")}
        for round_ in range(repeats + 3):  # 3 warm-up rounds
            for name in VARIANTS:
                t0 = time.perf_counter()
                fwd_bwd(fns[name], x, grad)
                if round_ >= 3:
                    times[name].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            small_a @ small_b
            if round_ >= 3:
                times["tiny-matmul"].append(time.perf_counter() - t0)
        floor = median_ms(times["floor"])
        results["layers"][f"{in_f}->{out_f}"] = {
            name: {"median_ms": median_ms(t), "added_ms": median_ms(t) - floor if name in VARIANTS else None}
            for name, t in times.items()
        }
    return results


def format_table(results: dict) -> str:
    m = results["meta"]
    lines = [
        f"# layer_overhead  torch {m['torch']}  {m['dtype']}  {m['tokens']} tokens  r={m['r']}  "
        f"{m['repeats']} rounds  threads {m['threads']} OMP_WAIT_POLICY={m['OMP_WAIT_POLICY']}",
        f"{'layer':<12}{'variant':<28}{'fwd+bwd ms':>12}{'added ms':>10}",
    ]
    for layer, rows in results["layers"].items():
        for name, row in rows.items():
            added = "" if row["added_ms"] is None else f"{row['added_ms']:>10.3f}"
            label = f"{name} ({layer.split('->')[1]}x{m['r']} @ {m['r']}x{m['r']})" if name == "tiny-matmul" else name
            lines.append(f"{layer:<12}{label:<28}{row['median_ms']:>12.3f}{added}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=1024, help="batch × sequence length (default 8 × 128)")
    p.add_argument("--in-features", type=int, default=576)
    p.add_argument("--out-features", default="576,192", help="SmolLM2's q and k/v widths")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--repeats", type=int, default=40)
    p.add_argument("--no-bf16", action="store_true", help="float32 instead of bfloat16")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    outs = [int(v) for v in args.out_features.split(",")]
    dtype = torch.float32 if args.no_bf16 else torch.bfloat16
    results = run(args.tokens, args.in_features, outs, args.r, args.repeats, dtype)
    print(format_table(results))
    if args.json:
        atomic_write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
