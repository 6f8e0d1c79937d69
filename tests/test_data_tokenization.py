"""Left-padded classification batches and the last-token index."""

from __future__ import annotations

import copy

import pytest
import torch

from curlora.data import ClassificationCollator, Example, last_token_index


def test_last_token_index_both_sides():
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]])
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    assert last_token_index(left).tolist() == [3, 3, 3]
    assert last_token_index(right).tolist() == [1, 3, 0]
    with pytest.raises(ValueError):
        last_token_index(torch.tensor([[0, 0]]))


def test_collator_left_pads_and_truncates(smol_tokenizer):
    col = ClassificationCollator(smol_tokenizer, max_length=8)
    side_before = smol_tokenizer.padding_side
    batch = col([Example("short", 1), Example("a much longer sentence with many words in it " * 3, 0)])
    assert smol_tokenizer.padding_side == side_before
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].shape == (2, 8) and batch["labels"].tolist() == [1, 0]
    m = batch["attention_mask"]
    assert m[0, -1] == 1 and m[0, 0] == 0 and m[1].all()
    assert (batch["input_ids"][0][m[0] == 0] == col.tokenizer.pad_token_id).all()


def test_pairs_use_tokenizer_pair_call(smol_tokenizer):
    col = ClassificationCollator(smol_tokenizer, max_length=64)
    b = col([Example("Hello there.", 1, "General Kenobi.")])
    expect = smol_tokenizer("Hello there.", "General Kenobi.")["input_ids"]
    assert b["input_ids"][0].tolist() == expect
    # SmolLM2's tokenizer has no pair template: the two texts are concatenated, no separator
    a = smol_tokenizer("Hello there.")["input_ids"]
    c = smol_tokenizer("General Kenobi.")["input_ids"]
    assert expect == a + c
    long = col([Example("word " * 100, 0, "other " * 10)])
    assert long["input_ids"].shape[1] == 64


def test_no_pad_token_uses_eos(smol_tokenizer):
    tok = copy.deepcopy(smol_tokenizer)
    tok.pad_token = None
    assert tok.pad_token is None
    col = ClassificationCollator(tok, max_length=16)
    assert tok.pad_token is None  # the caller's copy is not modified
    assert col.tokenizer.pad_token == tok.eos_token
    b = col([Example("one", 0), Example("one two three four", 1)])
    assert (b["input_ids"][0][b["attention_mask"][0] == 0] == tok.eos_token_id).all()


def test_left_padded_last_hidden_equals_unpadded(smol_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(smol_tokenizer), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256)
    model = LlamaForCausalLM(cfg).eval()
    exs = [Example("Hi.", 0), Example("The quick brown fox jumps over the lazy dog.", 1),
           Example("A third, middle-sized one!", 1)]
    col = ClassificationCollator(smol_tokenizer, max_length=64)
    batch = col(exs)
    assert len(set(batch["attention_mask"].sum(1).tolist())) == 3  # different lengths
    with torch.no_grad():
        out = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        idx = last_token_index(batch["attention_mask"])
        got = out.last_hidden_state[torch.arange(len(exs)), idx]
        for i, ex in enumerate(exs):
            single = col([ex])
            assert single["attention_mask"].all()
            ref = model.model(input_ids=single["input_ids"]).last_hidden_state[0, -1]
            torch.testing.assert_close(got[i], ref, atol=1e-5, rtol=0)


def test_a_batch_mixing_pairs_and_single_sentences_encodes_each_row_as_alone(smol_tokenizer):
    """Replay puts a sentence-pair task's rows beside a single-sentence task's in one batch."""
    col = ClassificationCollator(smol_tokenizer, max_length=32)
    rows = [Example("a fine film", 1), Example("He said so.", 0, text_pair="So he said."), Example("dull", 0)]
    batch = col(rows)
    assert batch["labels"].tolist() == [1, 0, 0]
    for i, row in enumerate(rows):
        alone = col([row])
        n = int(alone["attention_mask"].sum())
        assert batch["input_ids"][i, -n:].tolist() == alone["input_ids"][0, -n:].tolist()
        assert int(batch["attention_mask"][i].sum()) == n and batch["attention_mask"][i, -n:].all()
