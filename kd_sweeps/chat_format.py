"""How a record becomes the token ids training and generation see: the chat messages, the
``<think>`` / ``</think>`` ids, the student tokenizer's chat template. Below ``data`` and ``prepare``,
which both render records with it."""

from __future__ import annotations

from typing import Sequence


class DataError(ValueError):
    """A record or dataset that cannot be used, named with its index and what is wrong."""


def messages(record: dict) -> list[dict]:
    return [{"role": "user", "content": record["problem"]},
            {"role": "assistant", "content": record["reasoning"]}]


def prompt_messages(record: dict) -> list[dict]:
    return [{"role": "user", "content": record["problem"]}]


def _tokenizer_name(tokenizer) -> str:
    return repr(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


def marker_ids(tokenizer) -> tuple[int, int]:
    """Token ids of ``<think>`` and ``</think>``; a clear error if the tokenizer lacks them."""
    ids = []
    for marker in ("<think>", "</think>"):
        tid = tokenizer.convert_tokens_to_ids(marker)
        if tid is None or tid == tokenizer.unk_token_id:
            raise DataError(f"the tokenizer {_tokenizer_name(tokenizer)} has no single token for {marker!r}; "
                            "the section masks need <think> and </think> as (special) tokens: use a "
                            "reasoning model's tokenizer (model.student.name_or_path), or add both with "
                            "tokenizer.add_special_tokens and resize the models' embeddings")
        ids.append(tid)
    return ids[0], ids[1]


def template_ids(tokenizer, records: Sequence[dict]) -> list[list[int]]:
    """Token ids of each record as training sees it: [user P, assistant CoT+A] rendered with the
    student tokenizer's chat template, no length cap (one batched call)."""
    conversations = [messages(r) for r in records]
    return tokenizer.apply_chat_template(conversations, tokenize=True, return_dict=True)["input_ids"]


def check_tokenizer(tokenizer) -> tuple[int, int]:
    """The ids of ``<think>`` and ``</think>``, after checking the tokenizer can render sequences."""
    if tokenizer.chat_template is None:
        raise DataError(f"the tokenizer {_tokenizer_name(tokenizer)} has no chat template; sequences are "
                        "rendered with the student tokenizer's template: use a chat/instruct tokenizer "
                        "(model.student.name_or_path) or set tokenizer.chat_template in its folder")
    return marker_ids(tokenizer)
