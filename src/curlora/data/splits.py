"""Core data types and seeded, stratified, leak-free splitting.

Every split here is a pure function of its inputs and an integer seed, so an
experiment can be re-run bit-for-bit, and every split is stratified so that
small evaluation sets keep the label balance of the whole task (a 3-class task
with 100 eval rows must not lose a class by chance).
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "DataError",
    "Example",
    "TaskSplits",
    "text_key",
    "deduplicate",
    "stratified_split",
    "stratified_subsample",
    "make_validation_split",
    "split_refusal",
]


class DataError(ValueError):
    """Bad or unreachable input data; the message names the file/source and the fix."""


@dataclass(frozen=True)
class Example:
    """One labelled example: a sentence, or a sentence pair when ``text_pair`` is set."""

    text: str
    label: int
    text_pair: str | None = None


@dataclass
class TaskSplits:
    """A task ready for training: its label names and disjoint train / eval examples."""

    name: str
    label_names: list[str]
    train: list[Example]
    eval: list[Example]
    metric: str = "accuracy"
    notes: list[str] = field(default_factory=list)
    prompt: Any = None  # data.prompts.Prompt: how the generative protocol asks for the label

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @property
    def is_pair(self) -> bool:
        return any(e.text_pair is not None for e in self.train)

    def majority_accuracy(self) -> float:
        """Eval accuracy of always predicting the most frequent TRAIN label.

        The floor any trained classifier must beat; ties go to the lowest label id
        so the number is deterministic.
        """
        if not self.train or not self.eval:
            raise DataError(f"task {self.name!r}: majority accuracy needs non-empty train and eval")
        counts = Counter(e.label for e in self.train)
        best = max(sorted(counts), key=lambda lab: counts[lab])
        return sum(e.label == best for e in self.eval) / len(self.eval)


def text_key(example: Example) -> tuple[str, str | None]:
    """Identity of an example's text for leakage checks: case- and whitespace-insensitive."""

    def norm(s: str) -> str:
        return " ".join(s.casefold().split())

    return (norm(example.text), None if example.text_pair is None else norm(example.text_pair))


def deduplicate(examples: Iterable[Example]) -> tuple[list[Example], int, int]:
    """Drop repeated texts; texts seen with conflicting labels are dropped entirely.

    Returns (kept, n_duplicates_dropped, n_conflicting_texts_dropped). Order of first
    occurrence is kept so the result is deterministic.
    """
    groups: dict[tuple[str, str | None], list[Example]] = {}
    for ex in examples:
        groups.setdefault(text_key(ex), []).append(ex)
    kept: list[Example] = []
    dups = conflicts = 0
    for members in groups.values():
        if len({m.label for m in members}) > 1:
            conflicts += 1
            continue
        kept.append(members[0])
        dups += len(members) - 1
    return kept, dups, conflicts


def _grouped_by_label(examples: Sequence[Example]) -> dict[int, list[list[Example]]]:
    """Group identical texts together (so they land on one side), bucketed by label."""
    groups: dict[tuple[str, str | None], list[Example]] = {}
    for ex in examples:
        groups.setdefault(text_key(ex), []).append(ex)
    by_label: dict[int, list[list[Example]]] = defaultdict(list)
    for members in groups.values():
        # a group with mixed labels is stratified by its most common label
        lab = Counter(m.label for m in members).most_common(1)[0][0]
        by_label[lab].append(members)
    return by_label


def stratified_split(
    examples: Sequence[Example], fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """Split into (rest, held_out) with about ``fraction`` of each label held out.

    Identical texts (see :func:`text_key`) always go to the same side, so no text is
    in both parts. Every label with at least two distinct texts gets at least one
    held-out and one remaining example.
    """
    if not 0.0 < fraction < 1.0:
        raise DataError(f"split fraction must be in (0, 1), got {fraction}")
    rng = random.Random(seed)
    rest: list[Example] = []
    held: list[Example] = []
    by_label = _grouped_by_label(examples)
    for lab in sorted(by_label):
        groups = by_label[lab]
        rng.shuffle(groups)
        n = len(groups)
        k = int(round(fraction * n))
        if n >= 2:
            k = min(max(k, 1), n - 1)
        for i, g in enumerate(groups):
            (held if i < k else rest).extend(g)
    rng.shuffle(rest)
    rng.shuffle(held)
    return rest, held


def split_refusal(origin: str, examples: Sequence[Example], purpose: str, fraction: float) -> DataError:
    """Why ``examples`` cannot be split: how many rows there are, how many only repeat a text (identical
    texts must stay on one side, so they count once), and what each side needs."""
    kept, repeats, conflicts = deduplicate(examples)
    per_label = Counter(e.label for e in kept)
    counts = ", ".join(f"label {lab}: {per_label[lab]}" for lab in sorted(per_label)) or "none"
    what = f"{len(examples)} rows"
    if repeats:
        what += f", {repeats} of them repeating an earlier text"
    if conflicts:
        what += f", {conflicts} texts with conflicting labels dropped"
    return DataError(
        f"{origin}: cannot make the {purpose} split (fraction {fraction}): {what}; {len(kept)} distinct "
        f"texts remain ({counts}), and a split needs a label with at least 2 distinct texts so each side "
        f"gets one; add more distinct rows" + (" or remove the duplicates" if repeats else "")
    )


def make_validation_split(
    examples: Sequence[Example], fraction: float = 0.1, seed: int = 0, origin: str = "training data"
) -> tuple[list[Example], list[Example]]:
    """Carve a stratified, text-disjoint validation set out of training data.

    For choosing hyper-parameters (e.g. the learning rate) without touching eval.
    Returns (train, validation).
    """
    train, val = stratified_split(examples, fraction, seed)
    if not train or not val:
        raise split_refusal(origin, examples, "validation", fraction)
    return train, val


def stratified_subsample(examples: Sequence[Example], n: int, seed: int) -> list[Example]:
    """A seeded subsample of ``n`` examples keeping the label proportions.

    Quotas per label use largest remainders; every present label keeps at least one
    example when ``n`` allows, so a small debug run still sees all classes.
    """
    if n < 0:
        raise DataError(f"subsample size must be >= 0, got {n}")
    if n >= len(examples):
        return list(examples)
    rng = random.Random(seed)
    by_label: dict[int, list[Example]] = defaultdict(list)
    for ex in examples:
        by_label[ex.label].append(ex)
    labels = sorted(by_label)
    total = len(examples)
    exact = {lab: n * len(by_label[lab]) / total for lab in labels}
    quota = {lab: int(exact[lab]) for lab in labels}
    if n >= len(labels):
        for lab in labels:
            quota[lab] = max(quota[lab], 1)
    left = n - sum(quota.values())
    order = sorted(labels, key=lambda lab: (-(exact[lab] - int(exact[lab])), lab))
    i = 0
    while left > 0:
        lab = order[i % len(order)]
        if quota[lab] < len(by_label[lab]):
            quota[lab] += 1
            left -= 1
        i += 1
    while left < 0:  # minimum-one rule overshot: trim the largest quotas
        lab = max(labels, key=lambda lab: (quota[lab], -lab))
        quota[lab] -= 1
        left += 1
    out: list[Example] = []
    for lab in labels:
        out.extend(rng.sample(by_label[lab], quota[lab]))
    rng.shuffle(out)
    return out
