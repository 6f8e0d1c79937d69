"""CUR initialisation cost: index sampling for every q/k/v layer of a Mistral-7B-shaped model.

Mistral-7B has 32 decoder layers; q_proj is 4096 × 4096 and k_proj / v_proj are 1024 × 4096
(out × in, grouped-query attention). Random weights are created one layer at a time (never
timed) so memory stays at one 4096 × 4096 matrix. Timed per layer, as ``get_curlora_model``
does it: ``module_generator`` (seeded by module name) + ``sample_indices`` (float32 squared
norms, inverse probabilities, multinomial draws of r columns and r rows). The C / R copies that
``CURAdapter`` then takes (a gather of r columns and r rows) are timed separately as
``gather_s``. Run for float32 and bfloat16 weights.

    python benchmarks/init_cost.py [--layers 32 --hidden 4096 --kv-out 1024 --r 16 --json out.json]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import datetime as _dt  # noqa: E402
import time  # noqa: E402
from typing import Callable  # noqa: E402

import torch  # noqa: E402

from curlora.fileio import atomic_write_json  # noqa: E402
from curlora.sampling import module_generator, sample_indices  # noqa: E402

TARGET_S = 10.0


def layer_shapes(layers: int, hidden: int, kv_out: int) -> list[tuple[str, tuple[int, int]]]:
    shapes = []
    for i in range(layers):
        prefix = f"model.layers.{i}.self_attn."
        shapes += [(prefix + "q_proj", (hidden, hidden)), (prefix + "k_proj", (kv_out, hidden)),
                   (prefix + "v_proj", (kv_out, hidden))]
    return shapes


def time_init(layers: int = 32, hidden: int = 4096, kv_out: int = 1024, r: int = 16,
              dtype: torch.dtype = torch.float32, mode: str = "inverse", seed: int = 0) -> dict:
    """Seconds spent sampling (and, separately, gathering C/R) for every q/k/v layer."""
    data_gen = torch.Generator().manual_seed(1234)
    sample_s = gather_s = 0.0
    for name, shape in layer_shapes(layers, hidden, kv_out):
        weight = torch.randn(shape, generator=data_gen).mul_(0.02).to(dtype)  # not timed
        t0 = time.perf_counter()
        gen = module_generator(seed, name, weight.device)
        cols, rows = sample_indices(weight, r, mode, True, gen)
        t1 = time.perf_counter()
        C = weight[:, cols].contiguous()
        R = weight[rows, :].contiguous()
        t2 = time.perf_counter()
        sample_s += t1 - t0
        gather_s += t2 - t1
        assert C.shape == (shape[0], r) and R.shape == (r, shape[1])
        del weight, C, R
    n = 3 * layers
    return {"dtype": str(dtype).replace("torch.", ""), "layers": n, "sample_s": sample_s,
            "gather_s": gather_s, "total_s": sample_s + gather_s, "per_layer_ms": 1e3 * sample_s / n,
            "met": sample_s + gather_s < TARGET_S}


def run(layers: int = 32, hidden: int = 4096, kv_out: int = 1024, r: int = 16,
        dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16),
        log: Callable[[str], None] = print) -> dict:
    results = {
        "meta": {"date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                 "torch": torch.__version__, "layers": layers, "hidden": hidden, "kv_out": kv_out,
                 "r": r, "target_s": TARGET_S,
                 "threads": {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
                             "torch_num_threads": torch.get_num_threads()}},
        "runs": [],
    }
    for dtype in dtypes:
        res = time_init(layers, hidden, kv_out, r, dtype)
        results["runs"].append(res)
        log(f"  {res['dtype']}: sampled {res['layers']} layers in {res['sample_s']:.2f}s")
    return results


def format_table(results: dict) -> str:
    m = results["meta"]
    lines = [
        f"# init_cost  {m['date']}  torch {m['torch']}  {m['layers']} layers x q/k/v "
        f"(q {m['hidden']}x{m['hidden']}, k/v {m['kv_out']}x{m['hidden']})  r={m['r']}  "
        f"threads {m['threads']['torch_num_threads']} OMP_WAIT_POLICY={m['threads']['OMP_WAIT_POLICY']}",
        f"{'dtype':<10}{'layers':>7}{'sample s':>10}{'gather s':>10}{'total s':>9}{'ms/layer':>10}  target < {m['target_s']:.0f}s",
    ]
    for r in results["runs"]:
        lines.append(f"{r['dtype']:<10}{r['layers']:>7}{r['sample_s']:>10.2f}{r['gather_s']:>10.2f}"
                     f"{r['total_s']:>9.2f}{r['per_layer_ms']:>10.1f}  {'MET' if r['met'] else 'MISSED'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--kv-out", type=int, default=1024)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = run(args.layers, args.hidden, args.kv_out, args.r)
    print(format_table(results))
    if args.json:
        atomic_write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
