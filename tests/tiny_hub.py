"""A tiny "hub" model saved to a local folder: a byte-level BPE tokenizer with the reasoning markers
and a Qwen-style chat template, and a random Qwen3ForCausalLM — the same files a hub checkpoint has,
so the pretrained-model code path (AutoTokenizer / AutoModelForCausalLM.from_pretrained) runs on it
without a download."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import ROOT

FIXTURES = ROOT / "tests" / "fixtures"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]


def fixture_text() -> list[str]:
    texts = []
    for path in sorted((FIXTURES / "datasets").glob("*.jsonl")) + sorted((FIXTURES / "benchmarks").glob("*.jsonl")):
        for line in path.read_text().splitlines():
            texts.append(json.dumps(json.loads(line)))
    return texts


def build_tiny_hub_model(folder: Path, hidden: int = 32, layers: int = 1, padded_rows: int = 0,
                         bpe_vocab: int = 600) -> Path:
    """``padded_rows``: embedding/output rows past the tokenizer's (as Qwen3 pads 151,669 to 151,936);
    ``bpe_vocab``: the BPE vocabulary size (another size gives another token -> id map)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    from kd_sweeps.tokenizer import CHAT_TEMPLATE

    if (folder / "config.json").exists():
        return folder
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=bpe_vocab, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(fixture_text(), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<|endoftext|>",
                                        eos_token="<|im_end|>", additional_special_tokens=SPECIALS[1:])
    tokenizer.chat_template = CHAT_TEMPLATE
    config = Qwen3Config(vocab_size=len(tokenizer) + padded_rows, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=hidden // 2, max_position_embeddings=8192, tie_word_embeddings=True,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    Qwen3ForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
