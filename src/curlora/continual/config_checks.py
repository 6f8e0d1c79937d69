"""Checks of a continual config that need neither the model nor the data, so that a bad value is refused
with one line before any work: each field's type (read from ContinualConfig's annotations, so a new
field is checked as soon as it is declared), its range, each task file entry, and that no two runs
would share a run file.

A config may come from someone else's run directory, so no value is trusted to be of the type its
field names: a list where a name belongs would otherwise surface as a traceback far from the file.
"""

from __future__ import annotations

import collections.abc
import inspect
import types
import typing
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from curlora import checks
from curlora.data import CORPORA, TASKS, load_task_file
from curlora.data.sources import benchmark_dir
from curlora.data.tasks import check_task_file_name, task_file_name
from curlora.data.prompts import check_template

if TYPE_CHECKING:
    from curlora.continual.config import ContinualConfig

SOURCES = ("offline", "local", "hub")
# Where runs train (curlora.continual.executors): this machine, or a Ray cluster.
EXECUTORS = ("local", "ray")
# A task_files entry holds load_task_file's keyword arguments but these, which the run sets alike for
# every task (from the config field named beside each).
RUN_SET_TASK_KEYS = {"seed": "data_seed", "max_train": "examples_per_task", "max_eval": "eval_examples"}
TASK_FILE_KEYS = tuple(k for k in inspect.signature(load_task_file).parameters if k not in RUN_SET_TASK_KEYS)
# An answer is a word or two (the template's own bound is prompts.MAX_TEMPLATE_CHARS).
MAX_LABEL_WORD_CHARS = 100


# -- types --------------------------------------------------------------------------------------------
_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "unset",
          Path: "a path"}


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in typing.get_args(hint))
    if _container(hint) is list:
        return "a list"
    if _container(hint) is dict:
        return "a mapping"
    return _NAMES.get(hint, str(hint))


def _container(hint: Any) -> type | None:
    """list for a list or sequence annotation (a string is no sequence of names here), dict for a mapping."""
    origin = typing.get_origin(hint)
    if origin in (list, tuple, collections.abc.Sequence):
        return list
    if origin in (dict, collections.abc.Mapping):
        return dict
    return None


def _scalar_fits(value: Any, hint: Any) -> bool:
    if hint is Any:
        return True
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is Path:
        return isinstance(value, (str, Path))
    if hint is type(None):
        return value is None
    return isinstance(hint, type) and isinstance(value, hint)


def check_type(where: str, value: Any, hint: Any) -> None:
    """Refuse ``value`` unless it is of the annotation ``hint`` (int, float, str, bool, None, Any, Path,
    lists, mappings and unions of them), naming ``where`` and the first item at fault."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    kind = dict if isinstance(value, dict) else list if isinstance(value, (list, tuple)) else None
    for option in options:
        if option is Any:
            return
        if kind is not None and _container(option) is kind:
            args = typing.get_args(option) or (Any, Any)
            if kind is list:
                for item in value:
                    check_type(f"every value of {where}", item, args[0])
            else:
                for key, item in value.items():
                    check_type(f"every key of {where}", key, args[0])
                    check_type(f"{where}[{key!r}]", item, args[1])
            return
        if kind is None and _scalar_fits(value, option):
            return
    if kind is None and where.isidentifier() and any(_container(option) is list for option in options):
        raise ValueError(f"Config field {where!r} must be a list, e.g. [{value!r}], got {value!r}.")
    got = checks.got(value) if any(option in (int, float) for option in options) else f"got {value!r}"
    raise ValueError(f"{where} must be {_describe(hint)}, {got}.")


def check_types(cfg: ContinualConfig) -> None:
    """Every field of ``cfg`` is of its annotated type: checked first, so that no later check meets a
    list where a name belongs."""
    hints = typing.get_type_hints(type(cfg))
    for field in fields(cfg):
        check_type(field.name, getattr(cfg, field.name), hints[field.name])


# -- task files ---------------------------------------------------------------------------------------
def check_task_file(spec: Any) -> None:
    """A task_files entry: load_task_file's keys (typed by its annotations) but the run-set ones, an
    existing file with its text and label columns named (or one of O-LoRA's dataset directories, which
    names its own), a name no built-in task has, a template whose only fields are {text} (and {text_pair}
    for a pair task) and plain answer words."""
    if not isinstance(spec, dict) or "path" not in spec:
        raise ValueError(f"Every task_files entry must be a mapping with key path, got {spec!r}.")
    where = f"task_files entry {spec['path']!r}"
    for key in sorted(set(spec) - set(TASK_FILE_KEYS), key=str):
        set_by = (f"the run sets it for every task from {RUN_SET_TASK_KEYS[key]}"
                  if key in RUN_SET_TASK_KEYS else f"known keys: {', '.join(TASK_FILE_KEYS)}")
        raise ValueError(f"{where} has key {key!r}, which it cannot take: {set_by}.")
    hints = typing.get_type_hints(load_task_file)
    for key, value in spec.items():
        check_type(f"{where}: {key}", value, hints[key])
    bench = benchmark_dir(spec["path"])
    if bench is not None:  # checked here, before a model loads (a first-use Gemma fetch takes minutes)
        for path in (bench.train, bench.test):
            checks.existing_file(f"{where}: O-LoRA's dataset file", path)
    else:
        checks.existing_file("task file", spec["path"])
        if not {"text_column", "label_column"} <= set(spec):
            raise ValueError(f"{where} needs keys text_column and label_column (only an O-LoRA dataset "
                             f"directory, with labels.json, implies them).")
    if spec.get("eval_path") is not None:
        checks.existing_file("task eval file", spec["eval_path"])
    if "eval_fraction" in spec:
        checks.fraction(f"{where}: eval_fraction", spec["eval_fraction"])
    name = task_file_name(spec["path"], spec.get("name"))
    checks.identifier(f"{where}: name", name)
    check_task_file_name(name, where)
    if spec.get("template") is not None:
        check_template(spec["template"], spec.get("text_pair_column") is not None, where)
    for word in spec.get("label_words") or []:
        if not word.strip() or len(word) > MAX_LABEL_WORD_CHARS or not word.isprintable():
            raise ValueError(f"{where}: every label word must be printable text of 1 to {MAX_LABEL_WORD_CHARS} "
                             f"characters, got {word!r}.")


# -- task orders --------------------------------------------------------------------------------------
def check_orders(cfg: ContinualConfig) -> None:
    """Each order is a permutation of the tasks (by name), no two alike, a named one's name fit for a run
    file; orders need the tasks' names to differ."""
    if not cfg.orders:
        return
    names = cfg.task_names
    if len(set(names)) != len(names):
        raise ValueError(f"orders name tasks by name, but the tasks' names repeat ({names}); give task files "
                         f"their own name (name: ...).")
    entries = list(cfg.orders.items()) if isinstance(cfg.orders, dict) else list(enumerate(cfg.orders))
    seen: dict[tuple, Any] = {}
    for label, order in entries:
        where = f"orders[{label!r}]"
        if isinstance(label, str):
            checks.identifier(f"{where}: the order's name", label)
        if sorted(order) != sorted(names):
            raise ValueError(f"{where} must list every task once, in the order learned (a permutation of "
                             f"{names}), got {order!r}.")
        if tuple(order) in seen:
            raise ValueError(f"{where} is the same order as orders[{seen[tuple(order)]!r}]; give each order once.")
        seen[tuple(order)] = label


# -- run keys -----------------------------------------------------------------------------------------
def _distinct(where: str, values: list[Any], key: Any) -> None:
    """No two of ``values`` give the same part of a run file's name (``key(value)``): the second run
    would resume from the first's checkpoint and overwrite its result."""
    seen: dict[str, Any] = {}
    for value in values:
        name = key(value)
        if name in seen and seen[name] == value:
            raise ValueError(f"{where} names {value!r} twice; give each value once.")
        if name in seen:
            why = ("run file names keep 6 significant digits" if isinstance(value, float)
                   else "run file names write ':' as '-'")
            raise ValueError(f"{where} gives {seen[name]!r} and {value!r}, which would share run files ({name}: "
                             f"{why}); keep one, or make them differ there.")
        seen[name] = value


def check_run_keys(cfg: ContinualConfig) -> None:
    """Every run of the config has a run file of its own (see RunSpec.key)."""
    def stem(name: str) -> str:
        return name.replace(":", "-")

    _distinct("methods", cfg.methods, stem)
    _distinct("methods and method_variants", list(dict.fromkeys([*cfg.methods, *cfg.method_variants])), stem)
    _distinct("ranks", cfg.ranks, lambda rank: f"r{rank}")
    _distinct("u_penalties", cfg.u_penalties, lambda value: f"lam{value:g}")
    _distinct("lrs", cfg.learning_rates, lambda value: f"lr{value:g}")
    for name, entry in cfg.method_lrs.items():
        grids = entry.items() if isinstance(entry, dict) else [(None, entry)]
        for rank, rates in grids:
            where = f"method_lrs[{name!r}]" + ("" if rank is None else f"[{rank}]")
            _distinct(where, rates, lambda value: f"lr{value:g}")


# -- values -------------------------------------------------------------------------------------------
MAX_DESCRIPTION = 2000  # characters of a config's description (the report's first paragraph)


def check_values(cfg: ContinualConfig) -> None:
    """Every setting that can be judged without the model or the data: refused here, before any work."""
    for name in ("lr", "head_lr"):
        checks.positive(name, getattr(cfg, name))
    for value in cfg.lrs or []:
        checks.positive("every value of lrs", value)
    if not isinstance(cfg.method_lrs, dict):
        raise ValueError(f"method_lrs must map method names to rate lists, e.g. {{curlora: [1e-3, 1e-2]}}, "
                         f"got {cfg.method_lrs!r}.")
    for name, entry in cfg.method_lrs.items():
        if name not in cfg.methods or not cfg.method(name).takes_lr:
            raise ValueError(f"method_lrs names {name!r}, which is not one of this run's methods that take a "
                             f"learning rate ({[m for m in cfg.methods if cfg.method(m).takes_lr]}).")
        grids = {f"method_lrs[{name!r}]": entry}
        if isinstance(entry, dict):
            if not cfg.method(name).takes_rank or sorted(entry) != sorted(cfg.ranks):
                raise ValueError(
                    f"method_lrs[{name!r}] gives rates per rank for ranks {sorted(entry)}, but this run's "
                    f"ranks are {sorted(cfg.ranks)}" + ("" if cfg.method(name).takes_rank else
                                                         f" and {name!r} takes no rank") +
                    "; give one rate list per rank of the run, or one list for all ranks.")
            grids = {f"method_lrs[{name!r}][{rank}]": rates for rank, rates in entry.items()}
        for where, rates in grids.items():
            if not isinstance(rates, (list, tuple)) or not rates:
                raise ValueError(f"{where} must be a non-empty list of rates, got {rates!r}.")
            for value in rates:
                checks.positive(f"every value of {where}", value)
    if cfg.description is not None and len(cfg.description) > MAX_DESCRIPTION:
        raise ValueError(f"description is {len(cfg.description):,} characters long; keep it under {MAX_DESCRIPTION:,} "
                         f"(it heads the report: link a document for more).")
    checks.integers("ranks", cfg.ranks, minimum=1)
    checks.integers("seeds", cfg.seeds)
    checks.integers("confirm_seeds", cfg.confirm_seeds)
    if len({*cfg.seeds, *cfg.confirm_seeds}) < len(cfg.seeds) + len(cfg.confirm_seeds):
        raise ValueError(f"seeds {cfg.seeds} and confirm_seeds {cfg.confirm_seeds} must name each seed once "
                         f"(confirm_seeds run only at the rates the runs of seeds chose).")
    checks.integer("data_seed", cfg.data_seed)
    checks.finite("alpha", cfg.alpha)
    for name in ("examples_per_task", "eval_examples", "epochs", "batch_size", "eval_batch_size", "max_length"):
        checks.integer(name, getattr(cfg, name), minimum=1)
    for value in cfg.u_penalties:
        checks.non_negative("every value of u_penalties", value)
    checks.non_negative("weight_decay", cfg.weight_decay)
    checks.non_negative("ewc_lambda", cfg.ewc_lambda)
    checks.integer("ewc_fisher_examples", cfg.ewc_fisher_examples, minimum=1)
    checks.integer("replay_per_task", cfg.replay_per_task, minimum=1)
    checks.non_negative("olora_lambda", cfg.olora_lambda)
    checks.integer("corda_samples", cfg.corda_samples, minimum=1)
    checks.integer("corda_sample_tokens", cfg.corda_sample_tokens, minimum=2)
    checks.integer("warmup_steps", cfg.warmup_steps, minimum=0)
    checks.integer("k_shot", cfg.k_shot, minimum=1)
    checks.integer("generation_examples", cfg.generation_examples, minimum=1)
    if cfg.chat_template is not None and not isinstance(cfg.chat_template, bool):
        raise ValueError(f"chat_template must be true, false or unset, got {cfg.chat_template!r}.")
    checks.fraction("validation_fraction", cfg.validation_fraction)
    checks.fraction("max_warmup_fraction", cfg.max_warmup_fraction, low_open=False, high_open=False)
    if cfg.ppl_max_tokens is not None:
        checks.integer("ppl_max_tokens", cfg.ppl_max_tokens, minimum=2)
    checks.integer("ppl_stride", cfg.ppl_stride, minimum=1)
    checks.integer("ppl_window", cfg.ppl_window, minimum=2)
    if cfg.ppl_window <= cfg.ppl_stride:
        raise ValueError(
            f"ppl_window ({cfg.ppl_window}) must be larger than ppl_stride ({cfg.ppl_stride}): "
            f"each window scores the tokens past the previous one's stride."
        )
    check_executor(cfg)
    checks.model_path(cfg.model)
    if cfg.log_dir is not None and not (isinstance(cfg.log_dir, str) and cfg.log_dir
                                         and not Path(cfg.log_dir).is_file()):
        raise ValueError(f"log_dir must name a directory (made if missing), got {cfg.log_dir!r}.")
    if cfg.source is not None and cfg.source not in SOURCES:
        raise ValueError(f"Unknown source {cfg.source!r}; choose one of {SOURCES}.")
    for task in cfg.tasks:
        if task not in TASKS:
            raise ValueError(f"Unknown task {task!r}; known tasks: {sorted(TASKS)}; "
                             f"use task_files for your own data.")
    if cfg.corpus_file is not None:
        checks.existing_file("corpus_file", cfg.corpus_file)
    elif cfg.corpus not in CORPORA:
        raise ValueError(f"Unknown corpus {cfg.corpus!r}; known corpora: {sorted(CORPORA)}; "
                         f"or pass corpus_file / --corpus-file with a text file of your own.")
    if cfg.data_dir is not None and not Path(cfg.data_dir).expanduser().is_dir():
        raise FileNotFoundError(f"data_dir {cfg.data_dir} does not exist or is not a directory.")
    for spec in cfg.task_files:
        check_task_file(spec)
    check_orders(cfg)
    check_run_keys(cfg)


def check_executor(cfg: ContinualConfig) -> None:
    """The device and the executor's settings. Under Ray the runs train on the cluster's nodes, so the
    device is not looked for on this machine, and each run's GPU is the one Ray gives it."""
    if cfg.executor not in EXECUTORS:
        raise ValueError(f"Unknown executor {cfg.executor!r}; choose one of {EXECUTORS}.")
    ray = cfg.executor == "ray"
    checks.device(cfg.device, here=not ray)
    if cfg.workers is not None:
        checks.integer("workers", cfg.workers, minimum=1)
    if not ray:
        changed = [f.name for f in fields(cfg) if f.name.startswith("ray_") and getattr(cfg, f.name) != f.default]
        if changed:
            raise ValueError(f"{', '.join(changed)} set the Ray executor's runs; add executor: ray "
                             f"(--executor ray) or drop {'them' if len(changed) > 1 else 'it'}.")
        if (cfg.workers or 1) > 1 and not cfg.device.startswith("cpu"):
            raise ValueError(
                f"workers={cfg.workers} runs several processes side by side on a CPU; on {cfg.device!r} use "
                f"workers=1 (several GPUs: data parallel with torchrun, or executor ray with ray_num_gpus)."
            )
        return
    if cfg.ray_address is not None and not (isinstance(cfg.ray_address, str) and cfg.ray_address.strip()):
        raise ValueError(f"ray_address must be 'auto' or HOST:PORT of a Ray cluster, got {cfg.ray_address!r}.")
    checks.positive("ray_num_cpus", cfg.ray_num_cpus)
    checks.non_negative("ray_num_gpus", cfg.ray_num_gpus)
    checks.integer("ray_max_retries", cfg.ray_max_retries, minimum=-1)
    gpu = cfg.device.startswith("cuda")
    if gpu and cfg.device != "cuda":
        raise ValueError(f"device {cfg.device!r}: under executor ray each run trains on the GPU Ray gives it; "
                         f"use device cuda.")
    if gpu and not cfg.ray_num_gpus:
        raise ValueError("device cuda under executor ray needs a GPU per run from Ray: set ray_num_gpus "
                         "(--ray-num-gpus 1).")
    if cfg.ray_num_gpus and not gpu:
        raise ValueError(f"ray_num_gpus={cfg.ray_num_gpus:g} gives each run a GPU it would not use on device "
                         f"{cfg.device!r}; set device cuda (--device cuda) or drop ray_num_gpus.")

