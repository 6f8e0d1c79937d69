"""What every run of a command starts from, loaded and checked before anything is written: the base
model, the tasks (with a validation split carved from each one's training rows), the perplexity corpus,
the protocol, and what the unchanged base model gives every run (:class:`Base`)."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn

from curlora import CURLoRAConfig
from curlora.continual.config import ContinualConfig
from curlora.continual.evaluation import perplexity
from curlora.continual.forward import causal_lm_of
from curlora.continual.methods import Adapted
from curlora.continual.parallel import DataParallel
from curlora.continual.protocols import PROTOCOLS, Protocol, RunState
from curlora.continual.training import bf16_supported
from curlora.data import (
    CALIBRATION_CORPUS, DataError, Example, TaskSplits, load_corpus, load_corpus_file, load_task, load_task_file,
    make_validation_split,
)
from curlora.model import target_layers
from curlora.pretrained import load_model_and_tokenizer, model_name


@dataclass
class Base:
    """What the unchanged base model gives every run of a command, computed once by whoever loaded it
    (this process, a worker process or a Ray task) and handed to the runs."""

    ppl_before: float
    before_rows: dict[int, list[float | None]]  # per seed: the accuracy row before training
    base_cache: dict[tuple, Any]  # what the base model computed (split features, zero-shot scores)
    described: dict[str, Any]  # results.json's model, protocol, tasks and corpus


@dataclass
class Data:
    """The command's text: tasks in order, their validation splits, the perplexity corpus's token ids
    and (for a calibrating method) the calibration windows."""

    tasks: list[TaskSplits]
    validation: list[list[Example]]
    corpus_ids: torch.Tensor
    calibration_ids: torch.Tensor | None

    @property
    def eval_splits(self) -> list[list[Example]]:
        return [task.eval for task in self.tasks]


@dataclass
class Prepared:
    """The base model, the data and the protocol of one command, loaded once per process."""

    config: ContinualConfig
    model: nn.Module  # the base LM: each run adapts a deep copy of it
    model_name: str
    data: Data
    protocol: Protocol
    parallel: DataParallel
    bf16: bool

    @property
    def device(self) -> torch.device:
        return self.parallel.device

    def in_order(self, sequence: Sequence[int] | None) -> Prepared:
        """What a run that learns the tasks in ``sequence`` (indices into the tasks as listed; None: as
        listed) sees: its tasks, their validation splits and the protocol in that order, the same model,
        corpus and base-model cache."""
        if sequence is None or list(sequence) == list(range(len(self.data.tasks))):
            return self
        data = dataclasses.replace(self.data, tasks=[self.data.tasks[k] for k in sequence],
                                   validation=[self.data.validation[k] for k in sequence])
        return dataclasses.replace(self, data=data, protocol=self.protocol.reordered(sequence))

    def accuracies(self, adapted: Adapted, state: RunState, splits: str, upto: int, base: bool) -> list[float | None]:
        """Accuracy of tasks 0..upto (inclusive) on ``splits`` ("eval_splits" or "validation"), each
        in the state its method evaluates it in; None for tasks not yet seen. ``base``: the model's
        backbone is the unchanged base model (what it computes is cached across runs)."""
        row: list[float | None] = []
        for j in range(len(self.data.tasks)):
            if j > upto:
                row.append(None)
                continue
            with adapted.evaluating(j):
                row.append(state.accuracy(adapted.model, j, splits, getattr(self.data, splits)[j], base,
                                          adapted.demonstrations, adapted.calibrated))
        return row

    def perplexity(self, model: nn.Module) -> float:
        cfg = self.config
        return perplexity(
            causal_lm_of(model), self.data.corpus_ids, cfg.ppl_window, cfg.ppl_stride,
            progress=cfg.progress and self.parallel.is_main,
        ).perplexity

    def corpus_entry(self) -> dict[str, Any]:
        """What results.json says about the perplexity corpus. A user's file is named by its name, size
        and sha256 (the path as given stays in the config): results that travel carry no machine's
        directory layout, and whoever reads them can still tell which text was scored."""
        cfg = self.config
        entry: dict[str, Any] = {"name": cfg.corpus}
        if cfg.corpus_file is not None:
            data = Path(cfg.corpus_file).expanduser().read_bytes()
            entry = {"name": Path(cfg.corpus_file).name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        return {**entry, "tokens_scored": int(self.data.corpus_ids.numel() - 1),
                "window": cfg.ppl_window, "stride": cfg.ppl_stride}


def prepare(config: ContinualConfig, parallel: DataParallel) -> Prepared:
    """Load and check the model and the data; nothing is written."""
    if not config.progress:  # transformers' own "Loading weights" bar, once per worker, in the logs
        transformers.utils.logging.disable_progress_bar()
    base_lm, tokenizer = load_model_and_tokenizer(config.model, device=parallel.device)
    check_ranks(config, base_lm)
    if config.quantize:  # every run deep-copies this quantized base (bitsandbytes layers copy fine)
        from curlora.quantization import quantize_model

        quantize_model(base_lm, config.quantize)
    data = load_data(config, tokenizer)
    bf16 = bf16_supported(parallel.device) if config.bf16 is None else config.bf16
    protocol = PROTOCOLS[config.protocol](data.tasks, tokenizer, config, parallel.device, bf16)
    return Prepared(config, base_lm, model_name(config.model), data, protocol, parallel, bf16)


def check_ranks(config: ContinualConfig, lm: nn.Module) -> None:
    """Every rank fits the adapted layers (r ≤ their smaller side), judged from their shapes alone."""
    ranked = [config.method(name) for name in config.methods if config.method(name).takes_rank]
    if not ranked:
        return
    widest = max(ranked, key=lambda m: m.kwargs.get("rank_multiplier", 1))
    multiplier = widest.kwargs.get("rank_multiplier", 1)
    try:
        target_layers(lm, CURLoRAConfig(r=max(config.ranks) * multiplier, target_modules=config.target_modules))
    except ValueError as error:
        scaled = f" (method {widest.name!r} adapts at {multiplier} × each of ranks)" if multiplier > 1 else ""
        raise ValueError(f"ranks / target_modules do not fit the model{scaled}: {error}") from error


def load_data(config: ContinualConfig, tokenizer: Any) -> Data:
    """The tasks (``examples_per_task`` training rows each once the validation split is carved), the
    perplexity corpus's token ids and, if a method calibrates, its calibration windows."""
    cfg = config
    # Load enough training rows that ``examples_per_task`` remain after carving the validation split.
    wanted = round(cfg.examples_per_task / (1 - cfg.validation_fraction))
    common = {"seed": cfg.data_seed, "max_train": wanted, "max_eval": cfg.eval_examples}
    loaded: list[TaskSplits] = [load_task(name, cfg.source, cfg.data_dir, **common) for name in cfg.tasks]
    loaded += [load_task_file(**spec, **common) for spec in cfg.task_files]
    tasks, validation = [], []
    for task in loaded:
        train, held = make_validation_split(
            task.train, cfg.validation_fraction, cfg.data_seed, origin=f"task {task.name!r} training data"
        )
        tasks.append(TaskSplits(task.name, task.label_names, train, task.eval, notes=task.notes, prompt=task.prompt))
        validation.append(held)
    # Tokenize only what will be scored (no tokenizer packs more than 10 characters a token).
    max_chars = 10 * cfg.ppl_max_tokens if cfg.ppl_max_tokens else None
    if cfg.corpus_file is not None:
        text = load_corpus_file(cfg.corpus_file, max_chars=max_chars)
    else:
        text = load_corpus(cfg.corpus, cfg.source, cfg.data_dir, max_chars=max_chars)
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    needed = any(cfg.method(name).needs_calibration for name in cfg.methods)
    return Data(tasks, validation, ids[: cfg.ppl_max_tokens] if cfg.ppl_max_tokens else ids,
                calibration_windows(tokenizer, cfg.corda_samples, cfg.corda_sample_tokens) if needed else None)


def calibration_windows(tokenizer: Any, samples: int, tokens: int) -> torch.Tensor:
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


def measure_base(prepared: Prepared, seeds: list[int], ppl_before: float | None) -> Base:
    """The base model's perplexity (``ppl_before`` if a command on the run directory measured it),
    its accuracy row before training for each of ``seeds`` (each seed's fresh protocol state:
    untrained heads, or zero-shot) and what it computed on the way; nothing is written."""
    lm, tasks = prepared.model, prepared.data.tasks
    if ppl_before is None:
        ppl_before = prepared.perplexity(lm)
    before_rows = {seed: prepared.accuracies(Adapted(lm), prepared.protocol.start_run(seed, lm),
                                             "eval_splits", len(tasks) - 1, True) for seed in seeds}
    described = {
        "model": prepared.model_name,
        "protocol": prepared.protocol.describe(),
        "tasks": [
            {"name": t.name, "label_names": t.label_names, "n_train": len(t.train),
             "n_validation": len(v), "n_eval": len(t.eval), "majority_accuracy": t.majority_accuracy(),
             "notes": t.notes}
            for t, v in zip(tasks, prepared.data.validation)
        ],
        "corpus": prepared.corpus_entry(),
    }
    return Base(ppl_before, before_rows, prepared.protocol.base_cache, described)
