"""One run: a fresh copy of the base model gets the run's method; then, task by task in order, the
(continually trained) adapter learns the task under the run's protocol, every task seen so far is
scored, the perplexity is measured where due, and the task is checkpointed. A resumed run starts after
its latest checkpoint and ends with the numbers it would have had."""

from __future__ import annotations

import copy
import resource
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from curlora import stability_diagnostics
from curlora.continual.checkpoints import load_latest, save_task
from curlora.continual.config import ContinualConfig
from curlora.continual.methods import Adapted, BuildContext, FinishedTask
from curlora.continual.parallel import rank_divergence
from curlora.continual.plan import RunSpec
from curlora.continual.prepare import Base, Prepared
from curlora.continual.training import TrainSettings, derived_seed, train_task
from curlora.model import CURLoRAModel

if TYPE_CHECKING:
    from curlora.continual.tracking import RunEvents


def build_method(lm: nn.Module, spec: RunSpec, config: ContinualConfig,
                 calibration_ids: torch.Tensor | None = None) -> Adapted:
    """``lm`` (a fresh copy of the base LM) prepared by ``spec``'s method (see curlora.continual.methods)."""
    knobs = {"ewc_lambda": config.ewc_lambda, "ewc_fisher_examples": config.ewc_fisher_examples,
             "replay_per_task": config.replay_per_task, "olora_lambda": config.olora_lambda, "k_shot": config.k_shot}
    context = BuildContext(rank=spec.rank, seed=spec.seed, alpha=config.alpha, target_modules=config.target_modules,
                           knobs=knobs, calibration_ids=None if calibration_ids is None else lambda: calibration_ids)
    return config.method(spec.method).adapt(lm, context, config.peft_kwargs.get(spec.method))


def train_run(prepared: Prepared, spec: RunSpec, base: Base, ckpt_dir: Path) -> dict[str, Any]:
    """The result of ``spec``'s run, resumed from its latest checkpoint in ``ckpt_dir`` if it has one. Its
    accuracy rows and per-task lists are in the order it learned the tasks (``task_order`` in the result)."""
    prepared = prepared.in_order(spec.sequence)
    run = Run(prepared, spec, base)
    state = load_latest(ckpt_dir, run.adapted, run.protocol, prepared.data.tasks)
    if state is None:
        before = base.before_rows[spec.seed]
        before = before if spec.sequence is None else [before[k] for k in spec.sequence]
        state = {"accuracy_matrix": [before], "ppl_after_task": [], "final_losses": [],
                 "train_loss": [], "elapsed_s": run.build_s, "tasks_done": 0}
    else:
        prepared.parallel.say(f"[{ckpt_dir.name}] resuming after task {state['tasks_done']}")
    started = time.perf_counter() - state["elapsed_s"]
    reset_peak_memory(prepared.device)
    events = run.events(state)
    try:
        for i in range(state["tasks_done"], len(prepared.data.tasks)):
            losses = run.learn(i)
            row, ppl = run.score(i)
            run.record(state, losses, row, ppl)
            state["elapsed_s"] = time.perf_counter() - started
            if prepared.parallel.is_main:
                save_task(ckpt_dir, run.adapted, run.protocol, state)
            if events is not None:
                events.task_done(state)
            run.say_scores(i, row, ppl)
    finally:
        if events is not None:
            events.close()
    return run.result(state, started)


class Run:
    """One run's model, method and protocol state, and the steps each task goes through: learn, score,
    record (``train_run`` puts them in order, with checkpoints and logs between)."""

    def __init__(self, prepared: Prepared, spec: RunSpec, base: Base) -> None:
        cfg = prepared.config
        self.prepared, self.spec, self.base = prepared, spec, base
        self.method = cfg.method(spec.method)
        torch.manual_seed(derived_seed(spec.seed, "init", spec.key))
        building = time.perf_counter()  # a method's set-up (SVDs, CorDA's calibration pass) is part of its cost
        self.adapted = build_method(copy.deepcopy(prepared.model), spec, cfg, prepared.data.calibration_ids)
        self.build_s = time.perf_counter() - building
        self.model = self.adapted.model.to(prepared.device)
        self.protocol = prepared.protocol.start_run(spec.seed, prepared.model)
        self.settings = TrainSettings(
            lr=spec.lr or 0.0, head_lr=cfg.head_lr, epochs=cfg.epochs, batch_size=cfg.batch_size,
            warmup_steps=cfg.warmup_steps, max_warmup_fraction=cfg.max_warmup_fraction,
            weight_decay=cfg.weight_decay, u_penalty=spec.u_penalty, bf16=prepared.bf16,
        )
        self.on_step = None  # set by events(): the live log's per-step callback

    @property
    def perplexity_curve(self) -> bool:
        """Whether the run scores perplexity after every task: as configured, else not for a method swept
        over rates (its frontier reads only each rate's final value)."""
        cfg = self.prepared.config
        if cfg.ppl_after_every_task is not None:
            return cfg.ppl_after_every_task
        return not (self.method.takes_lr and len(cfg.rates_for(self.spec.method, self.spec.rank)) > 1)

    def events(self, state: dict[str, Any]) -> RunEvents | None:
        """The run's live TensorBoard log (curlora.continual.tracking) when ``log_dir`` is set, on the
        process that writes files; else None, and TensorBoard is never imported."""
        cfg = self.prepared.config
        if cfg.log_dir is None or not self.prepared.parallel.is_main:
            return None
        from curlora.continual.tracking import RunEvents

        events = RunEvents(cfg.log_dir, self.spec.key, [t.name for t in self.prepared.data.tasks],
                           self.base.ppl_before, state)
        self.on_step = events.on_step
        return events

    def learn(self, i: int) -> list[float]:
        """Step ``i`` of the sequence learned: task ``i`` (with the method's replay rows), or whichever
        tasks the method learns at this step (a multitask run learns all at the first and none after);
        its step losses."""
        tasks, protocol, adapted = self.prepared.data.tasks, self.protocol, self.adapted
        torch.manual_seed(derived_seed(self.spec.seed, "task", i, self.spec.key))
        generator = torch.Generator().manual_seed(derived_seed(self.spec.seed, "shuffle", i))
        adapted.start_task(i)
        learned = adapted.training_tasks(i, len(tasks))
        rows = [(e, j) for j in learned for e in tasks[j].train] + (adapted.replay_examples() if learned else [])
        parameters = protocol.task_parameters(learned)
        if not rows or (self.method.frozen_backbone and not parameters):
            losses = []  # nothing to learn at this step: a floor (zero-shot, k-shot), a multitask run's later steps
        else:
            losses = train_task(
                self.model, rows, protocol.loss, parameters, self.settings, generator, adapted.u_params,
                progress=self.prepared.config.progress and self.prepared.parallel.is_main,
                description=f"{self.spec.key} · {' + '.join(tasks[j].name for j in learned)}",
                penalty=adapted.penalty, on_step=self.on_step(tasks[i].name) if self.on_step else None,
            )
        adapted.end_task(i, FinishedTask(tasks[i].train, i, protocol.loss))
        return losses

    def score(self, i: int) -> tuple[list[float | None], float | None]:
        """After task ``i``: the accuracy of every task seen so far, and the perplexity where it is due."""
        row = self.prepared.accuracies(self.adapted, self.protocol, "eval_splits", i, self.method.frozen_backbone)
        # A frozen backbone cannot change the LM: its perplexity is the base model's by construction.
        ppl = self.base.ppl_before if self.method.frozen_backbone else None
        if ppl is None and (self.perplexity_curve or i == len(self.prepared.data.tasks) - 1):
            ppl = self.prepared.perplexity(self.model)
        return row, ppl

    @staticmethod
    def record(state: dict[str, Any], losses: list[float], row: list[float | None], ppl: float | None) -> None:
        """One more task in the run's state (what its checkpoint saves)."""
        state["accuracy_matrix"].append(row)
        state["ppl_after_task"].append(ppl)
        state["final_losses"].append(sum(losses[-10:]) / len(losses[-10:]) if losses else None)
        state.setdefault("train_loss", []).append(losses)
        state["tasks_done"] += 1

    def say_scores(self, i: int, row: list[float | None], ppl: float | None) -> None:
        tasks = self.prepared.data.tasks
        seen = ", ".join(f"{tasks[j].name} {row[j]:.3f}" for j in range(i + 1))
        scored = "not scored (only after the last task in this run)" if ppl is None else f"{ppl:.2f}"
        self.prepared.parallel.say(f"[{self.spec.key}] after {tasks[i].name}: {seen}; perplexity "
                                   f"{self.base.ppl_before:.2f} → {scored}")

    def result(self, state: dict[str, Any], started: float) -> dict[str, Any]:
        """The finished run as ``runs/<key>.json`` holds it (``started``: when its clock began)."""
        prepared, spec, adapted, model, protocol = self.prepared, self.spec, self.adapted, self.model, self.protocol
        tasks = prepared.data.tasks
        # Validation rows (carved from training data) are only for choosing rates: the final state suffices.
        validation = prepared.accuracies(adapted, protocol, "validation", len(tasks) - 1, self.method.frozen_backbone)
        checks = protocol.final_checks(model, prepared.data.eval_splits, adapted.demonstrations, adapted.evaluating,
                                       adapted.calibrated)
        diagnostics = stability_diagnostics(model) if isinstance(model, CURLoRAModel) else []
        trained = [p for p in model.parameters() if p.requires_grad] + [
            t.to(prepared.device) for t in protocol.state_dict().values()]
        data_parallel = {"world_size": prepared.parallel.world}
        if prepared.parallel.world > 1:
            data_parallel["max_difference_across_ranks"] = rank_divergence(trained)
        return {
            **identity(spec, prepared.config), "status": "ok", "error": None,
            "accuracy_matrix": state["accuracy_matrix"],
            "validation_accuracy": validation,
            "perplexity": {"before": self.base.ppl_before, "after_task": state["ppl_after_task"],
                           "final": state["ppl_after_task"][-1]},
            "final_train_loss": state["final_losses"],
            "train_loss": state.get("train_loss"),
            **checks,
            "trainable_params": {
                "adapter": sum(p.numel() for p in model.parameters() if p.requires_grad),
                "heads": protocol.num_parameters(),
            },
            "frozen_backbone": self.method.frozen_backbone,
            "ceiling": self.method.ceiling,
            "sequential": self.method.sequential,
            "stored_per_task": adapted.stored_per_task(),
            "rows_kept_per_task": adapted.rows_kept_per_task(),
            "needs_task_identity": adapted.needs_task_identity,
            "diagnostics": diagnostics,
            "data_parallel": data_parallel,
            "wall_time_s": time.perf_counter() - started,
            "peak_memory_mb": peak_memory_mb(prepared.device),
        }


def identity(spec: RunSpec, config: ContinualConfig) -> dict[str, Any]:
    """The fields that name a run in its result, finished or failed; with ``orders``, the order's name and
    the tasks' indices (into the results' ``tasks``) in the order learned."""
    return {"method": spec.label, "base_method": spec.method, "rank": spec.rank, "seed": spec.seed,
            "lr": spec.lr, "head_lr": config.head_lr, "u_penalty": spec.u_penalty, **spec.order_fields}


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: "5" resets the process's peak resident set size (VmHWM)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated, or the process's peak resident set size since the run began."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        status = Path("/proc/self/status").read_text()
        return int(status.split("VmHWM:")[1].split()[0]) / 1024
    except (OSError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # since process start
