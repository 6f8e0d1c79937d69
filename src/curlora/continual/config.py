"""Settings of the continual-learning benchmark: one dataclass, presets, YAML files, CLI overrides."""

from __future__ import annotations

import copy
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from curlora import boundedyaml, checks
from curlora.continual import config_checks
from curlora.continual.methods import Method, resolve
from curlora.continual.protocols import PROTOCOLS
from curlora.data import CALIBRATION_CORPUS, OFFLINE_CORPUS, OFFLINE_SUITE, PAPER_CORPUS, PAPER_TASKS
from curlora.data.sources import read_text
from curlora.data.tasks import task_file_name

# How a run is executed or described, not what it computes: a run may resume with other values of these.
RUNTIME_FIELDS = ("progress", "workers", "log_dir", "executor", "ray_address", "ray_num_cpus", "ray_num_gpus",
                  "ray_max_retries", "description")
# Which runs an experiment holds, not what any one run computes (a run's file is named by its method,
# rank, rate, λ, seed and task order): a run directory may resume with more or fewer of these, e.g. more seeds.
GRID_FIELDS = ("methods", "ranks", "lr", "lrs", "method_lrs", "seeds", "confirm_seeds", "u_penalties", "orders")
# Per-method settings: resuming may add entries, never change one that earlier runs used.
GRID_MAPPINGS = ("method_variants", "peft_kwargs")


@dataclass
class ContinualConfig:
    """Everything a continual run depends on; saved as ``config.yaml`` in the run directory."""

    model: str | None = None  # None: the offline default, SmolLM2-135M-Instruct
    tasks: list[str] = field(default_factory=lambda: list(OFFLINE_SUITE))
    task_files: list[dict[str, Any]] = field(default_factory=list)  # kwargs of data.load_task_file
    corpus: str = OFFLINE_CORPUS
    corpus_file: str | None = None  # a plain UTF-8 text file as the perplexity corpus (replaces corpus)
    source: str | None = None  # "offline" | "local" | "hub"; None picks per task
    data_dir: str | None = None
    # How tasks are learned and scored (curlora.continual.protocols): "heads" (the paper's) or
    # "generative" (prompt → answer, loss on the answer, no heads).
    protocol: str = "heads"
    chat_template: bool | None = None  # generative: prompts as chat turns; None: where the tokenizer has a template
    k_shot: int = 4  # generative: training rows of each label shown in the prompt by the k-shot floor
    generation_examples: int = 32  # generative: evaluation rows per task checked for a valid greedy answer
    methods: list[str] | None = None  # None: the protocol's defaults (curlora, lora and its floors)
    peft_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)  # "peft:vera" -> VeraConfig kwargs
    # Named variants run beside their base: {"lora-pissa": {"base": "lora", "init_lora_weights": "pissa"}}
    method_variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    ranks: list[int] = field(default_factory=lambda: [16])
    alpha: float = 1.0
    target_modules: list[str] | None = None  # None: the architecture's q/k/v (c_attn for GPT-2)
    seeds: list[int] = field(default_factory=lambda: [0])
    # More seeds at each method × rank's rate chosen on validation by the runs of ``seeds`` (the usual
    # sweep: every rate on one seed, the chosen one on more); they run once those runs have finished.
    confirm_seeds: list[int] = field(default_factory=list)
    # Task orders, an axis like seeds: permutations of the task names ([[b, a, c], ...], each named by its
    # indices into the tasks as listed, e.g. "1-0-2") or named ones ({reverse: [c, b, a]}). Empty: the tasks
    # as listed, once. A run in the listed order keeps the run file it has without orders.
    orders: list[list[str]] | dict[str, list[str]] = field(default_factory=list)
    data_seed: int = 0
    examples_per_task: int = 240
    eval_examples: int = 150
    validation_fraction: float = 0.15
    epochs: int = 1
    batch_size: int = 8
    eval_batch_size: int = 32
    max_length: int = 64
    lr: float = 1e-3
    lrs: list[float] | None = None  # a sweep; the headline uses the best rate on validation
    # A method's own rate grid instead of lrs: {"curlora": [1e-3, 1e-2, 3e-2]} (rates that suit one
    # method diverge another, and a method whose best rate is the grid's top deserves a higher one),
    # or one grid per rank, {"curlora": {8: [1e-2], 16: [3e-3]}}: e.g. more seeds at the rate each
    # rank chose on validation (CURLoRA's update is not scaled by 1/r, so ranks choose differently).
    method_lrs: dict[str, list[float] | dict[int, list[float]]] = field(default_factory=dict)
    head_lr: float = 1e-3
    u_penalties: list[float] = field(default_factory=lambda: [0.0])  # the paper's Eq. 11 λ
    ewc_lambda: float = 1.0  # X+ewc: strength of the pull toward earlier tasks' parameters
    ewc_fisher_examples: int = 64  # X+ewc: training rows per task for the diagonal Fisher
    replay_per_task: int = 20  # X+replay: training rows kept from each task and replayed later
    olora_lambda: float = 0.5  # o-lora: weight of the orthogonality loss (the paper's λ1)
    corda_samples: int = 64  # lora-corda-kpm: calibration windows (of corda_sample_tokens) from CALIBRATION_CORPUS
    corda_sample_tokens: int = 256
    weight_decay: float = 0.01
    warmup_steps: int = 500
    max_warmup_fraction: float = 0.1
    bf16: bool | None = None  # bf16 autocast for training and accuracy; None: on a GPU with bf16, not on a CPU
    ppl_max_tokens: int | None = 4096
    ppl_window: int = 512
    ppl_stride: int = 256
    # Perplexity after every task (the curve) or after the last only. None: the curve, except for a
    # method swept over rates, whose frontier reads only each rate's final value.
    ppl_after_every_task: bool | None = None
    device: str = "cpu"
    progress: bool = True
    # local: runs side by side in this many processes on a CPU (same numbers, sooner; None: 1);
    # ray: at most this many runs at once (None: as many as the cluster's free resources fit).
    workers: int | None = None
    executor: str = "local"  # "ray": each run a Ray task on a cluster (docs/distributed.md)
    ray_address: str | None = None  # "auto" or HOST:PORT; None: RAY_ADDRESS, else a Ray instance for the command
    ray_num_cpus: float = 1  # Ray resources of each run; its torch threads are this many CPUs
    ray_num_gpus: float = 0
    ray_max_retries: int = 3  # times Ray reruns a run whose worker or node died (-1: without limit)
    quantize: str | None = None  # quantize the base's linear layers (curlora.quantization.SCHEMES)
    log_dir: str | None = None  # TensorBoard event files of every run, live (curlora.continual.tracking)
    # A note on the experiment, at the top of its report: why these settings, where fuller evidence is.
    description: str | None = None

    def __post_init__(self) -> None:
        config_checks.check_types(self)
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"Unknown protocol {self.protocol!r}; choose one of {sorted(PROTOCOLS)}.")
        if self.methods is None:
            self.methods = list(PROTOCOLS[self.protocol].default_methods)
        for name in ("tasks", "methods", "ranks", "seeds", "u_penalties"):
            value = getattr(self, name)
            if not value and not (name == "tasks" and self.task_files):
                raise ValueError(f"Config field {name!r} must not be empty.")
        for name in [*self.methods, *self.method_variants]:  # each becomes part of run and checkpoint file names
            checks.identifier("method name", name)
        methods = [self.method(name) for name in self.methods]  # unknown names fail here
        floors = PROTOCOLS[self.protocol].floors
        misplaced = [m.name for m in methods if m.frozen_backbone and m.name not in floors]
        if misplaced:
            raise ValueError(f"Methods {misplaced} are floors of another protocol; the {self.protocol!r} protocol's "
                             f"floors are {list(floors)} (protocol: {sorted(PROTOCOLS)}).")
        calibrated = [m.name for m in methods if m.needs_calibration]
        if calibrated:
            from curlora.extras import require_extra

            require_extra("corda", f"Methods {calibrated} (PEFT's CorDA)")
        if self.log_dir is not None:
            from curlora.extras import require_extra

            require_extra("tensorboard", "log_dir (TensorBoard event files)")
        if self.executor == "ray":
            from curlora.extras import require_extra

            require_extra("ray", "executor ray (--executor ray)")
        if self.corpus == CALIBRATION_CORPUS and self.corpus_file is None:
            if calibrated:
                raise ValueError(
                    f"Methods {calibrated} calibrate on {CALIBRATION_CORPUS!r}, so it cannot also be the perplexity "
                    f"corpus (their forgetting would be scored on their own calibration text); choose another corpus."
                )
        if self.quantize is not None:
            from curlora.quantization import SCHEMES

            if self.quantize not in SCHEMES:
                raise ValueError(f"Unknown quantize scheme {self.quantize!r}; choose one of {SCHEMES}.")
            for method in methods:
                if method.trains_base_weights:
                    raise ValueError(
                        f"Method {method.name!r} trains the base weights, which a quantized base cannot; "
                        f"drop it or unset quantize."
                    )
                if method.decomposes_base_weights:
                    raise ValueError(
                        f"Method {method.name!r} initialises from an SVD of the full-precision base weights, which a "
                        f"quantized base does not have; drop it or unset quantize."
                    )
        config_checks.check_values(self)

    def method(self, name: str) -> Method:
        """The registry entry (or declared variant) a method name in this config stands for."""
        return resolve(name, self.method_variants)

    @property
    def learning_rates(self) -> list[float]:
        return list(self.lrs) if self.lrs else [self.lr]

    def rates_for(self, name: str, rank: int | None = None) -> list[float]:
        """The learning rates method ``name`` runs at (at ``rank``): its own grid if it has one, else
        the shared one."""
        entry = self.method_lrs.get(name)
        if isinstance(entry, dict):
            entry = entry[rank]
        return list(entry or self.learning_rates)

    @property
    def task_names(self) -> list[str]:
        """The tasks' names in training order: the built-in tasks, then the task files."""
        return [*self.tasks, *(task_file_name(spec["path"], spec.get("name")) for spec in self.task_files)]

    def sequences(self) -> dict[str, tuple[int, ...]]:
        """Each order's name and its tasks' indices into :attr:`task_names`, in the order learned ({}
        without ``orders``)."""
        named = list(self.orders.items()) if isinstance(self.orders, dict) else [(None, o) for o in self.orders]
        index = {name: i for i, name in enumerate(self.task_names)}
        sequences = {}
        for name, order in named:
            sequence = tuple(index[task] for task in order)
            sequences[name if name is not None else "-".join(map(str, sequence))] = sequence
        return sequences

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ContinualConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known, key=str)
        if unknown:
            raise ValueError(f"Unknown config keys {unknown}; known keys: {sorted(known)}.")
        return cls(**data)


PRESETS: dict[str, dict[str, Any]] = {
    # What the README's main-job command runs: the offline suite, sized for ~15 min on 2 CPU cores.
    "default": {},
    # The paper's experiment (Fawi 2024, §5): MRPC → SST-2 → Sentiment140, WikiText-2, ranks 8/16/24,
    # alpha 1, AdamW 2.5e-4 shared by adapter and head, cosine schedule, 500 warm-up steps
    # (capped to the run's length), 3 epochs, 1,000 examples per task.
    "paper": {
        "tasks": list(PAPER_TASKS),
        "corpus": PAPER_CORPUS,
        "ranks": [8, 16, 24],
        "lr": 2.5e-4,
        "head_lr": 2.5e-4,
        "epochs": 3,
        "examples_per_task": 1000,
        "eval_examples": 400,
        "max_length": 128,
        "ppl_max_tokens": None,
        "ppl_window": 1024,
        "ppl_stride": 512,
    },
}
# `make run`: the verdict in small, on the offline suite and the heads protocol (the README's verdict leads
# with it): CURLoRA and LoRA each at the rate the heads frontier chose on seed 0's validation data (and its
# seeds 1-2 confirmed), between the protocol's floor (heads only) and its ceiling (multitask, at its
# chosen rate); the defaults' 1e-3 is where CURLoRA learns exactly what the heads alone learn (ACC 0.573
# both). About 14 min on 2 CPU cores with two workers.
PRESETS["quick-verdict"] = {
    "methods": ["curlora", "lora", "head", "multitask"],
    "method_lrs": {"curlora": [1e-2], "lora": [3e-3], "multitask": [3e-3]},
    "description": (
        "The verdict in small: one seed, each method at the learning rate the heads frontier chose on "
        "validation (docs/results/frontier: every rate of every method's grid on seed 0, the chosen ones on "
        "seeds 1 and 2). The full evidence (three seeds with 95 % intervals, Gemma-3-270m, the paper's tasks, "
        "the generative protocol, the methods a user would pick instead): docs/results.md in the curlora "
        "repository."),
}
# The paper's tasks, order, ranks, alpha, schedule and three epochs at a size a 2-core CPU runs per
# seed: 120 training examples per task and the first 8,192 WikiText-2 tokens. Its 2.5e-4 rate
# learned nothing here at any size (see README), so the rates are the default suite's and are
# meant to be swept (--lrs) and chosen on validation: 80 rows per task (not the default 15 %, which
# would be 21 rows, where one row moves accuracy by 0.05 and the choice of rate is a coin flip).
PRESETS["paper-small"] = {
    **PRESETS["paper"],
    "lr": 1e-3,
    "head_lr": 1e-3,
    "examples_per_task": 120,
    "validation_fraction": 0.4,
    "eval_examples": 150,
    "ppl_max_tokens": 8192,
}


# O-LoRA's benchmarks (Wang et al. 2023; the public repository cmnfriend/O-LoRA, folder CL_Benchmark/): its
# datasets as task files under --data-dir (a task file path starting with DATA_DIR lies there), learned under
# the generative protocol with labels.json's strings as answers, in the paper's orders. The standard sequence
# is orders 1-3 (4 tasks); the long one orders 4-6 (15 tasks; Progressive Prompts' orders). Sized for a CPU:
# a seeded stratified subsample of each task's rows (the task's notes in results.json name it).
DATA_DIR = "{data_dir}"


def _olora(folders: list[str], orders: dict[str, list[str]], examples: int) -> dict[str, Any]:
    return {"tasks": [], "task_files": [{"path": f"{DATA_DIR}/{folder}"} for folder in folders], "orders": orders,
            "protocol": "generative", "examples_per_task": examples, "eval_examples": 150, "max_length": 128}


PRESETS["olora-standard"] = _olora(
    ["TC/dbpedia", "SC/amazon", "TC/yahoo", "TC/agnews"],
    {"1": ["dbpedia", "amazon", "yahoo", "agnews"], "2": ["dbpedia", "amazon", "agnews", "yahoo"],
     "3": ["yahoo", "amazon", "agnews", "dbpedia"]}, examples=240)
PRESETS["olora-long"] = _olora(
    ["NLI/MNLI", "NLI/CB", "WiC/WiC", "COPA/COPA", "QQP/QQP", "BoolQA/BoolQA", "NLI/RTE", "SC/IMDB", "SC/yelp",
     "SC/amazon", "SC/SST-2", "TC/dbpedia", "TC/agnews", "MultiRC/MultiRC", "TC/yahoo"],
    {"4": ["MNLI", "CB", "WiC", "COPA", "QQP", "BoolQA", "RTE", "IMDB", "yelp", "amazon", "SST-2", "dbpedia",
           "agnews", "MultiRC", "yahoo"],
     "5": ["MultiRC", "BoolQA", "WiC", "MNLI", "CB", "COPA", "QQP", "RTE", "IMDB", "SST-2", "dbpedia", "agnews",
           "yelp", "amazon", "yahoo"],
     "6": ["yelp", "amazon", "MNLI", "CB", "COPA", "QQP", "RTE", "IMDB", "SST-2", "dbpedia", "agnews", "yahoo",
           "MultiRC", "BoolQA", "WiC"]}, examples=120)


def _in_data_dir(data: dict[str, Any]) -> None:
    """Task file paths that start with DATA_DIR put under ``data_dir`` (the presets' benchmark files)."""
    for spec in data.get("task_files") or []:
        if isinstance(spec, dict) and isinstance(spec.get("path"), str) and spec["path"].startswith(DATA_DIR):
            if not data.get("data_dir"):
                raise ValueError(f"task file {spec['path']!r} lies in the data directory: pass --data-dir (for the "
                                 f"olora presets: O-LoRA's CL_Benchmark folder, see docs/benchmark.md).")
            spec["path"] = str(Path(data["data_dir"]) / spec["path"][len(DATA_DIR):].lstrip("/"))


def load_config(
    preset: str | None = None, config_file: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> ContinualConfig:
    """Preset, then the YAML file, then command-line overrides: later ones win."""
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"Unknown preset {preset!r}; choose from {sorted(PRESETS)}.")
    data: dict[str, Any] = copy.deepcopy(PRESETS[preset or "default"])
    lines: dict[str, int] = {}
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise FileNotFoundError(f"Config file {path} does not exist.")
        loaded, lines = _read_yaml(path)
        data.update(loaded)
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    if given.get("orders") and all(isinstance(name, str) for name in given["orders"]):
        given["orders"] = _named(data.get("orders"), given["orders"])
    data.update(given)
    _in_data_dir(data)
    try:
        return ContinualConfig.from_dict(data)
    except ValueError as error:  # a setting the file gave (and no flag replaced) is named with its line
        key = _named_key(str(error), [k for k in lines if k not in given])
        if key is None:
            raise
        raise ValueError(f"{path}, line {lines[key]}: {error}") from None


def _named(defined: Any, names: list[str]) -> dict[str, Any]:
    """The orders among ``defined`` (the preset's or the config file's named orders) that ``names`` pick."""
    defined = defined if isinstance(defined, dict) else {}
    unknown = [name for name in names if name not in defined]
    if unknown:
        raise ValueError(f"--orders names {unknown}, but the preset and config name the orders {sorted(defined)}; "
                         f"pick among those, or give orders as task names, e.g. --orders b,a,c.")
    return {name: defined[name] for name in names}


def _read_yaml(path: Path) -> tuple[dict[str, Any], dict[str, int]]:
    """A config file's settings and the line of each; a syntax error, an alias or nesting past the
    bound names the file, line and column."""
    try:
        loaded, node = boundedyaml.compose(read_text(path))
    except yaml.YAMLError as error:
        raise ValueError(boundedyaml.describe(error, path)) from None
    if not isinstance(loaded, dict):
        raise ValueError(f"Config file {path} must hold a mapping of settings, got {type(loaded).__name__}.")
    return loaded, {key.value: key.start_mark.line + 1 for key, _ in node.value if isinstance(key.value, str)}


def _named_key(message: str, keys: list[str]) -> str | None:
    """The setting among ``keys`` that an error message names first, if any."""
    found = [(m.start(), key) for key in keys if (m := re.search(rf"\b{re.escape(key)}\b", message))]
    return min(found)[1] if found else None
