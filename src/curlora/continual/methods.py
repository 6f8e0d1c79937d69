"""The benchmark's methods, in one registry: each entry says how it adapts a fresh copy of the
base model and which of the sweep's axes (rank, learning rate, the paper's U penalty) apply to it.

Config validation, run planning, the report and the CLI read this registry; nothing else tests
method names. A method is named in a config as

* a registered name (``curlora``, ``lora``, ``head``, ``full``, the variants below, ...);
* ``peft:<type>``: any PEFT method (``peft:vera``), sized by the argument that type really has
  (``r`` for most, ``effective_rank`` for OSF, ...), keyword arguments in ``peft_kwargs``;
* a variant declared in the config's ``method_variants`` (``{"lora-pissa": {"base": "lora",
  "init_lora_weights": "pissa"}}``): a registered method or ``peft:<type>`` with extra keyword
  arguments for its config, run beside the plain one.

Adding a method is one :func:`register` call (and its test).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from curlora import CURLoRAConfig, get_curlora_model
from curlora.continual.training import Item, LossFn, fisher_diagonal
from curlora.data import Example
from curlora.model import DEFAULT_ADAPTER
from curlora.targets import default_targets

PEFT_PREFIX = "peft:"

# PEFT types whose size argument is not ``r`` (types with neither take no size at all).
# OSF's ``effective_rank`` is the size it *freezes* (it trains the rest), so the rank axis does not
# map onto it: the ``osf`` entry below takes it as its own knob.
PEFT_SIZE_ARGUMENTS = {
    "OSF": None,
    "BOFT": "boft_block_size",
    "C3A": "block_size",
    "FOURIERFT": "n_frequency",
    "WAVEFT": "n_frequency",
}


@dataclass(frozen=True)
class FinishedTask:
    """A task just trained, for methods that learn something from it (EWC's Fisher, replay's rows)."""

    examples: Sequence[Example]  # its training rows (never validation or evaluation rows)
    index: int  # its place in the sequence
    loss: LossFn  # the protocol's loss (a row of this task goes through its own head or prompt)


@dataclass
class Adapted:
    """A model prepared by a method, and the tensors the paper's Eq. 11 penalises (CURLoRA's U).

    Methods that keep per-task state override the hooks; the runner calls them for every method,
    and the defaults suit a method that trains one set of parameters through the whole sequence."""

    model: nn.Module
    u_params: list[torch.Tensor] = field(default_factory=list)
    needs_task_identity: bool = False  # whether evaluating a task needs to know which task it is
    demonstrations: int = 0  # training rows shown in the prompt when a task is scored (k-shot)
    calibrated: bool = False  # scored against the answers' prior on a text that says nothing (a floor)

    def start_task(self, task_index: int) -> None:
        """Called before training task ``task_index``."""

    def end_task(self, task_index: int, finished: FinishedTask) -> None:
        """Called after training task ``task_index``, before it is evaluated."""

    def penalty(self) -> torch.Tensor | None:
        """An extra loss term for this training step (None: none)."""
        return None

    def evaluating(self, task_index: int) -> AbstractContextManager:
        """The state in which task ``task_index`` is evaluated (for most methods: as it is)."""
        return nullcontext()

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """What a checkpoint must hold to resume: here every trainable parameter."""
        return {n: p.detach().cpu().contiguous() for n, p in self.model.named_parameters() if p.requires_grad}

    def load_checkpoint(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Put :meth:`checkpoint_tensors` back (after :meth:`resume` rebuilt the structure)."""
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, value in tensors.items():
                params[name].copy_(value)

    def resume(self, tasks_done: int, finished: Sequence[FinishedTask]) -> None:
        """Rebuild the per-task structure of ``tasks_done`` finished tasks before a checkpoint loads."""

    def replay_examples(self) -> list[Item]:
        """Earlier tasks' rows to mix into this task's batches, each with its own task's index."""
        return []

    def training_tasks(self, task_index: int, count: int) -> list[int]:
        """Whose training rows the model learns at step ``task_index`` of ``count`` (and whose heads
        train with them): the task itself, for any method that learns the tasks in sequence."""
        return [task_index]

    def stored_per_task(self) -> int:
        """Numbers kept for each task beyond its head (0: one shared set for all tasks)."""
        return 0

    def rows_kept_per_task(self) -> int:
        """Training rows kept from each task (a replay buffer)."""
        return 0


def task_adapter_name(task_index: int) -> str:
    """The adapter of task ``task_index`` in methods that keep one per task (the first is the default)."""
    return DEFAULT_ADAPTER if task_index == 0 else f"task{task_index}"


def _lora_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if "lora_" in n}


def _lora_numbers_per_task(model: nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if f".{DEFAULT_ADAPTER}." in n and "lora_" in n)


@dataclass
class AdapterPerTask(Adapted):
    """Methods that add an adapter (of one config) for each task, train only that one, and evaluate
    task j with adapter j: earlier tasks stay exactly as they were, at the price of needing the
    task's identity at inference. Perplexity is measured with the latest task's adapter active."""

    config: Any = None
    needs_task_identity: bool = True

    def start_task(self, task_index: int) -> None:
        name = task_adapter_name(task_index)
        if name not in self.model.peft_config:
            self.model.add_adapter(name, copy.deepcopy(self.config))
        self.model.set_adapter(name)  # only this task's adapter trains

    @contextmanager
    def evaluating(self, task_index: int) -> Iterator[None]:
        active = self.model.active_adapter
        self.model.set_adapter(task_adapter_name(task_index))
        try:
            yield
        finally:
            self.model.set_adapter(active)

    def resume(self, tasks_done: int, finished: Sequence[FinishedTask]) -> None:
        for i in range(tasks_done):
            self.start_task(i)


@dataclass
class CURBank(AdapterPerTask):
    """One CURLoRA U per task on shared C and R (``curlora-bank``): the same config and seed give every
    task the same C and R, and task t trains its own U from zero; per task it stores r² numbers per
    adapted layer."""

    def start_task(self, task_index: int) -> None:
        super().start_task(task_index)
        self.u_params = [p for p in self.model.parameters() if p.requires_grad]

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().contiguous() for n, p in self.model.named_parameters() if n.endswith(".U")}

    def stored_per_task(self) -> int:
        return sum(p.numel() for p in self.u_params)


@dataclass
class Multitask(Adapted):
    """The multi-task ceiling (``multitask``; O-LoRA's and TRACE's "MTL"): one LoRA learns every
    task's training rows at once, shuffled together, at the first step of the sequence (same epochs,
    rates and schedule), and nothing after it. No task comes after another, so forgetting is not
    defined; its final accuracies are what the adapter can learn of all tasks together."""

    def training_tasks(self, task_index: int, count: int) -> list[int]:
        return list(range(count)) if task_index == 0 else []


@dataclass
class SingleTask(AdapterPerTask):
    """The per-task ceiling (``single-task``): a fresh LoRA for each task (its own A from the run's
    seed, B = 0), trained on that task alone, each task evaluated with its own: nothing is shared and
    nothing forgotten, so its final row is the accuracy each task reaches when learned alone."""

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        return _lora_tensors(self.model)

    def stored_per_task(self) -> int:
        return _lora_numbers_per_task(self.model)


@dataclass(frozen=True)
class BuildContext:
    """What a method may read from the run: rank, seed, alpha and target layers."""

    rank: int | None
    seed: int
    alpha: float
    target_modules: list[str] | None
    knobs: Mapping[str, Any] = field(default_factory=dict)  # methods' own settings (ewc_lambda, ...)
    # Token ids (samples × tokens) of general text that is neither a task nor the perplexity corpus,
    # for methods that read the model's activations when they build (CorDA); loaded only when called.
    calibration_ids: Callable[[], torch.Tensor] | None = None


Builder = Callable[[nn.Module, BuildContext, Mapping[str, Any]], Adapted]


@dataclass(frozen=True)
class Method:
    """One registry entry. ``kwargs`` are fixed keyword arguments for the builder (variants)."""

    name: str
    summary: str
    build: Builder
    takes_rank: bool = True
    takes_lr: bool = True
    takes_u_penalty: bool = False
    frozen_backbone: bool = False  # the LM cannot change: its perplexity is the base model's
    trains_base_weights: bool = False  # needs full-precision base weights (no quantized base)
    new_parameters_per_task: bool = False  # trains fresh parameters for each task (bank, O-LoRA)
    needs_calibration: bool = False  # reads BuildContext.calibration_ids when it builds
    decomposes_base_weights: bool = False  # initialises from an SVD of the full-precision W (no quantized base)
    ceiling: bool = False  # a reference row above the methods (multitask, single-task), not a contender
    sequential: bool = True  # learns the tasks one after another (False: forgetting is not defined)
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def adapt(self, lm: nn.Module, context: BuildContext, extra: Mapping[str, Any] | None = None) -> Adapted:
        return self.build(lm, context, {**self.kwargs, **(extra or {})})

    def variant(self, name: str, summary: str, decomposes_base_weights: bool | None = None, **kwargs: Any) -> "Method":
        decomposes = self.decomposes_base_weights if decomposes_base_weights is None else decomposes_base_weights
        return dataclasses.replace(self, name=name, summary=summary, kwargs={**self.kwargs, **kwargs},
                                   decomposes_base_weights=decomposes)


REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in REGISTRY:
        raise ValueError(f"Method {method.name!r} is already registered.")
    REGISTRY[method.name] = method
    return method


# -- builders ---------------------------------------------------------------------------------
def _targets(lm: nn.Module, context: BuildContext) -> list[str] | str:
    return context.target_modules or default_targets(lm)


def _build_head(lm: nn.Module, context: BuildContext, kwargs: Mapping[str, Any]) -> Adapted:
    for p in lm.parameters():
        p.requires_grad_(False)
    return Adapted(lm)


def _build_full(lm: nn.Module, context: BuildContext, kwargs: Mapping[str, Any]) -> Adapted:
    for p in lm.parameters():
        p.requires_grad_(True)
    return Adapted(lm)


def _curlora_config(context: BuildContext, kwargs: Mapping[str, Any]) -> CURLoRAConfig:
    settings = dict(kwargs)
    rank = context.rank * settings.pop("rank_multiplier", 1)  # curlora-wide: r² grows, still tiny
    return CURLoRAConfig(r=rank, alpha=context.alpha, target_modules=context.target_modules,
                         seed=context.seed, **settings)


def _build_curlora(lm: nn.Module, context: BuildContext, kwargs: Mapping[str, Any]) -> Adapted:
    model = get_curlora_model(lm, _curlora_config(context, kwargs))
    return Adapted(model, [p for p in model.parameters() if p.requires_grad])


def _build_curlora_bank(lm: nn.Module, context: BuildContext, kwargs: Mapping[str, Any]) -> Adapted:
    config = _curlora_config(context, kwargs)
    model = get_curlora_model(lm, config)
    return CURBank(model, [p for p in model.parameters() if p.requires_grad], config=config)


def _get_peft_model(lm: nn.Module, config: Any) -> nn.Module:
    """PEFT's ``get_peft_model`` without the FutureWarning it printed into every run: PEFT (0.21)
    reads transformers' ``is_gradient_checkpointing``, an alias transformers 5 deprecated for
    ``is_activation_checkpointing``. That one warning of that one call is dropped, nothing else."""
    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        return get_peft_model(lm, config)


def _peft_model(lm: nn.Module, peft_type: str, size: dict[str, Any], context: BuildContext,
                kwargs: Mapping[str, Any]) -> Adapted:
    from peft import get_peft_config

    settings = {"peft_type": peft_type, "target_modules": _targets(lm, context), **size, **kwargs}
    return Adapted(_get_peft_model(lm, get_peft_config(settings)))


def _lora_size(lm: nn.Module, context: BuildContext) -> dict[str, Any]:
    # PEFT scales B·A by lora_alpha / r; the paper's LoRA adds alpha·x·A·B, so lora_alpha = alpha·r.
    return {"r": context.rank, "lora_alpha": context.alpha * context.rank, "lora_dropout": 0.0,
            "fan_in_fan_out": getattr(lm.config, "model_type", None) == "gpt2"}


def _build_lora(lm: nn.Module, context: BuildContext, kwargs: Mapping[str, Any]) -> Adapted:
    return _peft_model(lm, "LORA", _lora_size(lm, context), context, kwargs)


@dataclass
class OLoRA(Adapted):
    """O-LoRA (Wang et al. 2023): task t trains a LoRA of its own while the earlier tasks' LoRAs
    stay active and frozen, with loss + λ · Σ_{s<t} Σ_layers ‖A_s A_tᵀ‖²_F (the paper's L_orth)
    keeping the new A orthogonal to the earlier As. All LoRAs are summed at inference, so it does
    not need the task's identity; per task it stores one LoRA (r · (in + out) per layer)."""

    strength: float = 0.5
    lora_config: Any = None
    task_index: int = 0

    def _layers(self) -> list[nn.Module]:
        return [m for m in self.model.modules() if isinstance(getattr(m, "lora_A", None), nn.ModuleDict)]

    def start_task(self, task_index: int) -> None:
        name = task_adapter_name(task_index)
        if name not in self.model.peft_config:
            self.model.add_adapter(name, copy.deepcopy(self.lora_config))  # B = 0: output unchanged
        self.model.base_model.set_adapter([task_adapter_name(i) for i in range(task_index + 1)])
        self.task_index = task_index
        for param_name, param in self.model.named_parameters():
            param.requires_grad_(f".{name}." in param_name)

    def penalty(self) -> torch.Tensor | None:
        earlier = [task_adapter_name(i) for i in range(self.task_index)]
        if not earlier:
            return None
        current = task_adapter_name(self.task_index)
        total = sum((layer.lora_A[s].weight @ layer.lora_A[current].weight.t()).pow(2).sum()
                    for layer in self._layers() for s in earlier)
        return self.strength * total

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        return _lora_tensors(self.model)

    def resume(self, tasks_done: int, finished: Sequence[FinishedTask]) -> None:
        for i in range(tasks_done):
            self.start_task(i)

    def stored_per_task(self) -> int:
        return _lora_numbers_per_task(self.model)


def _build_multitask(lm: nn.Module, context: BuildContext, kwargs: Mapping[str, Any]) -> Adapted:
    return Multitask(_build_lora(lm, context, kwargs).model)


def _build_single_task(lm: nn.Module, context: BuildContext, kwargs: Mapping[str, Any]) -> Adapted:
    from peft import LoraConfig

    config = LoraConfig(target_modules=_targets(lm, context), **_lora_size(lm, context), **kwargs)
    return SingleTask(_get_peft_model(lm, copy.deepcopy(config)), config=config)


def _build_olora(lm: nn.Module, context: BuildContext, kwargs: Mapping[str, Any]) -> Adapted:
    from peft import LoraConfig

    config = LoraConfig(target_modules=_targets(lm, context), **_lora_size(lm, context), **kwargs)
    model = _get_peft_model(lm, copy.deepcopy(config))
    return OLoRA(model, strength=context.knobs.get("olora_lambda", 0.5), lora_config=config)


def _build_lora_corda(lm: nn.Module, context: BuildContext, kwargs: Mapping[str, Any]) -> Adapted:
    """PEFT's CorDA: each layer's W is decomposed as SVD(W·C), C the covariance of its inputs on the
    calibration text. With ``corda_method="kpm"`` (knowledge-preserving) the r smallest components,
    the ones that text uses least, become the trainable adapter and the rest stays frozen in the
    residual base weight; residual + adapter = W at init, so the output is unchanged."""
    from peft import LoraConfig
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    if context.calibration_ids is None:
        raise ValueError("CorDA needs calibration text: BuildContext.calibration_ids is not set.")
    settings = dict(kwargs)
    corda = CordaConfig(corda_method=settings.pop("corda_method"))
    config = LoraConfig(target_modules=_targets(lm, context), init_lora_weights="corda", corda_config=corda,
                        **_lora_size(lm, context), **settings)
    ids = context.calibration_ids().to(next(lm.parameters()).device)

    def run_model() -> None:
        for row in ids:  # one sample per forward: PEFT's covariance hook expects a batch of one
            lm(input_ids=row[None])

    preprocess_corda(lm, config, run_model=run_model)
    return Adapted(_get_peft_model(lm, config))


def peft_size_argument(peft_type: str) -> str | None:
    """The argument that sizes a PEFT type's adapter (None: it has none), from its config class."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    config_class = PEFT_TYPE_TO_CONFIG_MAPPING[peft_type]
    names = {f.name for f in dataclasses.fields(config_class)}
    if peft_type in PEFT_SIZE_ARGUMENTS:
        return PEFT_SIZE_ARGUMENTS[peft_type]
    return "r" if "r" in names else None


def peft_method(name: str) -> Method:
    """The method for ``peft:<type>``; its size argument decides whether it takes a rank."""
    peft_type = name[len(PEFT_PREFIX):].upper()
    try:
        size_argument = peft_size_argument(peft_type)
    except KeyError:
        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

        known = sorted(str(t).lower() for t in PEFT_TYPE_TO_CONFIG_MAPPING)
        raise ValueError(f"Unknown PEFT type in method {name!r}; PEFT knows {known}.") from None

    def build(lm: nn.Module, context: BuildContext, kwargs: Mapping[str, Any]) -> Adapted:
        size = {size_argument: context.rank} if size_argument else {}
        return _peft_model(lm, peft_type, size, context, kwargs)

    return Method(name, f"PEFT {peft_type}", build, takes_rank=size_argument is not None)


register(Method("curlora", "CURLoRA (inverted-probability C and R, trained U)", _build_curlora,
                takes_u_penalty=True))
register(REGISTRY["curlora"].variant("curlora-standard", "CURLoRA, C/R sampled ∝ squared norm (classic CUR)",
                                     sampling="standard"))
register(REGISTRY["curlora"].variant("curlora-uniform", "CURLoRA, C/R sampled uniformly", sampling="uniform"))
register(REGISTRY["curlora"].variant(
    "curlora-normalized", "CURLoRA with C's columns and R's rows scaled to unit norm (U's step alike in every layer)",
    normalize=True))
register(REGISTRY["curlora"].variant(
    "curlora-distinct", "CURLoRA with r distinct columns and rows (no sampling with replacement)", replacement=False))
register(REGISTRY["curlora"].variant(
    "curlora-wide", "CURLoRA at 4x the run's rank (r=64 beside r=16: 16x the U, still 0.3x LoRA's parameters)",
    rank_multiplier=4))
register(Method("curlora-bank", "one CURLoRA U per task on shared C, R; evaluation uses the task's own U "
                "(needs the task identity at inference; stores r² per layer per task)", _build_curlora_bank,
                takes_u_penalty=True, new_parameters_per_task=True))
register(Method("lora", "PEFT LoRA on the same layers and rank", _build_lora))
register(REGISTRY["lora"].variant(
    "lora-pissa", "LoRA on the principal singular directions (PiSSA; base keeps the residual)",
    init_lora_weights="pissa", decomposes_base_weights=True))
register(REGISTRY["lora"].variant(
    "lora-mica", "LoRA whose frozen B spans the minor singular directions (MiCA; only A trains)",
    init_lora_weights="mica", decomposes_base_weights=True))


register(Method("lora-corda-kpm", "LoRA on the directions the calibration text uses least (CorDA, knowledge-"
                "preserving; calibration: 2012 US convention speeches, never the perplexity corpus)",
                _build_lora_corda, needs_calibration=True, decomposes_base_weights=True,
                kwargs={"corda_method": "kpm"}))


def _build_osf(lm: nn.Module, context: BuildContext, kwargs: Mapping[str, Any]) -> Adapted:
    return _peft_model(lm, "OSF", {}, context, kwargs)


register(Method("osf", "PEFT OSF: top singular directions frozen, the orthogonal rest trains "
                "(size: peft_kwargs osf.effective_rank, default half of each layer)", _build_osf,
                takes_rank=False))
register(Method("o-lora", "O-LoRA: a new LoRA per task, earlier ones frozen, new A kept orthogonal to "
                "earlier As (λ: --olora-lambda)", _build_olora, new_parameters_per_task=True))
register(Method("multitask", "the multi-task ceiling: one LoRA trained once on every task's rows shuffled together "
                "(forgetting not defined)", _build_multitask, ceiling=True, sequential=False))
register(Method("single-task", "the per-task ceiling: a fresh LoRA per task, each task evaluated with its own",
                _build_single_task, ceiling=True, new_parameters_per_task=True))
register(Method("head", "frozen backbone, task heads only (the heads protocol's zero-forgetting floor)",
                _build_head, takes_rank=False, takes_lr=False, frozen_backbone=True))
register(Method("zero-shot", "the untouched model answering each task's prompt (the generative protocol's floor)",
                _build_head, takes_rank=False, takes_lr=False, frozen_backbone=True))


def _build_k_shot(lm: nn.Module, context: BuildContext, kwargs: Mapping[str, Any]) -> Adapted:
    adapted = _build_head(lm, context, kwargs)
    adapted.demonstrations = context.knobs.get("k_shot", 4)
    return adapted


register(Method("k-shot", "the untouched model with k training rows answered in the prompt (--k-shot; the "
                "generative protocol's in-context floor)", _build_k_shot, takes_rank=False, takes_lr=False,
                frozen_backbone=True))


def _calibrated(build: Builder) -> Builder:
    def calibrated(lm: nn.Module, context: BuildContext, kwargs: Mapping[str, Any]) -> Adapted:
        adapted = build(lm, context, kwargs)
        adapted.calibrated = True
        return adapted

    return calibrated


for _floor in ("zero-shot", "k-shot"):
    register(dataclasses.replace(
        REGISTRY[_floor], name=f"{_floor}-calibrated", build=_calibrated(REGISTRY[_floor].build),
        summary=f"{REGISTRY[_floor].summary}, with contextual calibration (each answer's score less its score "
                f"after a text that says nothing: Zhao et al. 2021)"))
register(Method("full", "full fine-tuning", _build_full, takes_rank=False, trains_base_weights=True))


# -- modifiers: X+ewc for any method X ----------------------------------------------------------
@dataclass
class EWC(Adapted):
    """Elastic weight consolidation (Kirkpatrick et al. 2017) on whatever the inner method trains:
    after each task, the diagonal empirical Fisher F_t of the trainable parameters on that task's
    training rows (per example, at most ``ewc_fisher_examples`` of them) and the parameters θ*_t;
    while training later tasks, loss + λ/2 · Σ_t Σ F_t (θ − θ*_t)² (one penalty per earlier task,
    as in the original, not online EWC). Every other hook is the inner method's."""

    inner: Adapted | None = None
    strength: float = 1.0
    max_examples: int = 64
    anchors: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = field(default_factory=list)

    def _params(self) -> list[torch.Tensor]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def start_task(self, task_index: int) -> None:
        self.inner.start_task(task_index)
        self.u_params = self.inner.u_params

    def end_task(self, task_index: int, finished: FinishedTask) -> None:
        self.inner.end_task(task_index, finished)
        params = self._params()
        rows = [(e, finished.index) for e in finished.examples[: self.max_examples]]
        fisher = fisher_diagonal(self.model, finished.loss, rows, params)
        self.anchors.append((fisher, [p.detach().clone() for p in params]))

    def penalty(self) -> torch.Tensor | None:
        inner = self.inner.penalty()
        if not self.anchors:
            return inner
        params = self._params()
        total = sum((f * (p - star).pow(2)).sum() for fisher, stars in self.anchors
                    for f, p, star in zip(fisher, params, stars))
        ewc = 0.5 * self.strength * total
        return ewc if inner is None else ewc + inner

    def evaluating(self, task_index: int) -> AbstractContextManager:
        return self.inner.evaluating(task_index)

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        tensors = self.inner.checkpoint_tensors()
        for t, (fisher, stars) in enumerate(self.anchors):
            for k, (f, star) in enumerate(zip(fisher, stars)):
                tensors[f"ewc.{t}.{k}.fisher"], tensors[f"ewc.{t}.{k}.star"] = f.cpu(), star.cpu()
        return tensors

    def load_checkpoint(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.inner.load_checkpoint({k: v for k, v in tensors.items() if not k.startswith("ewc.")})
        device = next(self.model.parameters()).device
        tasks = sorted({int(k.split(".")[1]) for k in tensors if k.startswith("ewc.")})
        self.anchors = []
        for t in tasks:
            n = len([k for k in tensors if k.startswith(f"ewc.{t}.") and k.endswith(".fisher")])
            self.anchors.append(([tensors[f"ewc.{t}.{k}.fisher"].to(device) for k in range(n)],
                                 [tensors[f"ewc.{t}.{k}.star"].to(device) for k in range(n)]))

    def resume(self, tasks_done: int, finished: Sequence[FinishedTask]) -> None:
        self.inner.resume(tasks_done, finished)

    def replay_examples(self) -> list[Item]:
        return self.inner.replay_examples()

    def rows_kept_per_task(self) -> int:
        return self.inner.rows_kept_per_task()

    def stored_per_task(self) -> int:
        # Per task: the Fisher and the anchor parameters, beside what the inner method stores.
        return self.inner.stored_per_task() + 2 * sum(p.numel() for p in self._params())


def _with_ewc(method: Method) -> Method:
    if method.new_parameters_per_task:
        # EWC anchors the parameters trained so far; a method that trains fresh ones for each task
        # would have task t's parameters pulled toward task t-1's by position: refuse it.
        raise ValueError(f"Method {method.name!r} trains new parameters for every task; EWC has nothing "
                         f"to anchor there. Use +ewc with a method that trains one set (curlora, lora, ...).")

    def build(lm: nn.Module, context: BuildContext, kwargs: Mapping[str, Any]) -> Adapted:
        inner = method.build(lm, context, kwargs)
        return EWC(inner.model, inner.u_params, inner.needs_task_identity, inner=inner,
                   strength=context.knobs.get("ewc_lambda", 1.0),
                   max_examples=context.knobs.get("ewc_fisher_examples", 64))

    return dataclasses.replace(method, name=f"{method.name}+ewc", summary=f"{method.summary}, with EWC", build=build)


@dataclass
class Replay(Adapted):
    """Experience replay: after each task, ``per_task`` of its training rows (never validation or
    evaluation rows; seeded, stratified by label) join a buffer, and every later task's epoch mixes
    the whole buffer into its batches (the current task keeps all its rows; batch size unchanged, so
    the epoch grows by the buffer). A replayed row is learned as its own task's row: under the heads
    protocol through that task's head, which stays frozen (the old task is evaluated with it, so
    replay trains the shared adapter to keep serving it, while refitting the head on a few rows could
    only move it away from what it learned on the whole task); under the generative protocol as that
    task's prompt → answer pair. Every other hook is the inner method's."""

    inner: Adapted | None = None
    per_task: int = 20
    seed: int = 0
    buffer: list[Item] = field(default_factory=list)

    def start_task(self, task_index: int) -> None:
        self.inner.start_task(task_index)
        self.u_params = self.inner.u_params

    def _remember(self, task_index: int, finished: FinishedTask) -> None:
        """A seeded sample of the task's training rows, stratified by label in the task's own
        proportions (largest remainder): replayed rows then ask the old head for the label mix it
        was fitted to, where a class-balanced buffer would push it toward the rare labels."""
        rows = finished.examples
        n = min(self.per_task, len(rows))
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(self.seed * 1000 + task_index))
        by_label: dict[int, list[Example]] = {}
        for i in order.tolist():
            by_label.setdefault(rows[i].label, []).append(rows[i])
        exact = {label: n * len(group) / len(rows) for label, group in by_label.items()}
        quota = {label: math.floor(share) for label, share in exact.items()}
        for label in sorted(exact, key=lambda lab: (quota[lab] - exact[lab], lab))[: n - sum(quota.values())]:
            quota[label] += 1
        self.buffer += [(row, finished.index) for label in sorted(by_label) for row in by_label[label][:quota[label]]]

    def end_task(self, task_index: int, finished: FinishedTask) -> None:
        self.inner.end_task(task_index, finished)
        self._remember(task_index, finished)

    def replay_examples(self) -> list[Item]:
        return self.buffer + self.inner.replay_examples()

    def penalty(self) -> torch.Tensor | None:
        return self.inner.penalty()

    def evaluating(self, task_index: int) -> AbstractContextManager:
        return self.inner.evaluating(task_index)

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        return self.inner.checkpoint_tensors()

    def load_checkpoint(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.inner.load_checkpoint(tensors)

    def resume(self, tasks_done: int, finished: Sequence[FinishedTask]) -> None:
        self.inner.resume(tasks_done, finished)
        self.buffer = []
        for t in range(tasks_done):  # the buffer is a seeded choice: rebuilt, not stored
            self._remember(t, finished[t])

    def stored_per_task(self) -> int:
        return self.inner.stored_per_task()

    def rows_kept_per_task(self) -> int:
        return self.per_task + self.inner.rows_kept_per_task()


def _with_replay(method: Method) -> Method:
    def build(lm: nn.Module, context: BuildContext, kwargs: Mapping[str, Any]) -> Adapted:
        inner = method.build(lm, context, kwargs)
        return Replay(inner.model, inner.u_params, inner.needs_task_identity, inner=inner,
                      per_task=context.knobs.get("replay_per_task", 20), seed=context.seed)

    return dataclasses.replace(method, name=f"{method.name}+replay", summary=f"{method.summary}, with replay",
                               build=build)


MODIFIERS: dict[str, Callable[[Method], Method]] = {"ewc": _with_ewc, "replay": _with_replay}


# -- lookup -----------------------------------------------------------------------------------
def resolve(name: str, variants: Mapping[str, Mapping[str, Any]] | None = None) -> Method:
    """The method a config names: registered, ``peft:<type>``, or a declared variant of either,
    optionally followed by modifiers (``curlora+ewc``)."""
    variants = variants or {}
    base_name, *modifiers = name.split("+")
    if modifiers:
        method = resolve(base_name, variants)
        if method.frozen_backbone:
            raise ValueError(f"Method {name!r}: {base_name!r} trains nothing a modifier could act on.")
        for modifier in modifiers:
            if modifier not in MODIFIERS:
                raise ValueError(f"Unknown modifier {modifier!r} in method {name!r}; known: {sorted(MODIFIERS)}.")
            method = MODIFIERS[modifier](method)
        return method
    if name in variants:
        spec = dict(variants[name])
        base_name = spec.pop("base", None)
        if not isinstance(base_name, str):
            raise ValueError(
                f"method_variants[{name!r}] needs a 'base' method (e.g. base: lora), got {base_name!r}."
            )
        if base_name in variants:
            raise ValueError(f"method_variants[{name!r}] is based on another variant {base_name!r}; "
                             f"base it on a registered method.")
        return resolve(base_name).variant(name, f"{base_name} with {spec}", **spec)
    if name in REGISTRY:
        return REGISTRY[name]
    if name.startswith(PEFT_PREFIX):
        return peft_method(name)
    raise ValueError(
        f"Unknown method {name!r}; choose from {sorted(REGISTRY)} (each optionally with "
        f"{sorted('+' + m for m in MODIFIERS)}), 'peft:<type>' (e.g. peft:vera), or declare it in the "
        f"config under method_variants (e.g. {{{name}: {{base: lora, use_dora: true}}}})."
    )


def describe() -> str:
    """One line per registered method, for the CLI's help."""
    return "; ".join(f"{m.name}: {m.summary}" for m in REGISTRY.values())
