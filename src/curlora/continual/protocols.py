"""How a task is learned and scored: the benchmark's protocols, in one registry.

* ``heads`` (the paper's): a fresh linear head per task reads the last token's hidden state; the
  head trains beside the adapter, and the frozen backbone with heads alone (``head``) is the floor.
* ``generative`` (how LLMs are fine-tuned, and how O-LoRA, TRACE and InfLoRA measure continual
  learning): each task is instruction text (data.prompts), the LM is trained on the answer tokens
  only, and a task is scored by which label's answer the LM finds likeliest. No head: the adapter
  learns everything, and the floors are the untouched model answering zero-shot and with k training
  rows shown in the prompt (``zero-shot``, ``k-shot``).

A protocol says how a task becomes batches and a loss (``RunState.loss``), how a task is scored
(``RunState.accuracy``) and which frozen-backbone methods are its floors. The runner, report and
frontier read only this interface.
"""

from __future__ import annotations

import copy
import math
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from curlora.data import ClassificationCollator, DataError, Example, PromptCollator, TaskSplits
from curlora.continual.forward import answer_log_probs, greedy_tokens, last_hidden, lm_logits
from curlora.continual.training import Item, autocast, batches, derived_seed


class RunState(ABC):
    """What a protocol keeps for one run (a method at one rate and seed) beside the adapted LM."""

    def task_parameters(self, task_indices: Sequence[int]) -> list[nn.Parameter]:
        """Parameters trained at ``head_lr`` (besides the method's own) while the tasks of
        ``task_indices`` are learned (one task, or every task for multitask); none by default."""
        return []

    @abstractmethod
    def loss(self, model: nn.Module, items: Sequence[Item], backbone_trains: bool) -> torch.Tensor:
        """The loss summed over ``items`` (each row under its own task's head or prompt)."""

    @abstractmethod
    def accuracy(self, model: nn.Module, task_index: int, split: str, examples: Sequence[Example],
                 base: bool, demonstrations: int = 0, calibrated: bool = False) -> float:
        """Accuracy on ``examples`` of task ``task_index`` (``split`` names them for caching); ``base``:
        the model is the unchanged base model, so what it computes can be cached across runs;
        ``demonstrations`` and ``calibrated``: how a floor prompts and scores (the generative protocol's)."""

    def final_checks(self, model: nn.Module, evaluation: Sequence[Sequence[Example]], demonstrations: int = 0,
                     evaluating: Callable[[int], AbstractContextManager] = lambda j: nullcontext(),
                     calibrated: bool = False) -> dict[str, Any]:
        """Extra per-run measurements after the last task (results.json fields), task j in the state
        ``evaluating(j)`` puts the model in (a bank's U_j); none by default."""
        return {}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors a checkpoint must hold to resume this state."""
        return {}

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Put :meth:`state_dict` back."""

    def num_parameters(self) -> int:
        return 0


class Protocol(ABC):
    """One way of learning and scoring the tasks of a run, set up once per command."""

    name: ClassVar[str]
    summary: ClassVar[str]
    floors: ClassVar[tuple[str, ...]]  # the frozen-backbone methods that mean something here
    default_methods: ClassVar[tuple[str, ...]]

    def __init__(self, tasks: Sequence[TaskSplits], tokenizer: Any, config: Any, device: torch.device,
                 bf16: bool) -> None:
        self.tasks = list(tasks)
        # Each task's place in the config's list: what a run in another order keys its base-model cache and
        # its seeds by, so that a task's head and demonstrations do not depend on when it is learned.
        self.canonical = list(range(len(self.tasks)))
        self.config = config
        self.device = device
        self.bf16 = bf16
        # What the unchanged base model computes never changes: kept across the runs of a command
        # (and handed to worker processes), keyed by (split, task, ...).
        self.base_cache: dict[tuple, Any] = {}

    @abstractmethod
    def start_run(self, seed: int, lm: nn.Module) -> RunState:
        """A fresh state for a run with ``seed`` on ``lm``."""

    def describe(self) -> dict[str, Any]:
        """What results.json records about the protocol."""
        return {"name": self.name}

    def reordered(self, order: Sequence[int]) -> "Protocol":
        """This protocol for a run that learns the tasks in ``order`` (indices into ``tasks``): task ``i`` of
        the copy is ``tasks[order[i]]``; it shares the tokenizer's collator and the base-model cache."""
        view = copy.copy(self)
        view.tasks = [self.tasks[k] for k in order]
        view.canonical = [self.canonical[k] for k in order]
        return view

    def _cached(self, key: tuple, base: bool, compute):
        if not base:
            return compute()
        if key not in self.base_cache:
            self.base_cache[key] = compute()
        return self.base_cache[key]


# -- heads ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Features:
    """Last-token features of a split, batch by batch as ``accuracy`` computes them, with labels.

    Kept per batch so a head applied to them does the very matmuls it would do inline: a frozen
    backbone's features can be computed once and scored by any head, bit for bit the same."""

    batches: list[torch.Tensor]
    labels: list[torch.Tensor]


def by_length(examples: Sequence[Example], lengths: Sequence[int]) -> list[Example]:
    """``examples`` sorted by token count: an evaluation batch of similar lengths wastes little on
    padding (characters were a poor proxy: such batches were a third padding); order does not
    change accuracy."""
    return [examples[i] for i in sorted(range(len(examples)), key=lengths.__getitem__)]


@torch.no_grad()
def split_features(model: nn.Module, examples: Sequence[Example], collator: ClassificationCollator,
                   batch_size: int = 32, bf16: bool = False, device: torch.device | None = None) -> Features:
    """The model's last-token features of ``examples`` (in eval mode), for ``head_accuracy``."""
    device = device or next(model.parameters()).device
    model.eval()
    features, labels = [], []
    tokens = collator(examples)["attention_mask"].sum(-1).tolist() if examples else []
    for batch in batches(by_length(examples, tokens), batch_size):
        inputs = {k: v.to(device) for k, v in collator(batch).items()}
        with autocast(device, bf16):
            features.append(last_hidden(model, inputs["input_ids"], inputs["attention_mask"]))
        labels.append(inputs["labels"])
    return Features(features, labels)


@torch.no_grad()
def head_accuracy(head: nn.Linear, features: Features) -> float:
    """Accuracy of ``head`` on precomputed features."""
    head.eval()
    correct = sum(int((head(f.float()).argmax(dim=-1) == y).sum()) for f, y in zip(features.batches, features.labels))
    return correct / sum(len(y) for y in features.labels)


class HeadsRun(RunState):
    """A run's task heads: task t trains head t beside the adapter; every other head stays frozen
    (a replayed row of an earlier task goes through that task's head, which stays as its task left
    it: the old task is evaluated with it, so replay trains the shared adapter to keep serving it)."""

    def __init__(self, protocol: "HeadsProtocol", seed: int, hidden: int) -> None:
        self.protocol = protocol
        heads = []
        for i, task in enumerate(protocol.tasks):
            torch.manual_seed(derived_seed(seed, "head", protocol.canonical[i]))
            heads.append(nn.Linear(hidden, task.num_labels))
        self.heads = nn.ModuleList(heads).to(protocol.device)

    def task_parameters(self, task_indices: Sequence[int]) -> list[nn.Parameter]:
        for j, head in enumerate(self.heads):
            head.requires_grad_(j in task_indices)
        return [p for j in task_indices for p in self.heads[j].parameters()]

    def loss(self, model: nn.Module, items: Sequence[Item], backbone_trains: bool) -> torch.Tensor:
        protocol = self.protocol
        inputs = {k: v.to(protocol.device) for k, v in protocol.collator([e for e, _ in items]).items()}
        with autocast(protocol.device, protocol.bf16), torch.no_grad() if not backbone_trains else nullcontext():
            features = last_hidden(model, inputs["input_ids"], inputs["attention_mask"])
        features, labels, owners = features.float(), inputs["labels"], [j for _, j in items]
        if len(set(owners)) == 1:  # one matmul when every row is the same task's
            return F.cross_entropy(self.heads[owners[0]](features), labels, reduction="sum")
        total = features.new_zeros(())
        for j in dict.fromkeys(owners):  # in order of first appearance, the order the sum always had
            rows = torch.tensor([i for i, owner in enumerate(owners) if owner == j], device=features.device)
            total = total + F.cross_entropy(self.heads[j](features[rows]), labels[rows], reduction="sum")
        return total

    def accuracy(self, model: nn.Module, task_index: int, split: str, examples: Sequence[Example],
                 base: bool, demonstrations: int = 0, calibrated: bool = False) -> float:
        protocol = self.protocol
        features = protocol._cached((split, protocol.canonical[task_index]), base, lambda: split_features(
            model, examples, protocol.collator, protocol.config.eval_batch_size, protocol.bf16, protocol.device))
        return head_accuracy(self.heads[task_index], features)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self.heads.state_dict().items()}

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.heads.load_state_dict(dict(tensors))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.heads.parameters())


class HeadsProtocol(Protocol):
    name = "heads"
    summary = "a fresh linear head per task on the last token's hidden state (the paper's protocol)"
    floors = ("head",)
    default_methods = ("curlora", "lora", "head")

    def __init__(self, tasks, tokenizer, config, device, bf16) -> None:
        super().__init__(tasks, tokenizer, config, device, bf16)
        self.collator = ClassificationCollator(tokenizer, config.max_length)

    def start_run(self, seed: int, lm: nn.Module) -> RunState:
        return HeadsRun(self, seed, lm.config.hidden_size)


# -- generative ---------------------------------------------------------------------------------
# Texts that say nothing, whose answers give contextual calibration its prior (Zhao et al. 2021 used
# "N/A", "" and "[MASK]"; the last is BERT's, no word to a causal LM).
CONTENT_FREE = ("N/A", "")


@dataclass(frozen=True)
class Scored:
    """A split's accuracy by summed answer log-probability (``acc``) and per answer character (``acc_norm``)."""

    acc: float
    acc_norm: float
    predicted: tuple[float, ...] = ()  # rows predicted as each label (a tie split among its labels)


def credit(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Correct answers among rows of ``scores`` (rows × labels): a row whose top score several labels
    share counts 1/n when its label is among the n (argmax would hand every tie to the first label)."""
    tied = scores == scores.max(-1, keepdim=True).values
    return float((tied.gather(1, labels[:, None]).squeeze(1) / tied.sum(-1)).sum())


class GenerativeRun(RunState):
    """Prompt → answer: the LM's loss on the answer tokens, scoring by the answers' log-probabilities."""

    def __init__(self, protocol: "GenerativeProtocol", seed: int) -> None:
        self.protocol = protocol
        self.seed = seed
        self.scored: dict[tuple[int, int], Scored] = {}  # (task, id of the rows) -> their latest scores

    def loss(self, model: nn.Module, items: Sequence[Item], backbone_trains: bool) -> torch.Tensor:
        protocol = self.protocol
        batch = protocol.collator.training_batch([(e, protocol.tasks[j].prompt) for e, j in items])
        batch = {k: v.to(protocol.device) for k, v in batch.items()}
        targets = batch["targets"]
        wanted = torch.zeros_like(targets, dtype=torch.bool)
        wanted[:, :-1] = targets[:, 1:] != -100  # the position before each answer token predicts it
        with autocast(protocol.device, protocol.bf16):
            logits = lm_logits(model, batch["input_ids"], batch["attention_mask"], wanted)
        return F.cross_entropy(logits.float(), targets[:, 1:][wanted[:, :-1]], reduction="sum")

    def demonstrations(self, task_index: int, k: int) -> list[Example]:
        """The k-shot floor's training rows for a task: ``k`` rows of every label (the N-way K-shot
        convention: a prompt that shows some labels and not others tilts the model towards the shown
        ones, Zhao et al. 2021), drawn per run seed from training rows only, in a seeded order; a
        label with fewer than ``k`` training rows shows all it has."""
        task, canonical = self.protocol.tasks[task_index], self.protocol.canonical[task_index]
        order = torch.randperm(len(task.train), generator=torch.Generator().manual_seed(
            derived_seed(self.seed, "demonstrations", canonical))).tolist()
        by_label: dict[int, list[Example]] = {}
        for i in order:
            by_label.setdefault(task.train[i].label, []).append(task.train[i])
        chosen = [row for label in sorted(by_label) for row in by_label[label][:k]]
        shuffle = torch.randperm(len(chosen), generator=torch.Generator().manual_seed(
            derived_seed(self.seed, "demonstration order", canonical))).tolist()
        return [chosen[i] for i in shuffle]

    def accuracy(self, model: nn.Module, task_index: int, split: str, examples: Sequence[Example],
                 base: bool, demonstrations: int = 0, calibrated: bool = False) -> float:
        demos = tuple(self.demonstrations(task_index, demonstrations)) if demonstrations else ()
        key = (split, self.protocol.canonical[task_index], demos, calibrated)
        scored = self.protocol._cached(key, base, lambda: self._accuracy(model, task_index, examples, demos, calibrated))
        self.scored[(task_index, id(examples))] = scored
        return scored.acc

    @torch.no_grad()
    def _accuracy(self, model: nn.Module, task_index: int, examples: Sequence[Example],
                  demos: Sequence[Example], calibrated: bool = False) -> "Scored":
        protocol = self.protocol
        prompt, collator = protocol.tasks[task_index].prompt, protocol.collator
        answers = collator.answers(prompt)
        prior = self._content_free(model, task_index, demos) if calibrated else 0.0
        # lm-evaluation-harness's acc_norm: the log-probability per character of the answer as written.
        chars = torch.tensor([len(collator.answer_text(word)) for word in prompt.label_words], dtype=torch.float32)
        model.eval()
        lengths = [len(collator.prompt_ids(e, prompt, demos)) for e in examples]
        acc = norm = 0.0
        predicted = torch.zeros(len(answers), dtype=torch.float64)
        for batch in batches(by_length(examples, lengths), protocol.config.eval_batch_size):
            inputs = {k: v.to(protocol.device) for k, v in collator.prompt_batch(batch, prompt, demos).items()}
            with autocast(protocol.device, protocol.bf16):
                scores = answer_log_probs(model, inputs["input_ids"], inputs["attention_mask"], answers).cpu() - prior
            labels = inputs["labels"].cpu()
            acc += credit(scores, labels)
            norm += credit(scores / chars, labels)
            tied = (scores == scores.max(-1, keepdim=True).values).double()
            predicted += (tied / tied.sum(-1, keepdim=True)).sum(0)
        return Scored(acc / len(examples), norm / len(examples), tuple(predicted.tolist()))

    @torch.no_grad()
    def _content_free(self, model: nn.Module, task_index: int, demos: Sequence[Example]) -> torch.Tensor:
        """Contextual calibration's prior (Zhao et al. 2021): each answer's score after the same prompt
        whose text says nothing ("N/A", and an empty text), averaged in probability; a calibrated floor
        subtracts it, so an answer the model favours whatever the text no longer wins every row."""
        protocol = self.protocol
        prompt, collator = protocol.tasks[task_index].prompt, protocol.collator
        pair = protocol.tasks[task_index].train[0].text_pair is not None
        empty = [Example(text, 0, text_pair=text if pair else None) for text in CONTENT_FREE]
        inputs = {k: v.to(protocol.device) for k, v in collator.prompt_batch(empty, prompt, demos).items()}
        with autocast(protocol.device, protocol.bf16):
            scores = answer_log_probs(model, inputs["input_ids"], inputs["attention_mask"], collator.answers(prompt))
        return torch.logsumexp(scores.cpu(), 0) - math.log(len(empty))

    @torch.no_grad()
    def final_checks(self, model: nn.Module, evaluation: Sequence[Sequence[Example]], demonstrations: int = 0,
                     evaluating: Callable[[int], AbstractContextManager] = lambda j: nullcontext(),
                     calibrated: bool = False) -> dict[str, Any]:
        """Whether greedy generation gives a valid answer at all, on the first ``generation_examples``
        evaluation rows of each task: the share whose generated text, up to the end of the answer, is
        one of the task's answers exactly as scored (:meth:`PromptCollator.answer_text`); each task's
        final length-normalised accuracy (``acc_norm``) beside the accuracy matrix's ``acc``; and how
        many evaluation rows were predicted as each label (a floor that never predicts a label shows it)."""
        rates, norms, predicted = [], [], []
        for j, examples in enumerate(evaluation):
            rows = list(examples[: self.protocol.config.generation_examples])
            demos = tuple(self.demonstrations(j, demonstrations)) if demonstrations else ()
            with evaluating(j):
                rates.append(self._valid_answers(model, rows, self.protocol.tasks[j].prompt, demos) / len(rows))
                scored = self.scored.get((j, id(examples))) or self._accuracy(model, j, examples, demos, calibrated)
            norms.append(scored.acc_norm)
            predicted.append(list(scored.predicted))
        return {"valid_answer_rate": rates, "accuracy_norm": norms, "predicted_labels": predicted}

    def _valid_answers(self, model: nn.Module, rows: Sequence[Example], prompt: Any,
                       demos: Sequence[Example]) -> int:
        """How many of ``rows`` greedy generation answers with one of the prompt's answer words."""
        protocol = self.protocol
        collator, tokenizer = protocol.collator, protocol.collator.tokenizer
        answers = {tokenizer.decode(ids) for ids in collator.answers(prompt)}  # the strings scoring compares
        longest = max(map(len, collator.answers(prompt))) + len(collator.end_ids)
        valid = 0
        model.eval()
        for batch in batches(rows, protocol.config.eval_batch_size):
            inputs = collator.prompt_batch(batch, prompt, demos)
            out = greedy_tokens(model, inputs["input_ids"].to(protocol.device),
                                inputs["attention_mask"].to(protocol.device), longest, collator.end_ids[0])
            for row in out.tolist():
                end = row.index(collator.end_ids[0]) if collator.end_ids[0] in row else len(row)
                valid += tokenizer.decode(row[:end]) in answers
        return valid


class GenerativeProtocol(Protocol):
    name = "generative"
    summary = ("instruction text, loss on the answer tokens only, scored by the likeliest label answer "
               "(no heads; floors: zero-shot and k-shot)")
    floors = ("zero-shot", "k-shot", "zero-shot-calibrated", "k-shot-calibrated")
    default_methods = ("curlora", "lora", "zero-shot", "k-shot")

    def __init__(self, tasks, tokenizer, config, device, bf16) -> None:
        super().__init__(tasks, tokenizer, config, device, bf16)
        self.collator = PromptCollator(tokenizer, config.max_length, config.chat_template)
        special = [t for t in self.collator.tokenizer.all_special_tokens if t]
        for task in self.tasks:  # a k-shot prompt writes the words as text: one would become the token
            for word in task.prompt.label_words:
                if clash := next((t for t in special if t in word), None):
                    raise DataError(f"task {task.name!r}: label word {word!r} holds the tokenizer's special token "
                                    f"{clash!r}; choose another word.")
        self.odd_answers = {t.name: odd for t in self.tasks if (odd := self.collator.odd_answers(t.prompt))}
        for task, odd in self.odd_answers.items():
            pieces = "; ".join(f"{word!r} as {'|'.join(tokens)}" for word, tokens in odd.items())
            warnings.warn(f"task {task!r}: answers scored as more tokens than in running text: {pieces} "
                          f"(see accuracy_norm, and docs/benchmark.md on answer forms)", stacklevel=2)

    def start_run(self, seed: int, lm: nn.Module) -> RunState:
        return GenerativeRun(self, seed)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "chat_template": self.collator.chat,
            "end_of_answer": self.collator.tokenizer.convert_ids_to_tokens(self.collator.end_ids),
            "scoring": "acc (the accuracy matrix, the frontier): the sum of the answer tokens' log-probabilities "
                       "given the prompt, scored in float32, a tie counting 1/n; acc_norm (accuracy_norm, the final "
                       "row): that sum per character of the answer as written; the end-of-answer token is trained "
                       "but not scored",
            "k_shot": self.config.k_shot,
            "k_shot_rows": "k_shot training rows of every label, in a seeded order",
            "prompts": {t.name: {"template": t.prompt.template, "label_words": list(t.prompt.label_words),
                                 "answers": [self.collator.tokenizer.convert_ids_to_tokens(ids)
                                             for ids in self.collator.answers(t.prompt)]}
                        for t in self.tasks},
            "odd_answers": self.odd_answers,
        }


PROTOCOLS: dict[str, type[Protocol]] = {p.name: p for p in (HeadsProtocol, GenerativeProtocol)}
