"""Data layer: task registry, sources (hub / local files / user files / offline PyPI
suite), seeded stratified splits and left-padding classification batches."""

from .offline import ARCHIVES, cache_dir, fetch_archive
from .splits import (
    DataError,
    Example,
    TaskSplits,
    deduplicate,
    make_validation_split,
    stratified_split,
    stratified_subsample,
)
from .tasks import (
    CALIBRATION_CORPUS,
    CORPORA,
    OFFLINE_CORPUS,
    OFFLINE_SUITE,
    PAPER_CORPUS,
    PAPER_TASKS,
    TASKS,
    CorpusSpec,
    TaskSpec,
    load_corpus,
    load_corpus_file,
    load_task,
    load_task_file,
)
from .prompts import PROMPTS, Prompt, default_prompt, prompt_for
from .tokenization import ClassificationCollator, PromptCollator, last_token_index, prepare_tokenizer

__all__ = [
    "ARCHIVES",
    "CALIBRATION_CORPUS",
    "CORPORA",
    "OFFLINE_CORPUS",
    "OFFLINE_SUITE",
    "PAPER_CORPUS",
    "PAPER_TASKS",
    "TASKS",
    "ClassificationCollator",
    "PROMPTS",
    "Prompt",
    "PromptCollator",
    "CorpusSpec",
    "DataError",
    "Example",
    "TaskSpec",
    "TaskSplits",
    "cache_dir",
    "deduplicate",
    "default_prompt",
    "fetch_archive",
    "last_token_index",
    "load_corpus",
    "load_corpus_file",
    "load_task",
    "load_task_file",
    "make_validation_split",
    "prepare_tokenizer",
    "prompt_for",
    "stratified_split",
    "stratified_subsample",
]
