"""Classification tasks as instruction text: the generative protocol's prompt → answer pairs.

A :class:`Prompt` is a template (instruction, input, answer cue: the order of O-LoRA's and FLAN's
prompts) with ``{text}`` (and ``{text_pair}`` for sentence pairs), plus one answer word per label.
The instruction comes first so that every prompt of a task starts with the same tokens, which run
once per batch (:mod:`curlora.continual.forward`). Registered tasks have hand-written
prompts (``PROMPTS``); any other task, a user's file among them, gets :func:`default_prompt`
(its label names as answers) unless its YAML entry gives ``template`` / ``label_words``.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .splits import DataError

__all__ = ["Prompt", "PROMPTS", "TEMPLATES", "check_template", "default_prompt", "default_template", "prompt_for"]

FIELDS = ("text", "text_pair")
#: A template is an instruction around the text and an answer cue: this bounds a prompt's length beside
#: max_length (which bounds the example's own text).
MAX_TEMPLATE_CHARS = 2000


@dataclass(frozen=True)
class Prompt:
    """A task's instruction template and the answer word of each label (in label order)."""

    template: str
    label_words: tuple[str, ...]

    def check(self, label_names: Sequence[str], is_pair: bool, origin: str) -> "Prompt":
        """Refuse a template or answer list that cannot express the task; ``origin`` names it."""
        check_template(self.template, is_pair, origin)
        words = [w.strip() if isinstance(w, str) else w for w in self.label_words]
        if len(words) != len(label_names) or not all(isinstance(w, str) and w for w in words):
            raise DataError(f"{origin}: label_words needs one non-empty word per label {list(label_names)}, "
                            f"got {list(self.label_words)}")
        if len({w.casefold() for w in words}) != len(words):
            raise DataError(f"{origin}: label_words {words} repeat a word; each label needs its own answer")
        # Trailing whitespace is dropped: the answer brings its own leading space (or the chat turn
        # its own line break), and a space token before it is one the model never sees before a word.
        return Prompt(self.template.rstrip(), tuple(words))


def check_template(template: str, is_pair: bool, origin: str) -> None:
    """Refuse a template whose replacement fields are not exactly {text} (and {text_pair} for a pair
    task): a conversion or format spec ({text!a}, {text:.0}, {text:>2000000}) would silently hide the
    example's text from the model, or blow the prompt past any length bound; so would a template longer
    than :data:`MAX_TEMPLATE_CHARS`."""
    if len(template) > MAX_TEMPLATE_CHARS:
        raise DataError(f"{origin}: template is {len(template):,} characters; at most {MAX_TEMPLATE_CHARS:,}")
    try:
        parsed = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(template)
                  if name is not None]
    except ValueError as error:
        raise DataError(f"{origin}: template {template!r} is not a valid format string ({error}); "
                        f"write fields as {{text}} and {{text_pair}}, literal braces as {{{{ }}}}") from None
    used = {name for name, _, _ in parsed}
    unknown = sorted(used - set(FIELDS))
    if unknown:
        raise DataError(f"{origin}: template fields {unknown} are unknown; use {{text}} and {{text_pair}}")
    dressed = [f"{{{name}{'!' + conversion if conversion else ''}{':' + spec if spec else ''}}}"
               for name, spec, conversion in parsed if spec or conversion]
    if dressed:
        raise DataError(f"{origin}: template field {dressed[0]} has a conversion or format spec; write the "
                        f"fields as plain {{text}} and {{text_pair}}")
    if "text" not in used or ("text_pair" in used) != is_pair:
        need = "{text} and {text_pair}" if is_pair else "{text} and no {text_pair}"
        raise DataError(f"{origin}: the template must use {need} for this task, got {template!r}")


def _choices(words: Sequence[str]) -> str:
    """The answer words as a template names them: a brace in a word is the word's own character, never a
    replacement field (a word "{text}" must not put the example's text into the instruction)."""
    words = [w.replace("{", "{{").replace("}", "}}") for w in words]
    return ", ".join(words[:-1]) + f" or {words[-1]}" if len(words) > 1 else words[0]


def default_template(words: Sequence[str], is_pair: bool) -> str:
    """The template of a task without one of its own, naming the answer words it is scored on."""
    inputs = "Text 1: {text}\nText 2: {text_pair}" if is_pair else "Text: {text}"
    return f"Answer with one of: {_choices(words)}.\n{inputs}\nAnswer:"


def default_prompt(label_names: Sequence[str], is_pair: bool) -> Prompt:
    """The prompt of a task without one of its own: its label names (underscores as spaces) are the answers."""
    words = tuple(name.replace("_", " ") for name in label_names)
    return Prompt(default_template(words, is_pair), words)


def _sentiment(kind: str) -> Callable[[Sequence[str]], str]:
    return lambda words: f"Is the sentiment of this {kind} {_choices(words)}?\n{kind.capitalize()}: {{text}}\nAnswer:"


# Built-in tasks' templates, each written around whichever answer words are scored (a task file may
# give other ``label_words``: the instruction then names those), and their own answer words.
TEMPLATES: dict[str, Callable[[Sequence[str]], str]] = {
    "mrpc": lambda w: f"Do the two sentences mean the same thing? Answer {_choices(w[::-1])}.\n"
                      "Sentence 1: {text}\nSentence 2: {text_pair}\nAnswer:",
    "sst2": _sentiment("review"),
    "sentiment140": _sentiment("tweet"),
    "rotten_tomatoes": _sentiment("review"),
    "vader_tweets": _sentiment("tweet"),
    "bbc_news": lambda w: f"Which topic is this news article about: {_choices(w)}?\nArticle: {{text}}\nAnswer:",
}
_WORDS = {"mrpc": ("no", "yes"), "sst2": ("negative", "positive"), "sentiment140": ("negative", "neutral", "positive"),
          "rotten_tomatoes": ("negative", "positive"), "vader_tweets": ("negative", "neutral", "positive"),
          "bbc_news": ("business", "entertainment", "politics", "sports", "tech")}
PROMPTS: dict[str, Prompt] = {name: Prompt(TEMPLATES[name](words), words) for name, words in _WORDS.items()}


def prompt_for(name: str, label_names: Sequence[str], is_pair: bool, template: str | None = None,
               label_words: Sequence[str] | None = None, origin: str | None = None) -> Prompt:
    """A task's prompt: the given template / words, else the registered prompt, else the default;
    a template not given is written around the words that are scored."""
    words = None if label_words is None else tuple(w.strip() if isinstance(w, str) else w for w in label_words)
    built = PROMPTS[name] if name in PROMPTS else default_prompt(label_names, is_pair)
    if words is not None and all(isinstance(w, str) for w in words):  # check() refuses any other words
        built = Prompt(TEMPLATES[name](words) if name in TEMPLATES else default_template(words, is_pair), words)
    prompt = Prompt(template if template is not None else built.template, words if words is not None else built.label_words)
    return prompt.check(label_names, is_pair, origin or f"task {name!r}")
