"""The continual-learning benchmark: tasks in sequence, every method, honest metrics.

For each method, rank, learning rate and seed: a fresh copy of the base model gets the method's
adapter; for each task in order the (continually trained) adapter learns the task under the run's
protocol (curlora.continual.protocols: with a fresh head per task, or as prompt → answer text);
then every task seen so far is scored, on held-out evaluation data and on a validation split
carved from the training data (used only to pick learning rates), and the LM perplexity is measured with the original ``lm_head`` (in a learning-rate sweep, whose
frontier reads final values, after the last task only). Each finished task is checkpointed
atomically, so a killed run resumes where it stopped and ends with the same numbers.
"""

from __future__ import annotations

import copy
import dataclasses
import fcntl
import hashlib
import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch
import torch.distributed as dist
import transformers
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn

from curlora import CURLoRAConfig, stability_diagnostics
from curlora.data import CALIBRATION_CORPUS, DataError, TaskSplits, load_corpus, load_corpus_file, load_task, load_task_file, make_validation_split
from curlora.continual.evaluation import perplexity
from curlora.continual.config import GRID_FIELDS, GRID_MAPPINGS, RUNTIME_FIELDS, ContinualConfig
from curlora.continual.frontier import analyse, chosen_rates, select_learning_rates
from curlora.continual.rundir import (
    RunFileError, check_fresh, check_tree, checkpoint_task, open_lock, read_config, read_perplexity, read_run, read_task_state,
)
from curlora.continual.methods import Adapted, BuildContext, FinishedTask
from curlora.continual.protocols import PROTOCOLS, RunState
from curlora.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text
from curlora.continual.metrics import SCHEMA_VERSION, summarize
from curlora.model import CURLoRAModel, target_layers
from curlora.pretrained import load_model_and_tokenizer, model_name
from curlora.continual.report import write_report
from curlora.continual.forward import causal_lm_of
from curlora.continual.training import (
    NonFiniteLossError,
    TrainSettings,
    bf16_supported,
    data_parallel_rank,
    derived_seed,
    train_task,
)

if TYPE_CHECKING:
    from curlora.continual.tracking import RunEvents


@dataclass
class Base:
    """What the unchanged base model gives every run of a command, computed once by whoever loaded it
    (this process, or a Ray task) and handed to the runs."""

    ppl_before: float
    before_rows: dict[int, list[float | None]]  # per seed: the accuracy row before training
    base_cache: dict[tuple, Any]  # what the base model computed (split features, zero-shot scores)
    described: dict[str, Any]  # results.json's model, protocol, tasks and corpus


@dataclass(frozen=True)
class RunSpec:
    method: str
    rank: int | None
    lr: float | None
    u_penalty: float
    seed: int

    @property
    def label(self) -> str:
        """The method as reported: λ > 0 makes the paper's Eq. 11 objective a method of its own."""
        return f"{self.method}+eq11(λ={self.u_penalty:g})" if self.u_penalty else self.method

    @property
    def key(self) -> str:
        parts = [self.method.replace(":", "-")]
        if self.rank is not None:
            parts.append(f"r{self.rank}")
        if self.lr is not None:
            parts.append(f"lr{self.lr:g}")
        if self.u_penalty:
            parts.append(f"lam{self.u_penalty:g}")
        return "_".join(parts + [f"s{self.seed}"])


def run_specs(config: ContinualConfig, chosen: Mapping[tuple, Any] | None = None) -> list[RunSpec]:
    """Every run of a config: each method at each of the sweep's values that apply to it, for each of
    ``seeds``; given ``chosen`` ((method label, rank) -> the rate validation chose among those runs,
    :meth:`ContinualRunner.grid_choice`), then each of ``confirm_seeds`` at the chosen rates only."""
    specs = []
    for seed in config.seeds:
        for name in config.methods:
            method = config.method(name)
            ranks = config.ranks if method.takes_rank else [None]
            penalties = config.u_penalties if method.takes_u_penalty else [0.0]
            for rank in ranks:
                for lr in config.rates_for(name, rank) if method.takes_lr else [None]:
                    for penalty in penalties:
                        specs.append(RunSpec(name, rank, lr, penalty, seed))
    if chosen is not None:
        grid = [spec for spec in specs if spec.seed == config.seeds[0]]
        specs += [dataclasses.replace(spec, seed=seed) for seed in config.confirm_seeds for spec in grid
                  if (spec.label, spec.rank) in chosen and chosen[(spec.label, spec.rank)] == spec.lr]
    return specs


def build_method(lm: nn.Module, spec: RunSpec, config: ContinualConfig,
                 calibration_ids: torch.Tensor | None = None) -> Adapted:
    """A fresh copy of the base LM, prepared by ``spec``'s method (see curlora.continual.methods)."""
    knobs = {"ewc_lambda": config.ewc_lambda, "ewc_fisher_examples": config.ewc_fisher_examples,
             "replay_per_task": config.replay_per_task, "olora_lambda": config.olora_lambda, "k_shot": config.k_shot}
    context = BuildContext(rank=spec.rank, seed=spec.seed, alpha=config.alpha, target_modules=config.target_modules,
                           knobs=knobs, calibration_ids=None if calibration_ids is None else lambda: calibration_ids)
    return config.method(spec.method).adapt(lm, context, config.peft_kwargs.get(spec.method))


def calibration_windows(tokenizer, samples: int, tokens: int) -> torch.Tensor:
    """``samples`` consecutive windows of ``tokens`` token ids (samples × tokens) from the start of
    CALIBRATION_CORPUS, the text calibrating methods read at build time (never a task or the
    perplexity corpus: the config refuses that)."""
    text = load_corpus(CALIBRATION_CORPUS, "offline", max_chars=10 * samples * tokens)
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    if ids.numel() < samples * tokens:
        raise DataError(
            f"calibration corpus {CALIBRATION_CORPUS!r} has {ids.numel()} tokens, fewer than corda_samples × "
            f"corda_sample_tokens = {samples} × {tokens}; lower either."
        )
    return ids[: samples * tokens].reshape(samples, tokens)


def init_data_parallel(device: str) -> torch.device:
    """Join the process group that ``torchrun`` / ``accelerate launch`` describe (WORLD_SIZE > 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    resolved = torch.device(device)
    if resolved.type == "cuda" and resolved.index is None and dist.is_initialized():
        resolved = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return resolved


def rank_divergence(tensors: list[torch.Tensor]) -> float:
    """Largest difference between any process's trained tensors and rank 0's (0.0 when in sync)."""
    flat = torch.cat([t.detach().reshape(-1).float() for t in tensors])
    reference = flat.clone()
    dist.broadcast(reference, 0)
    difference = (flat - reference).abs().max()
    dist.all_reduce(difference, op=dist.ReduceOp.MAX)
    return float(difference)


# -- the runner ---------------------------------------------------------------------------------
class ContinualRunner:
    """Runs every RunSpec of a config into ``run_dir``; finished work is never redone."""

    def __init__(self, config: ContinualConfig, run_dir: str | Path, resume: bool = False) -> None:
        self.config = config
        self.run_dir = Path(run_dir)
        self.device = init_data_parallel(config.device)
        # Under torchrun every process trains its share of each batch; only rank 0 writes files.
        self.rank, self.world = data_parallel_rank()
        self.is_main = self.rank == 0
        if self.world > 1 and ((config.workers or 1) > 1 or config.executor != "local"):
            chosen = f"executor={config.executor}" if config.executor != "local" else f"workers={config.workers}"
            raise ValueError(f"{chosen} cannot combine with data parallel ({self.world} processes): use one.")
        self._check_run_dir(resume)
        self.bf16 = bf16_supported(self.device) if config.bf16 is None else config.bf16
        self._lock = None  # the run directory's lock file, held while this command runs

    # setup ------------------------------------------------------------------------------------
    def _check_run_dir(self, resume: bool) -> None:
        """Refuse a run directory that cannot take this run. It only reads: a refused command leaves an
        existing directory byte-identical, and nothing is created until every check has passed."""
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise FileExistsError(f"--output-dir {self.run_dir} is a file; choose a directory.")
        saved = self.run_dir / "config.yaml"
        self._fresh = not saved.is_file()
        self._regrid = False
        if self._fresh:
            check_fresh(self.run_dir)
            return
        if not resume:
            raise FileExistsError(
                f"{self.run_dir} already holds a run; pass --resume to continue it, or choose "
                f"another --output-dir."
            )
        check_tree(self.run_dir)
        # A field added since that run was made counts as its default.
        loaded = {**ContinualConfig().to_dict(), **read_config(saved)}
        current = self.config.to_dict()
        fixed = [k for k in current if k not in RUNTIME_FIELDS + GRID_FIELDS + GRID_MAPPINGS]
        changed = [k for k in fixed if loaded.get(k) != current[k]]
        changed += [f"{k}[{name!r}]" for k in GRID_MAPPINGS for name, value in (loaded.get(k) or {}).items()
                    if name in current[k] and current[k][name] != value]
        if changed:
            raise ValueError(
                f"Cannot resume {self.run_dir}: its config differs in {sorted(changed)}. Resume with the "
                f"same settings (only {', '.join(GRID_FIELDS)} may change, to add or drop runs, and new "
                f"entries of {', '.join(GRID_MAPPINGS)}), or start a new --output-dir."
            )
        # More seeds, rates or methods: the finished runs stay valid, and config.yaml will say the new grid.
        self._regrid = any(loaded.get(k) != current[k] for k in GRID_FIELDS + GRID_MAPPINGS)

    def _create_run_dir(self) -> None:
        """Write ``config.yaml`` of a fresh run (or a resumed one's new grid), once the model and the data
        have passed their checks."""
        # Every rank looked (in __init__) before this barrier, so none mistakes this run for an old one.
        self._barrier()
        if (self._fresh or self._regrid) and self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._lock_run_dir()  # before anything is written: a second command must not replace config.yaml
            atomic_write_text(self.run_dir / "config.yaml", yaml.safe_dump(self.config.to_dict(), sort_keys=False))
        self._barrier()

    def _check_ranks(self, lm: nn.Module) -> None:
        """Every rank fits the adapted layers (r ≤ their smaller side), judged from their shapes alone."""
        cfg = self.config
        ranked = [cfg.method(name) for name in cfg.methods if cfg.method(name).takes_rank]
        if not ranked:
            return
        widest = max(ranked, key=lambda m: m.kwargs.get("rank_multiplier", 1))
        multiplier = widest.kwargs.get("rank_multiplier", 1)
        try:
            target_layers(lm, CURLoRAConfig(r=max(cfg.ranks) * multiplier, target_modules=cfg.target_modules))
        except ValueError as error:
            scaled = f" (method {widest.name!r} adapts at {multiplier} × each of ranks)" if multiplier > 1 else ""
            raise ValueError(f"ranks / target_modules do not fit the model{scaled}: {error}") from error

    def _say(self, message: str) -> None:
        if self.is_main:
            print(message, flush=True)

    def _barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def _load_data(self, tokenizer) -> None:
        cfg = self.config
        # Load enough training rows that ``examples_per_task`` remain after carving the validation split.
        wanted = round(cfg.examples_per_task / (1 - cfg.validation_fraction))
        common = {"seed": cfg.data_seed, "max_train": wanted, "max_eval": cfg.eval_examples}
        loaded: list[TaskSplits] = [load_task(name, cfg.source, cfg.data_dir, **common) for name in cfg.tasks]
        loaded += [load_task_file(**spec, **common) for spec in cfg.task_files]
        self.tasks, self.validation = [], []
        for task in loaded:
            train, validation = make_validation_split(
                task.train, cfg.validation_fraction, cfg.data_seed, origin=f"task {task.name!r} training data"
            )
            self.tasks.append(TaskSplits(task.name, task.label_names, train, task.eval, notes=task.notes,
                                         prompt=task.prompt))
            self.validation.append(validation)
        self.eval_splits = [task.eval for task in self.tasks]
        self.protocol = PROTOCOLS[cfg.protocol](self.tasks, tokenizer, cfg, self.device, self.bf16)
        # Tokenize only what will be scored (no tokenizer packs more than 10 characters a token).
        max_chars = 10 * cfg.ppl_max_tokens if cfg.ppl_max_tokens else None
        if cfg.corpus_file is not None:
            text = load_corpus_file(cfg.corpus_file, max_chars=max_chars)
        else:
            text = load_corpus(cfg.corpus, cfg.source, cfg.data_dir, max_chars=max_chars)
        ids = tokenizer(text, return_tensors="pt").input_ids[0]
        self.corpus_ids = ids[: cfg.ppl_max_tokens] if cfg.ppl_max_tokens else ids
        needed = any(cfg.method(name).needs_calibration for name in cfg.methods)
        self.calibration_ids = calibration_windows(tokenizer, cfg.corda_samples, cfg.corda_sample_tokens) if needed else None

    def _corpus_entry(self) -> dict[str, Any]:
        """What results.json says about the perplexity corpus. A user's file is named by its name, size
        and sha256 (the path as given stays in the config): results that travel carry no machine's
        directory layout, and whoever reads them can still tell which text was scored."""
        cfg = self.config
        entry: dict[str, Any] = {"name": cfg.corpus}
        if cfg.corpus_file is not None:
            data = Path(cfg.corpus_file).expanduser().read_bytes()
            entry = {"name": Path(cfg.corpus_file).name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        return {**entry, "tokens_scored": int(self.corpus_ids.numel() - 1),
                "window": cfg.ppl_window, "stride": cfg.ppl_stride}

    def _perplexity(self, model: nn.Module) -> float:
        cfg = self.config
        return perplexity(
            causal_lm_of(model), self.corpus_ids, cfg.ppl_window, cfg.ppl_stride,
            progress=cfg.progress and self.is_main,
        ).perplexity

    # one run ----------------------------------------------------------------------------------
    def _accuracies(self, adapted: Adapted, state: RunState, splits: str, upto: int, base: bool) -> list[float | None]:
        """Accuracy of tasks 0..upto (inclusive) on ``splits`` ("eval_splits" or "validation"), each
        in the state its method evaluates it in; None for tasks not yet seen. ``base``: the model's
        backbone is the unchanged base model (what it computes is cached across runs)."""
        row: list[float | None] = []
        for j in range(len(self.tasks)):
            if j > upto:
                row.append(None)
                continue
            with adapted.evaluating(j):
                row.append(state.accuracy(adapted.model, j, splits, getattr(self, splits)[j], base,
                                          adapted.demonstrations))
        return row

    def _perplexity_curve(self, spec: RunSpec) -> bool:
        """Whether a run scores perplexity after every task: as configured, else not for a method swept
        over rates (its frontier reads only each rate's final value)."""
        if self.config.ppl_after_every_task is not None:
            return self.config.ppl_after_every_task
        return not (self.config.method(spec.method).takes_lr and len(self.config.rates_for(spec.method, spec.rank)) > 1)

    def _events(self, spec: RunSpec, state: dict[str, Any]) -> RunEvents | None:
        """The run's live TensorBoard log (curlora.continual.tracking) when ``log_dir`` is set, on the
        process that writes files; else None, and TensorBoard is never imported."""
        if self.config.log_dir is None or not self.is_main:
            return None
        from curlora.continual.tracking import RunEvents

        return RunEvents(self.config.log_dir, spec.key, [t.name for t in self.tasks], self.ppl_before, state)

    def run_one(self, spec: RunSpec, base_lm: nn.Module) -> dict[str, Any]:
        cfg = self.config
        ckpt_dir = self.run_dir / "checkpoints" / spec.key
        torch.manual_seed(derived_seed(spec.seed, "init", spec.key))
        method = cfg.method(spec.method)
        building = time.perf_counter()  # a method's set-up (SVDs, CorDA's calibration pass) is part of its cost
        adapted = build_method(copy.deepcopy(base_lm), spec, cfg, self.calibration_ids)
        build_s = time.perf_counter() - building
        model = adapted.model.to(self.device)
        protocol = self.protocol.start_run(spec.seed, base_lm)
        settings = TrainSettings(
            lr=spec.lr or 0.0, head_lr=cfg.head_lr, epochs=cfg.epochs, batch_size=cfg.batch_size,
            warmup_steps=cfg.warmup_steps, max_warmup_fraction=cfg.max_warmup_fraction,
            weight_decay=cfg.weight_decay, u_penalty=spec.u_penalty, bf16=self.bf16,
        )
        state = self._resume_state(ckpt_dir, adapted, protocol)
        if state is None:
            state = {
                "accuracy_matrix": [self.before_row],
                "ppl_after_task": [],
                "final_losses": [],
                "train_loss": [],
                "elapsed_s": build_s,
                "tasks_done": 0,
            }
        started = time.perf_counter() - state["elapsed_s"]
        self._reset_peak_memory()
        curve = self._perplexity_curve(spec)
        events = self._events(spec, state)
        try:
            for i in range(state["tasks_done"], len(self.tasks)):
                task = self.tasks[i]
                torch.manual_seed(derived_seed(spec.seed, "task", i, spec.key))
                generator = torch.Generator().manual_seed(derived_seed(spec.seed, "shuffle", i))
                adapted.start_task(i)
                if method.frozen_backbone and not protocol.task_parameters(i):
                    losses = []  # a floor that trains nothing (zero-shot, k-shot)
                else:
                    losses = train_task(
                        model, [(e, i) for e in task.train] + adapted.replay_examples(), protocol.loss,
                        protocol.task_parameters(i), settings, generator, adapted.u_params,
                        progress=cfg.progress and self.is_main, description=f"{spec.key} · {task.name}",
                        penalty=adapted.penalty, on_step=events.on_step(task.name) if events else None,
                    )
                adapted.end_task(i, FinishedTask(task.train, i, protocol.loss))
                test_row = self._accuracies(adapted, protocol, "eval_splits", i, method.frozen_backbone)
                # A frozen backbone cannot change the LM: its perplexity is the base model's by construction.
                ppl = self.ppl_before if method.frozen_backbone else None
                if ppl is None and (curve or i == len(self.tasks) - 1):
                    ppl = self._perplexity(model)
                state["accuracy_matrix"].append(test_row)
                state["ppl_after_task"].append(ppl)
                state["final_losses"].append(sum(losses[-10:]) / len(losses[-10:]) if losses else None)
                state.setdefault("train_loss", []).append(losses)
                state["tasks_done"] = i + 1
                state["elapsed_s"] = time.perf_counter() - started
                self._checkpoint(ckpt_dir, adapted, protocol, state)
                if events is not None:
                    events.task_done(state)
                seen = ", ".join(f"{self.tasks[j].name} {test_row[j]:.3f}" for j in range(i + 1))
                scored = "not scored (only after the last task in this run)" if ppl is None else f"{ppl:.2f}"
                self._say(f"[{spec.key}] after {task.name}: {seen}; perplexity {self.ppl_before:.2f} → {scored}")
        finally:
            if events is not None:
                events.close()
        # Validation rows (carved from training data) are only for choosing rates: the final state suffices.
        validation = self._accuracies(adapted, protocol, "validation", len(self.tasks) - 1, method.frozen_backbone)
        checks = protocol.final_checks(model, self.eval_splits, adapted.demonstrations, adapted.evaluating)
        diagnostics = stability_diagnostics(model) if isinstance(model, CURLoRAModel) else []
        trained = [p for p in model.parameters() if p.requires_grad] + [
            t.to(self.device) for t in protocol.state_dict().values()]
        data_parallel = {"world_size": self.world}
        if self.world > 1:
            data_parallel["max_difference_across_ranks"] = rank_divergence(trained)
        return {
            "method": spec.label, "base_method": spec.method, "rank": spec.rank, "seed": spec.seed,
            "lr": spec.lr, "head_lr": cfg.head_lr, "u_penalty": spec.u_penalty, "status": "ok", "error": None,
            "accuracy_matrix": state["accuracy_matrix"],
            "validation_accuracy": validation,
            "perplexity": {"before": self.ppl_before, "after_task": state["ppl_after_task"],
                           "final": state["ppl_after_task"][-1]},
            "final_train_loss": state["final_losses"],
            "train_loss": state.get("train_loss"),
            **checks,
            "trainable_params": {
                "adapter": sum(p.numel() for p in model.parameters() if p.requires_grad),
                "heads": protocol.num_parameters(),
            },
            "frozen_backbone": method.frozen_backbone,
            "stored_per_task": adapted.stored_per_task(),
            "rows_kept_per_task": adapted.rows_kept_per_task(),
            "needs_task_identity": adapted.needs_task_identity,
            "diagnostics": diagnostics,
            "data_parallel": data_parallel,
            "wall_time_s": time.perf_counter() - started,
            "peak_memory_mb": self._peak_memory_mb(),
        }

    def _reset_peak_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:  # Linux: "5" resets the process's peak resident set size (VmHWM)
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass

    def _peak_memory_mb(self) -> float:
        """Peak CUDA memory allocated, or the process's peak resident set size since the run began."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        try:
            status = Path("/proc/self/status").read_text()
            return int(status.split("VmHWM:")[1].split()[0]) / 1024
        except (OSError, IndexError):
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # since process start

    def _checkpoint(self, ckpt_dir: Path, adapted: Adapted, protocol: RunState, state: dict) -> None:
        """Tensors first, then the state that points at them: a half-written task is never read back."""
        if not self.is_main:
            return
        i = state["tasks_done"]
        tensors = {f"model.{k}": v for k, v in adapted.checkpoint_tensors().items()}
        tensors.update({f"heads.{k}": v for k, v in protocol.state_dict().items()})
        atomic_write_bytes(ckpt_dir / f"task{i}.safetensors", save(tensors))
        atomic_write_json(ckpt_dir / f"task{i}.json", state)
        for older in range(1, i):
            (ckpt_dir / f"task{older}.safetensors").unlink(missing_ok=True)

    def _resume_state(self, ckpt_dir: Path, adapted: Adapted, protocol: RunState) -> dict | None:
        done = sorted(checkpoint_task(p) for p in ckpt_dir.glob("task*.json")) if ckpt_dir.is_dir() else []
        for i in reversed(done):
            tensors_path = ckpt_dir / f"task{i}.safetensors"
            if not tensors_path.is_file():
                continue
            state = read_task_state(ckpt_dir / f"task{i}.json", i)
            try:
                tensors = load_file(str(tensors_path))
                adapted.resume(i, [FinishedTask(t.train, j, protocol.loss) for j, t in enumerate(self.tasks[:i])])
                adapted.load_checkpoint({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
                protocol.load_state_dict({k[len("heads."):]: v for k, v in tensors.items() if k.startswith("heads.")})
            except (SafetensorError, RuntimeError, KeyError) as error:  # damaged, or another run's tensors
                raise RunFileError(f"{tensors_path} does not fit this run ({error}); delete {ckpt_dir} to "
                                   f"train the run again.") from None
            self._say(f"[{ckpt_dir.name}] resuming after task {i}")
            return state
        return None

    # all runs ---------------------------------------------------------------------------------
    def _prepare(self) -> nn.Module:
        """Load and check the model and the data (nothing is written); the base LM."""
        cfg = self.config
        if not cfg.progress:  # transformers' own "Loading weights" bar, once per worker, in the logs
            transformers.utils.logging.disable_progress_bar()
        base_lm, tokenizer = load_model_and_tokenizer(cfg.model, device=self.device)
        self._check_ranks(base_lm)
        if cfg.quantize:  # every run deep-copies this quantized base (bitsandbytes layers copy fine)
            from curlora.quantization import quantize_model

            quantize_model(base_lm, cfg.quantize)
        self.model_name = model_name(cfg.model)
        self._load_data(tokenizer)
        return base_lm

    def run(self) -> dict[str, Any] | None:
        """Every run of the config; the results (None on processes other than rank 0)."""
        try:
            return self._run_locked()
        finally:  # the lock goes with the command, and with this call when a program makes several
            if self._lock is not None:
                self._lock.close()
                self._lock = None

    def _run_locked(self) -> dict[str, Any] | None:
        from curlora.continual.executors import executor_for

        if self.run_dir.is_dir():  # a resumed run: refuse at once if another command is on it
            self._lock_run_dir()
        runs_dir = self.run_dir / "runs"
        pending = self._missing(run_specs(self.config))
        seeds = [spec.seed for spec in pending]
        if self.config.confirm_seeds:  # which confirm runs are due is known once the grid is complete
            seeds += self.config.confirm_seeds if pending else [spec.seed for spec in self._missing(self._specs())]
        with executor_for(self.config) as executor:
            # The model and the data are loaded and checked (nothing is written) before the directory is made.
            base = executor.base(self, list(dict.fromkeys(seeds)))
            self._create_run_dir()
            self._lock_run_dir()
            if self.is_main and not (self.run_dir / "base_perplexity.json").is_file():
                atomic_write_json(self.run_dir / "base_perplexity.json", {"value": base.ppl_before})
            for task in base.described["tasks"]:
                self._say(f"task {task['name']}: train {task['n_train']}, validation {task['n_validation']}, "
                          f"eval {task['n_eval']}, majority-class accuracy {task['majority_accuracy']:.3f}")
            executor.run(self, pending, base)
            specs = self._specs()  # with confirm_seeds, the finished grid says which confirming runs are due
            if self.config.confirm_seeds:
                executor.run(self, self._missing(specs), base)
        if not self.is_main:
            return None
        results = self._results(runs_dir, base.described, specs)
        atomic_write_json(self.run_dir / "results.json", results)
        write_report(results, self.run_dir)
        return results

    def _base_perplexity(self, base_lm: nn.Module) -> float:
        """The base model's perplexity: computed once per run directory, then read back."""
        path = self.run_dir / "base_perplexity.json"
        return read_perplexity(path) if path.is_file() else self._perplexity(base_lm)

    def _base(self, base_lm: nn.Module, seeds: list[int]) -> Base:
        """The base model's perplexity (read back on --resume), its accuracy row before training for
        each of ``seeds`` (each seed's fresh protocol state: untrained heads, or zero-shot) and what
        it computed on the way; nothing is written."""
        self.ppl_before = self._base_perplexity(base_lm)
        before_rows = {seed: self._accuracies(Adapted(base_lm), self.protocol.start_run(seed, base_lm),
                                              "eval_splits", len(self.tasks) - 1, True) for seed in seeds}
        described = {
            "model": self.model_name,
            "protocol": self.protocol.describe(),
            "tasks": [
                {"name": t.name, "label_names": t.label_names, "n_train": len(t.train),
                 "n_validation": len(v), "n_eval": len(t.eval), "majority_accuracy": t.majority_accuracy(),
                 "notes": t.notes}
                for t, v in zip(self.tasks, self.validation)
            ],
            "corpus": self._corpus_entry(),
        }
        return Base(self.ppl_before, before_rows, self.protocol.base_cache, described)

    def _lock_run_dir(self) -> None:
        """Hold an exclusive lock on the run directory for this process's life (the kernel drops it
        when the process ends, however it ends): a second command on the same directory would
        train the same runs again and overwrite their files."""
        if not self.is_main or self._lock is not None:
            return
        self._lock = open_lock(self.run_dir / ".lock")  # held until run() ends
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.seek(0)
            holder = self._lock.read().strip() or "unknown"
            self._lock.close()
            self._lock = None
            raise FileExistsError(
                f"{self.run_dir} is in use by a running curlora command (pid {holder}); wait for it to "
                f"finish, or stop it (its finished runs are kept) and rerun with --resume."
            ) from None
        if self._fresh and (self.run_dir / "config.yaml").exists():
            self._lock.close()
            self._lock = None
            raise FileExistsError(f"another curlora command started a run in {self.run_dir} while this one was "
                                  f"preparing; choose another --output-dir, or --resume that run.")
        self._lock.truncate(0)
        self._lock.write(str(os.getpid()))
        self._lock.flush()

    def _train(self, spec: RunSpec, base_lm: nn.Module, before_row: list[float | None]) -> dict[str, Any]:
        """One run's result (a diverged run's as failed)."""
        self.before_row = before_row
        try:
            result = self.run_one(spec, base_lm)
        except NonFiniteLossError as error:
            self._say(f"[{spec.key}] stopped: {error}")
            result = {"method": spec.label, "base_method": spec.method, "rank": spec.rank,
                      "seed": spec.seed, "lr": spec.lr, "head_lr": self.config.head_lr,
                      "u_penalty": spec.u_penalty, "status": "failed", "error": str(error)}
        result["threads"] = torch.get_num_threads()
        return result

    def _save(self, spec: RunSpec, result: dict[str, Any]) -> None:
        """A finished run's result as ``runs/<key>.json``: from then on --resume skips the run."""
        if self.is_main:
            atomic_write_json(self.run_dir / "runs" / f"{spec.key}.json", result)
        self._barrier()

    def _missing(self, specs: list[RunSpec]) -> list[RunSpec]:
        """The runs of ``specs`` without a result file (what --resume still trains)."""
        return [spec for spec in specs if not (self.run_dir / "runs" / f"{spec.key}.json").is_file()]

    def grid_choice(self) -> dict[tuple, Any]:
        """(method label, rank) -> the rate the finished runs of ``seeds`` chose on validation (a method
        none of whose runs finished has none)."""
        tasks = len(self.config.tasks) + len(self.config.task_files)
        runs_dir = self.run_dir / "runs"
        return chosen_rates(select_learning_rates(
            [read_run(runs_dir / f"{spec.key}.json", tasks) for spec in run_specs(self.config)
             if (runs_dir / f"{spec.key}.json").is_file()]))

    def _specs(self) -> list[RunSpec]:
        """Every run of the experiment: the grid over ``seeds`` and, with ``confirm_seeds``, those seeds at
        the rates the grid chose."""
        return run_specs(self.config, self.grid_choice() if self.config.confirm_seeds else None)

    def _results(self, runs_dir: Path, described: dict[str, Any], specs: list[RunSpec]) -> dict[str, Any]:
        cfg = self.config
        runs = [read_run(runs_dir / f"{spec.key}.json", len(described["tasks"])) for spec in specs]
        results = {
            "schema_version": SCHEMA_VERSION,
            "config": cfg.to_dict(),
            **described,
            "runs": runs,
            "frontier": analyse(runs, cfg.seeds),
        }
        results["summary"] = summarize(results)
        return results

