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
        # The answer is the word's own tokens (with its leading space outside a chat turn) and one end token.
        assert answer == smol_tokenizer(word if chat else " " + word, add_special_tokens=False).input_ids + [2]
        assert smol_tokenizer.decode(answer) == (word if chat else " " + word) + "<|im_end|>"
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
    assert turns.count("<|im_start|>assistant\nnegative<|im_end|>") == 1 and turns.count("<|im_start|>user") == 3


def test_max_length_bounds_the_example_text_not_the_template(smol_tokenizer):
    collator = PromptCollator(smol_tokenizer, 8, chat_template=False)
    long = Example("word " * 50, 0, text_pair="short pair")
    ids = collator.prompt_ids(long, PROMPTS["mrpc"])
    full = PromptCollator(smol_tokenizer, 10_000, chat_template=False).prompt_ids(long, PROMPTS["mrpc"])
    template = len(full) - len(smol_tokenizer(" " + long.text, add_special_tokens=False).input_ids) - len(
        smol_tokenizer(" short pair", add_special_tokens=False).input_ids)
    assert len(ids) == template + 8  # the longer text was cut first, the template kept whole
    assert smol_tokenizer.decode(ids).endswith("Sentence 2: short pair\nAnswer:")


def test_gemma_tokenizer_mask_covers_exactly_the_answer():
    from transformers import AutoTokenizer

    from curlora.fileio import cache_dir

    converted = cache_dir() / "models" / "gemma-3-270m"
    if not (converted / "config.json").is_file():
        pytest.skip("Gemma-3-270m not converted yet (run with --model gemma3-270m once to fetch it)")
    tokenizer = AutoTokenizer.from_pretrained(converted)
    collator = PromptCollator(tokenizer, 64, chat_template=False)
    prompt = PROMPTS["bbc_news"]
    example = Example("Shares rose sharply today.", 0)
    batch = collator.training_batch([(example, prompt)])
    answer = _answer_part(batch, 0)
    assert answer == tokenizer(" business", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    assert batch["input_ids"][0].tolist()[:1] == [tokenizer.bos_token_id]  # Gemma's prompts start with <bos>


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
