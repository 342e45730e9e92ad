"""The embedded tokenizer, built in code: words and numbers are tokens, symbols are single tokens.

It is a real ``PreTrainedTokenizerFast`` (saved and reloaded like any hub tokenizer) with the
reasoning markers ``<think>``/``</think>`` as special tokens and a Qwen-style chat template, so the
data pipeline runs the same code on it as on Qwen3's tokenizer.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from kd_sweeps.synthetic import corpus_text

THINK, END_THINK = "<think>", "</think>"
IM_START, IM_END, PAD = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
SPECIAL_TOKENS = [PAD, IM_START, IM_END, THINK, END_THINK]
UNK = "<unk>"

# Same shape as Qwen3's template: turns wrapped in <|im_start|>role\n ... <|im_end|>\n; a generation
# prompt opens the assistant turn. Only the last user/assistant pair matters for this task.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)

# Words and numbers stay whole ("15" is one token: a sum is one table lookup); a signed digit (an
# operation such as "+9") is one token; every space, newline and symbol is its own token.
SPLIT_PATTERN = r"[A-Za-z]+|[+-]\d|\d+|\s|[^A-Za-z\d\s]"


def build_tokenizer():
    """A fast tokenizer over the embedded task's vocabulary (about 55 tokens)."""
    from transformers import PreTrainedTokenizerFast

    pieces = pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated")
    words = sorted({piece for piece, _ in pieces.pre_tokenize_str(corpus_text())})
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + [UNK] + words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pieces
    backend.decoder = decoders.Fuse()  # pieces carry their own whitespace: join without separators
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=UNK,
        pad_token=PAD,
        eos_token=IM_END,
        additional_special_tokens=[IM_START, THINK, END_THINK],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def load_or_build_tokenizer(path: Path):
    """Build once and save; later calls load the saved files (the same code path as a hub tokenizer)."""
    from transformers import AutoTokenizer

    if not (path / "tokenizer.json").exists():
        build_tokenizer().save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)
