"""QCURLoRA on SmolLM2-135M: memory, perplexity, logit error, training-step time, merge error.

Variants of the base: ``fp32`` (as loaded), ``bf16`` (``model.to(bfloat16)``, memory and
perplexity only), ``int8`` and ``nf4`` (``curlora.quantization.quantize_model``: every
``nn.Linear`` but the tied ``lm_head``).

* memory: bytes of the deduplicated state dict (parameters and buffers as stored, quantization
  scales included; the tied embedding counted once), and the size of ``torch.save`` of it.
* perplexity: WikiText-2 test, the first ``--ppl-tokens`` tokens, window 512, stride 256.
* logit error: max |logits − fp32 logits| on 4 × 64 WikiText tokens, relative to max |fp32 logits|.
* train step: CURLoRA r=16 on q/k/v, batch 4 × 64, forward + backward + AdamW step, fp32
  activations; variants interleaved (fp32 int8 nf4 fp32 int8 nf4 ...), median of ``--repeats``
  after one warm-up round; ratio to the fp32 base.
* merge: after ``--merge-steps`` training steps (lr 0.05, so U is far from zero), max |logits|
  difference of ``merge_and_unload(requantize=False)`` and ``(requantize=True)`` against the
  unmerged adapted model, next to the size of the adapter's own effect (adapted − base).
* fingerprint: the relative difference ``check_layer`` computes when an adapter trained on the
  quantized base is loaded onto the fp32 base (max and median over the adapted layers).

Threads: ``OMP_WAIT_POLICY=PASSIVE`` before torch is imported; torch's default thread count.
Run under ``flock /tmp/curlora-cpu.lock`` on the shared 2-core machines.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import copy  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from curlora import CURLoRAConfig, curlora_layers, get_curlora_model  # noqa: E402
from curlora.continual.evaluation import perplexity  # noqa: E402
from curlora.layer import weight_out_in  # noqa: E402
from curlora.pretrained import load_model_and_tokenizer  # noqa: E402
from curlora.quantization import dequantize_model, quantize_model  # noqa: E402
from curlora.saving import fingerprint  # noqa: E402

WIKITEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2" / "wiki.test.raw"


def state_bytes(model: torch.nn.Module) -> tuple[int, int]:
    seen, total = set(), 0
    state = {}
    for key, value in model.state_dict().items():
        if not isinstance(value, torch.Tensor):
            continue
        ptr = (value.untyped_storage().data_ptr(), value.dtype, tuple(value.shape))
        if ptr in seen:
            continue
        seen.add(ptr)
        state[key] = value
        total += value.numel() * value.element_size()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return total, buffer.getbuffer().nbytes


def train_step(model, optimizer, ids) -> None:
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ppl-tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--merge-steps", type=int, default=5)
    parser.add_argument("--merge-lr", type=float, default=1e-2)
    parser.add_argument("--u-std", type=float, default=0.05,
                        help="with --merge-steps 0: U ~ N(0, u_std²) instead of training (forward passes only)")
    parser.add_argument("--only", choices=["merge"], help="skip memory/perplexity/timing, run the merge part")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "quantized.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"threads: torch {torch.get_num_threads()}, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}")

    fp32, tokenizer = load_model_and_tokenizer()
    text = WIKITEXT.read_text()[:200_000]
    stream = torch.tensor(tokenizer(text)["input_ids"][: args.ppl_tokens])
    probe = stream[: 4 * 64].reshape(4, 64)
    variants = {
        "fp32": fp32,
        "bf16": copy.deepcopy(fp32).to(torch.bfloat16),
        "int8": quantize_model(copy.deepcopy(fp32), "int8"),
        "nf4": quantize_model(copy.deepcopy(fp32), "nf4"),
    }
    results: dict = {"threads": torch.get_num_threads(), "ppl_tokens": int(stream.numel()), "variants": {}}
    with torch.no_grad():
        reference = fp32(input_ids=probe).logits.float()
    for name, model in variants.items():
        if args.only:
            break
        start = time.perf_counter()
        raw, saved = state_bytes(model)
        with torch.no_grad():
            ppl = perplexity(model, stream, window=512, stride=256).perplexity
            logits = model(input_ids=probe).logits.float()
        err = float((logits - reference).abs().max() / reference.abs().max())
        results["variants"][name] = {"state_bytes": raw, "saved_bytes": saved, "ppl": ppl, "logit_rel_err": err}
        print(f"{name:5s} state {raw / 2**20:7.1f} MiB  saved {saved / 2**20:7.1f} MiB  ppl {ppl:7.3f}  "
              f"logit rel err {err:.4f}  ({time.perf_counter() - start:.0f} s)", flush=True)

    # -- training-step time, interleaved -----------------------------------------------------
    config = CURLoRAConfig(r=16)
    ids = stream[: 4 * 64].reshape(4, 64)
    if not args.only:
        timing(args, variants, config, ids, results)
    merge(args, variants, config, stream, probe, fp32, results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


def timing(args, variants, config, ids, results) -> None:
    adapted = {name: get_curlora_model(copy.deepcopy(variants[name]), config) for name in ("fp32", "int8", "nf4")}
    optimizers = {}
    for name, model in adapted.items():
        model.train()
        optimizers[name] = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        train_step(model, optimizers[name], ids)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in adapted}
    for _ in range(args.repeats):
        for name, model in adapted.items():
            start = time.perf_counter()
            train_step(model, optimizers[name], ids)
            times[name].append(time.perf_counter() - start)
    floor = statistics.median(times["fp32"])
    results["train_step_s"] = {name: statistics.median(t) for name, t in times.items()}
    for name, t in times.items():
        print(f"train step {name:5s} median {statistics.median(t):.3f} s  ratio {statistics.median(t) / floor:.2f}  "
              f"(all: {', '.join(f'{x:.2f}' for x in t)})", flush=True)


def merge(args, variants, config, stream, probe, fp32, results) -> None:
    """Merge error (with the int8 kernel's own error as the floor) and fingerprint distances."""
    results["merge"], results["fingerprint"] = {}, {}
    for name in ("int8", "nf4"):
        model = get_curlora_model(copy.deepcopy(variants[name]), config)
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.merge_lr)
        for step in range(args.merge_steps):
            train_step(model, optimizer, stream[256 * (step + 1): 256 * (step + 2)].reshape(4, 64))
        if args.merge_steps == 0:
            generator = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for _, layer in curlora_layers(model.base_model):
                    U = layer.adapters["default"].U
                    U.copy_(torch.randn(U.shape, generator=generator) * args.u_std)
        model.eval()
        with torch.no_grad():
            base_logits = variants[name].eval()(input_ids=probe).logits.float()
            unmerged = model(input_ids=probe).logits.float()
            effect = float((unmerged - base_logits).abs().max())
            # What the quantized kernel itself adds over its own dequantized weights (int8: the
            # activation rounding of bnb's eval kernel; nf4: float rounding only).
            plain = dequantize_model(copy.deepcopy(variants[name])).eval()
            floor = float((plain(input_ids=probe).logits.float() - base_logits).abs().max())
            row = {"adapter_effect": effect, "kernel_floor": floor}
            for requantize in (False, True):
                merged = copy.deepcopy(model).merge_and_unload(requantize=requantize).eval()
                row[f"requantize={requantize}"] = float((merged(input_ids=probe).logits.float() - unmerged).abs().max())
        results["merge"][name] = row
        print(f"merge {name}: adapter effect max|Δlogits| {effect:.4f}; kernel floor {floor:.4f}; merged vs "
              f"unmerged max|Δ|: full precision {row['requantize=False']:.4f}, requantized "
              f"{row['requantize=True']:.4f}", flush=True)
        diffs = []
        for layer_name, layer in curlora_layers(model.base_model):
            adapter = layer.adapters["default"]
            expected = fingerprint(adapter.C, adapter.R)
            weight = weight_out_in(fp32.get_submodule(layer_name))
            actual = fingerprint(weight[:, adapter.cols], weight[adapter.rows, :])
            diffs.append(float((actual - expected).norm() / expected.norm()))
        results["fingerprint"][name] = {"max": max(diffs), "median": statistics.median(diffs)}
        print(f"fingerprint rel. difference, {name}-trained adapter on the fp32 base: "
              f"max {max(diffs):.4f}, median {statistics.median(diffs):.4f}", flush=True)


if __name__ == "__main__":
    main()
