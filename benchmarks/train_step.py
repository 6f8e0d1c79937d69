"""Training-step and inference cost of CURLoRA against the floor, the reference way and PEFT LoRA.

One process builds every variant on shared (frozen) base weights and times them interleaved,
A B C D A B C D ..., so drift in machine load hits all variants alike. Reported: the median
seconds per step over ``--repeats`` rounds after ``--warmup`` rounds, and ratios.

Training variants (one step = forward + loss + backward + AdamW step on the trainable params +
zero_grad):

* ``floor``: the model with no adapter, but a single trainable scalar gate multiplies the
  embedding output. Autograd must then carry the gradient back through every decoder layer
  (every attention, MLP, norm and the LM head's input gradient), and computes no weight
  gradient. That is what any adapter with trainable parameters in layer 0 must at least pay.
* ``curlora-rN``: ``curlora.get_curlora_model`` at rank N on q/k/v (this library, fused path).
* ``unfused-rN`` (middle rank only): the same model with a no-op pre-hook on every base layer,
  which sends the library down its op-by-op path ``base(x) + adapter(x)`` (the path before the
  fused layer, still used for quantized bases and adapter dropout).
* ``reference-rN``: the reference implementation's way, built here for comparison only: the
  same C, U, R, but every forward materialises C·U·R (out × in) and computes
  ``base(x) + alpha · x @ (C U R)ᵀ``.
* ``lora-rN``: PEFT LoRA at rank N on q/k/v (lora_alpha = N, no dropout).

Inference variants (forward only, under ``torch.no_grad``): ``base``, ``curlora-unmerged``,
``curlora-merged`` (``model.merge_adapter()``), at the middle rank.

Peak memory: each variant runs alone in a fresh subprocess (``--memory-probe``) that loads the
base model, trims the allocator, resets the kernel's resident-set high-water mark
(``/proc/self/clear_refs`` ← 5) and reads the baseline RSS; it then builds the variant and runs
two steps (the second with optimizer state present) and reads ``VmHWM``. Reported is
``VmHWM − baseline``: everything the variant adds to the loaded model at its worst moment
(adapter tensors, activations kept for backward, gradients, optimizer state, temporaries).
The subprocess runs with ``MALLOC_MMAP_THRESHOLD_=131072`` so every tensor over 128 KiB is its
own mapping, returned to the kernel when freed; RSS then follows live memory instead of
glibc's retained heap.

Threads: ``OMP_WAIT_POLICY=PASSIVE`` is set before torch is imported (spinning OpenMP threads
ran 2–9× slower under other load on the 2-core machines); the settings are printed and saved.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import copy  # noqa: E402
import ctypes  # noqa: E402
import datetime as _dt  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Callable  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

from curlora import CURLoRAConfig, curlora_layers, get_curlora_model  # noqa: E402
from curlora.fileio import atomic_write_json  # noqa: E402
from curlora.layer import weight_out_in  # noqa: E402
from curlora.sampling import module_generator, sample_indices  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj"]
TRAIN_KINDS = ("floor", "curlora", "unfused", "reference", "lora")
INFER_KINDS = ("base", "curlora-unmerged", "curlora-merged")


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------
# Randomly initialised models with real architectures' shapes: timing depends on shapes, not on
# trained values. ``mistral-7b-shape`` is Mistral-7B's layer (hidden 4096, MLP 14336, 32 query /
# 8 key-value heads, vocabulary 32000); ``--layers`` keeps a few of its 32 layers so it fits here.
RANDOM_SHAPES = {
    "tiny-llama": dict(model_type="llama", vocab_size=128, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256),
    "mistral-7b-shape": dict(model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096),
}


def random_model(shape: str, dtype: torch.dtype = torch.float32, layers: int | None = None) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = dict(RANDOM_SHAPES[shape])
    if layers is not None:
        settings["num_hidden_layers"] = layers
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(**settings)).to(dtype).eval()


def tiny_llama(dtype: torch.dtype = torch.float32) -> nn.Module:
    """A randomly initialised 2-layer model (hidden 48) for smoke tests."""
    return random_model("tiny-llama", dtype)


def load_base(model: str, dtype: torch.dtype, layers: int | None = None) -> nn.Module:
    if model in RANDOM_SHAPES:
        return random_model(model, dtype, layers)
    if layers is not None:
        raise ValueError(f"--layers applies to the random shapes {sorted(RANDOM_SHAPES)}, not to {model!r}")
    from curlora.pretrained import load_model_and_tokenizer

    base, _ = load_model_and_tokenizer(None if model == "smollm2" else model, dtype=dtype)
    return base


def shared_copy(model: nn.Module) -> nn.Module:
    """A structural copy whose parameters are the same tensors (frozen weights are shared)."""
    memo = {id(p): p for p in model.parameters()}
    return copy.deepcopy(model, memo)


def _targets(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [
        (n, m) for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in TARGETS
    ]


class ReferenceCURLinear(nn.Module):
    """The reference implementation's way: C·U·R materialised (out × in) on every forward."""

    def __init__(self, base: nn.Linear, cols: torch.Tensor, rows: torch.Tensor, alpha: float) -> None:
        super().__init__()
        self.base = base
        self.alpha = alpha
        w = weight_out_in(base).detach()
        self.register_buffer("C", w[:, cols].clone())
        self.register_buffer("R", w[rows, :].clone())
        self.U = nn.Parameter(torch.zeros(cols.numel(), cols.numel(), dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w_approx = self.C @ self.U.to(self.C.dtype) @ self.R
        return self.base(x) + self.alpha * (x @ w_approx.t())


def _install_reference(model: nn.Module, r: int, alpha: float = 1.0, seed: int = 0) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module in _targets(model):
        w = weight_out_in(module)
        cols, rows = sample_indices(w, r, "inverse", True, module_generator(seed, name, w.device))
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, ReferenceCURLinear(module, cols, rows, alpha))


@dataclass
class Variant:
    name: str
    kind: str
    rank: int | None
    model: nn.Module
    params: list[nn.Parameter] = field(default_factory=list)
    optimizer: torch.optim.Optimizer | None = None
    times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)
    last: float = 0.0


def build_train_variant(base: nn.Module, kind: str, rank: int | None, share: bool = True) -> Variant:
    """One training variant on a copy of ``base`` that shares its frozen weights."""
    model = shared_copy(base) if share else base
    for p in model.parameters():
        p.requires_grad_(False)
    if kind == "floor":
        gate = nn.Parameter(torch.ones((), dtype=torch.float32))
        model.register_parameter("_floor_gate", gate)
        model.get_input_embeddings().register_forward_hook(lambda m, i, out: out * gate.to(out.dtype))
    elif kind in ("curlora", "unfused"):
        model = get_curlora_model(model, CURLoRAConfig(r=rank, target_modules=list(TARGETS)))
        if kind == "unfused":  # a (no-op) hook on the base layer sends CURLoRA down its op-by-op path
            for _, layer in curlora_layers(model):
                layer.base_layer.register_forward_pre_hook(lambda module, args: None)
    elif kind == "reference":
        _install_reference(model, rank)
    elif kind == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model, LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=list(TARGETS))
        )
    else:
        raise ValueError(f"unknown training variant {kind!r}")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    name = kind if rank is None else f"{kind}-r{rank}"
    return Variant(name, kind, rank, model, params, optimizer)


def build_infer_variant(base: nn.Module, kind: str, rank: int, share: bool = True) -> Variant:
    if kind == "base":
        model = base
    elif kind in ("curlora-unmerged", "curlora-merged"):
        merged = kind == "curlora-merged"
        model = shared_copy(base) if share else base
        if merged and share:  # merging writes the adapted weights: this copy gets its own, only those
            for _, module in _targets(model):
                module.weight = nn.Parameter(module.weight.detach().clone(), requires_grad=False)
        model = get_curlora_model(model, CURLoRAConfig(r=rank, target_modules=list(TARGETS)))
        with torch.no_grad():  # a non-zero U so merging really changes the weights
            for p in model.parameters():
                if p.requires_grad:
                    p.normal_(0.0, 1e-3, generator=torch.Generator().manual_seed(0))
        if merged:
            model.merge_adapter()
    else:
        raise ValueError(f"unknown inference variant {kind!r}")
    model.eval()
    return Variant(kind, kind, None if kind == "base" else rank, model)


# ---------------------------------------------------------------------------------------------
# steps
# ---------------------------------------------------------------------------------------------
def make_batch(vocab_size: int, batch_size: int, seq_len: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (batch_size, seq_len), generator=torch.Generator().manual_seed(0))


def train_step(v: Variant, input_ids: torch.Tensor) -> None:
    loss = v.model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    v.optimizer.step()
    v.optimizer.zero_grad(set_to_none=True)


def infer_step(v: Variant, input_ids: torch.Tensor) -> None:
    with torch.no_grad():
        v.model(input_ids=input_ids)


def cpu_steal_fraction(before: list[int], after: list[int]) -> float | None:
    """Share of CPU time the hypervisor gave to other guests between two /proc/stat readings."""
    if not before or not after:
        return None
    total = sum(after[:8]) - sum(before[:8])
    return (after[7] - before[7]) / total if total > 0 else None


def cpu_times() -> list[int]:
    """The aggregate ``cpu`` line of /proc/stat (user nice system idle iowait irq softirq steal)."""
    try:
        with open("/proc/stat") as f:
            return [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError, IndexError):
        return []


def interleave(variants: list[Variant], step: Callable[[Variant, torch.Tensor], None],
               input_ids: torch.Tensor, repeats: int, warmup: int, log: Callable[[str], None]) -> float | None:
    """Run rounds of every variant; each round starts one variant later (A B C, B C A, C A B, ...)
    so no variant always runs first or always follows the same one. Each step records wall time
    and this process's CPU time (all threads; on a kernel with paravirt steal accounting it
    excludes time the hypervisor gave to other guests). Returns the CPU steal share."""
    before = cpu_times()
    for round_ in range(warmup + repeats):
        shift = round_ % len(variants)
        for v in variants[shift:] + variants[:shift]:
            wall, cpu = time.perf_counter(), time.process_time()
            step(v, input_ids)
            v.last = time.perf_counter() - wall
            if round_ >= warmup:
                v.times.append(v.last)
                v.cpu_times.append(time.process_time() - cpu)
        tag = "warm-up" if round_ < warmup else "round"
        log(f"  {tag} {round_ + 1}/{warmup + repeats}: " + " ".join(f"{v.name}={v.last:.3f}" for v in variants))
    return cpu_steal_fraction(before, cpu_times())


# ---------------------------------------------------------------------------------------------
# memory probe (runs in a fresh subprocess per variant)
# ---------------------------------------------------------------------------------------------
def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def memory_probe(model: str, dtype: torch.dtype, kind: str, rank: int | None,
                 batch_size: int, seq_len: int, layers: int | None = None) -> dict:
    """Peak RSS a variant adds on top of the loaded base model (see module docstring)."""
    base = load_base(model, dtype, layers)
    input_ids = make_batch(base.config.vocab_size, batch_size, seq_len)
    _trim()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    baseline = _proc_status_kib("VmRSS")
    if kind in TRAIN_KINDS:
        v = build_train_variant(base, kind, rank, share=False)
        for _ in range(2):
            train_step(v, input_ids)
    else:
        v = build_infer_variant(base, kind, rank, share=False)
        for _ in range(2):
            infer_step(v, input_ids)
    peak = _proc_status_kib("VmHWM")
    return {"baseline_rss_mib": baseline / 1024, "peak_rss_mib": peak / 1024,
            "peak_over_base_mib": (peak - baseline) / 1024}


def run_memory_probe(kind: str, rank: int | None, *, model: str, batch_size: int, seq_len: int,
                     bf16: bool, layers: int | None) -> dict:
    """Peak memory of one variant's training step, measured in a fresh subprocess."""
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-probe", kind,
           "--model", model, "--batch-size", str(batch_size), "--seq-len", str(seq_len),
           "--threads", str(torch.get_num_threads()), "--bf16" if bf16 else "--no-bf16"]
    if rank is not None:
        cmd += ["--probe-rank", str(rank)]
    if layers is not None:
        cmd += ["--layers", str(layers)]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"memory probe {kind} r={rank} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# the benchmark
# ---------------------------------------------------------------------------------------------
def _summary(v: Variant, reference: Variant) -> dict:
    """Medians, quartiles and the three ratios to ``reference`` (floor or base model)."""
    q = statistics.quantiles(v.times, n=4) if len(v.times) >= 2 else [v.times[0]] * 3
    median = statistics.median(v.times)
    cpu_median = statistics.median(v.cpu_times)
    return {
        "median_s": median, "p25_s": q[0], "p75_s": q[2], "times_s": v.times,
        "cpu_median_s": cpu_median, "cpu_times_s": v.cpu_times,
        "ratio": median / statistics.median(reference.times),
        # Paired per-round ratio: robust to slow drift of the machine's load.
        "paired_ratio": statistics.median(a / b for a, b in zip(v.times, reference.times)),
        # CPU-time ratio: robust to time stolen by the hypervisor, which wall time is not.
        "cpu_ratio": cpu_median / statistics.median(reference.cpu_times),
    }


def thread_settings() -> dict:
    return {
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "torch_num_threads": torch.get_num_threads(),
        "torch_num_interop_threads": torch.get_num_interop_threads(),
    }


def run_benchmark(
    model: str = "smollm2",
    batch_size: int = 8,
    seq_len: int = 128,
    ranks: tuple[int, ...] = (8, 16, 24),
    repeats: int = 5,
    warmup: int = 1,
    infer_repeats: int = 20,
    bf16: bool = True,
    compile: bool = False,
    memory: bool = True,
    infer: bool = True,
    log: Callable[[str], None] = print,
    layers: int | None = None,
) -> dict:
    """Time every variant interleaved; optionally probe peak memory; return the results dict."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    base = load_base(model, dtype, layers)
    input_ids = make_batch(base.config.vocab_size, batch_size, seq_len)
    mid = ranks[len(ranks) // 2]

    train = [build_train_variant(base, "floor", None)]
    train += [build_train_variant(base, "curlora", r) for r in ranks]
    train.append(build_train_variant(base, "unfused", mid))
    for kind in ("reference", "lora"):
        train += [build_train_variant(base, kind, r) for r in ranks]
    inference = [build_infer_variant(base, k, mid) for k in INFER_KINDS] if infer else []
    if compile:
        for v in train + inference:
            v.model = torch.compile(v.model)

    log(f"training step: {len(train)} variants interleaved, {warmup} warm-up + {repeats} rounds")
    steal = {"train": interleave(train, train_step, input_ids, repeats, warmup, log)}
    if inference:
        log(f"inference forward: {len(inference)} variants interleaved, {warmup} warm-up + {infer_repeats} rounds")
        steal["infer"] = interleave(inference, infer_step, input_ids, infer_repeats, warmup, log)

    results: dict = {
        "meta": {
            "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "model": model, "layers": base.config.num_hidden_layers, "dtype": str(dtype).replace("torch.", ""),
            "batch_size": batch_size, "seq_len": seq_len, "ranks": list(ranks), "middle_rank": mid,
            "repeats": repeats, "infer_repeats": infer_repeats if inference else 0, "warmup": warmup,
            "compile": compile, "targets": TARGETS, "cpu_steal": steal,
            "torch": torch.__version__, "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(), "threads": thread_settings(),
            "memory_method": (
                "per-variant fresh subprocess, VmHWM - baseline VmRSS after /proc/self/clear_refs=5, "
                "MALLOC_MMAP_THRESHOLD_=131072, two steps" if memory else "not measured"
            ),
        },
        "train": {}, "infer": {}, "comparisons": {}, "targets": {},
    }
    try:
        import peft
        import transformers

        results["meta"]["transformers"] = transformers.__version__
        results["meta"]["peft"] = peft.__version__
    except ImportError:  # pragma: no cover
        pass

    for v in train:  # ratios to the floor
        trainable = sum(p.numel() for p in v.params)
        results["train"][v.name] = {"kind": v.kind, "rank": v.rank, "trainable_params": trainable, **_summary(v, train[0])}
    for v in inference:  # ratios to the base model
        results["infer"][v.name] = {"kind": v.kind, "rank": v.rank, **_summary(v, inference[0])}

    if memory:
        probe = {"model": model, "batch_size": batch_size, "seq_len": seq_len, "bf16": bf16, "layers": layers}
        for v in train + inference:
            log(f"memory probe: {v.name}")
            section = results["train"] if v in train else results["infer"]
            section[v.name].update(run_memory_probe(v.kind, v.rank, **probe))

    tr = results["train"]

    def over(name: str, a: dict, b: dict) -> dict:
        """``name`` and ``cpu_name``: a's median wall and CPU time over b's."""
        return {name: a["median_s"] / b["median_s"], f"cpu_{name}": a["cpu_median_s"] / b["cpu_median_s"]}

    for r in ranks:
        c, ref, lo = tr[f"curlora-r{r}"], tr[f"reference-r{r}"], tr[f"lora-r{r}"]
        comp = {
            **over("curlora_over_floor", c, tr["floor"]),
            **over("curlora_over_lora", c, lo),
            **over("reference_over_curlora", ref, c),
        }
        if memory:
            comp["curlora_mem_over_lora_mem"] = c["peak_over_base_mib"] / max(lo["peak_over_base_mib"], 1e-9)
        results["comparisons"][f"r{r}"] = comp

    cm = results["comparisons"][f"r{mid}"]
    cm.update(over("fused_over_unfused", tr[f"curlora-r{mid}"], tr[f"unfused-r{mid}"]))
    tg = results["targets"]
    tg[f"curlora_r{mid}_train_vs_floor <= 1.05"] = {"value": cm["curlora_over_floor"], "met": cm["curlora_over_floor"] <= 1.05}
    tg[f"curlora_r{mid}_train_vs_lora < 1"] = {"value": cm["curlora_over_lora"], "met": cm["curlora_over_lora"] < 1.0}
    tg[f"reference_r{mid}_vs_curlora >= 1.15"] = {"value": cm["reference_over_curlora"], "met": cm["reference_over_curlora"] >= 1.15}
    if memory:
        tg[f"curlora_r{mid}_peak_mem_vs_lora <= 1"] = {"value": cm["curlora_mem_over_lora_mem"], "met": cm["curlora_mem_over_lora_mem"] <= 1.0}
    if inference:
        m, u = results["infer"]["curlora-merged"]["ratio"], results["infer"]["curlora-unmerged"]["ratio"]
        tg["merged_inference_vs_base <= 1.01"] = {"value": m, "met": m <= 1.01}
        tg["unmerged_inference_vs_base <= 1.05"] = {"value": u, "met": u <= 1.05}
    return results


def format_table(results: dict) -> str:
    meta = results["meta"]
    th = meta["threads"]
    lines = [
        f"# train_step benchmark  {meta['date']}  torch {meta['torch']}  model {meta['model']}"
        f" ({meta['layers']} layers, {meta['dtype']})"
        f"  batch {meta['batch_size']}x{meta['seq_len']}  {meta['warmup']} warm-up + {meta['repeats']} rounds"
        f" ({meta['infer_repeats']} inference)  compile={meta['compile']}",
        f"# threads: torch {th['torch_num_threads']} (interop {th['torch_num_interop_threads']}),"
        f" OMP_WAIT_POLICY={th['OMP_WAIT_POLICY']}, OMP_NUM_THREADS={th['OMP_NUM_THREADS']}",
        "# CPU time stolen by the hypervisor while timing: "
        + ", ".join(f"{k} {'n/a' if v is None else f'{100 * v:.1f} %'}" for k, v in meta["cpu_steal"].items()),
        "",
        f"{'training step':<16}{'trainable':>11}{'median s':>10}{'p25-p75 s':>14}{'x floor':>9}{'paired':>8}"
        f"{'cpu x':>8}{'peak MiB':>10}",
    ]

    def ratios(row: dict) -> str:
        mem = f"{row['peak_over_base_mib']:.0f}" if "peak_over_base_mib" in row else "-"
        return (f"{row['median_s']:>10.3f}{row['p25_s']:>7.3f}-{row['p75_s']:<6.3f}{row['ratio']:>9.3f}"
                f"{row['paired_ratio']:>8.3f}{row['cpu_ratio']:>8.3f}{mem:>10}")

    for name, row in results["train"].items():
        lines.append(f"{name:<16}{row['trainable_params']:>11,d}" + ratios(row))
    if results["infer"]:
        lines += ["", f"{'inference':<27}{'median s':>10}{'p25-p75 s':>14}{'x base':>9}{'paired':>8}"
                      f"{'cpu x':>8}{'peak MiB':>10}"]
        lines += [f"{name:<27}" + ratios(row) for name, row in results["infer"].items()]
    lines += ["", f"{'rank':<6}{'CURLoRA/floor':>15}{'CURLoRA/LoRA':>14}{'reference/CURLoRA':>19}"
                  f"{'mem CURLoRA/LoRA':>18}   (CPU-time ratios in brackets)"]
    for key, c in results["comparisons"].items():
        mem = f"{c['curlora_mem_over_lora_mem']:.3f}" if "curlora_mem_over_lora_mem" in c else "-"
        lines.append(
            f"{key:<6}{c['curlora_over_floor']:>7.3f} ({c['cpu_curlora_over_floor']:.3f})"
            f"{c['curlora_over_lora']:>6.3f} ({c['cpu_curlora_over_lora']:.3f})"
            f"{c['reference_over_curlora']:>11.3f} ({c['cpu_reference_over_curlora']:.3f}){mem:>18}"
        )
    mid = f"r{meta['middle_rank']}"
    c = results["comparisons"][mid]
    lines += ["", f"fused / op-by-op CURLoRA layer at {mid}: {c['fused_over_unfused']:.3f}"
                  f" (CPU time {c['cpu_fused_over_unfused']:.3f})"]
    lines += ["", "targets:"]
    for key, t in results["targets"].items():
        lines.append(f"  {'MET   ' if t['met'] else 'MISSED'} {key}: {t['value']:.3f}")
    lines.append("targets are judged on wall-time medians; cpu x = ratio of median process CPU time")
    lines.append("peak MiB = peak RSS over the loaded base model, fresh process per variant (see README)")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2",
                   help=f"smollm2 (default), a model path, or a randomly initialised shape: {', '.join(RANDOM_SHAPES)}")
    p.add_argument("--layers", type=int, default=None,
                   help="decoder layers of a random shape (mistral-7b-shape has 32; 4 fit this machine)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--ranks", default="8,16,24")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--infer-repeats", type=int, default=20,
                   help="rounds of the (cheaper, noisier) inference comparison")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                   help="bf16 base weights (default; U stays float32). --no-bf16 for float32")
    p.add_argument("--compile", action="store_true", help="torch.compile every variant (slow to start)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-variant memory subprocesses")
    p.add_argument("--no-infer", action="store_true", help="skip the inference comparison")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--json", default=None, help="write results here (atomically)")
    p.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    p.add_argument("--probe-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_probe:
        dtype = torch.bfloat16 if args.bf16 else torch.float32
        res = memory_probe(args.model, dtype, args.memory_probe, args.probe_rank, args.batch_size, args.seq_len,
                           args.layers)
        print(json.dumps(res))
        return None
    print(f"threads: {thread_settings()}", flush=True)
    ranks = tuple(int(r) for r in args.ranks.split(","))
    results = run_benchmark(
        args.model, args.batch_size, args.seq_len, ranks, args.repeats, args.warmup, args.infer_repeats, args.bf16,
        args.compile, not args.no_memory, not args.no_infer, log=lambda s: print(s, flush=True),
        layers=args.layers,
    )
    print(format_table(results))
    if args.json:
        atomic_write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
