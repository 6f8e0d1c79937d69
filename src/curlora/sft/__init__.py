"""Supervised fine-tuning with a CURLoRA adapter: data, the Trainer run, generation, TRL."""

from curlora.sft.data import (
    IGNORE_INDEX,
    SFTCollator,
    build_dataset,
    load_conversations,
    prompt_text,
    tokenize_conversation,
    wiki_qa_pairs,
    write_jsonl,
)
from curlora.sft.generate import generate, load_for_generation
from curlora.sft.train import SUMMARY_NAME, SFTSettings, run_sft

__all__ = [
    "IGNORE_INDEX", "SFTCollator", "SFTSettings", "SUMMARY_NAME", "build_dataset", "generate",
    "load_conversations", "load_for_generation", "prompt_text", "run_sft", "tokenize_conversation",
    "wiki_qa_pairs", "write_jsonl",
]
