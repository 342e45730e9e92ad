"""Sequence processing on real tokenized examples: spans on the full sequence, then truncation."""

from __future__ import annotations

import itertools

import pytest
import torch

from kd_sweeps import data
from kd_sweeps.sections import SECTION_PRESETS, TRUNCATION_MODES
from kd_sweeps.synthetic import make_split
from kd_sweeps.tokenizer import build_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def encoded(tokenizer):
    out, stats = data.encode(make_split(64, seed=0), tokenizer, max_tokens=4096)
    assert stats.kept == 64
    return out


def test_spans_cover_the_sequence(encoded, tokenizer):
    think_id, end_id = data.marker_ids(tokenizer)
    for enc in encoded:
        assert enc.spans.prompt[1] == enc.spans.cot[0]
        assert enc.spans.cot[1] == enc.spans.answer[0]
        assert enc.input_ids[enc.spans.cot[0]] == think_id
        assert enc.input_ids[enc.spans.cot[1] - 1] == end_id


@pytest.mark.parametrize("preset, mode, cut", list(itertools.product(
    SECTION_PRESETS, TRUNCATION_MODES, [False, True])))
def test_every_preset_composes_with_every_truncation(encoded, preset, mode, cut):
    for trunc in (0.1, 0.25, 0.5, 1.0):
        examples, skipped = data.training_examples(encoded, SECTION_PRESETS[preset], trunc, mode, cut, 0)
        assert len(examples) + skipped == len(encoded)
        for ex in examples:
            supervised = (ex.labels != data.IGNORE_INDEX).sum().item()
            assert supervised == ex.n_supervised > 0
            assert ex.input_ids.shape == ex.labels.shape


def test_lead_truncation_keeps_the_leading_fraction(encoded):
    examples, _ = data.training_examples(encoded, ("P", "CoT", "A"), 0.5, "lead", False, 0)
    for enc, ex in zip(encoded, examples):
        keep = max(1, int(len(enc.input_ids) * 0.5))
        assert ex.input_ids.tolist() == enc.input_ids[:keep]


def test_answer_only_at_short_trunc_skips_and_counts(encoded):
    # At trunc 0.25 the answer is always cut off: every example is skipped, none raises or NaNs.
    examples, skipped = data.training_examples(encoded, ("A",), 0.25, "lead", False, 0)
    assert examples == [] and skipped == len(encoded)


def test_too_long_and_marker_less_records_are_counted(tokenizer):
    records = make_split(4, seed=1) + [{"problem": "hi", "reasoning": "no markers here", "answer": "1"}]
    out, stats = data.encode(records, tokenizer, max_tokens=4096)
    assert stats.kept == 4 and stats.missing_markers == 1
    assert "record 4" in stats.first_errors[0]
    _, stats = data.encode(records[:4], tokenizer, max_tokens=min(len(e.input_ids) for e in out))
    assert stats.too_long == 3


def test_non_string_field_names_the_record(tokenizer):
    with pytest.raises(data.DataError, match=r"record 1: field\(s\) \['reasoning'\]"):
        data.encode(make_split(1, seed=1) + [{"problem": "x", "reasoning": 3}], tokenizer, 4096)


def test_no_usable_record_is_a_clear_error(tokenizer):
    with pytest.raises(data.DataError, match="no usable training sequence"):
        data.encode([{"problem": "x", "reasoning": "y", "answer": "1"}], tokenizer, 4096)


def test_length_grouped_batches_waste_little_padding(encoded):
    lengths = [len(e.input_ids) for e in encoded] * 20
    batches = data.length_grouped_batches(lengths, batch_size=16, seed=0)
    padded = real = 0
    for _ in range(40):
        chosen = [lengths[i] for i in next(batches)]
        padded += max(chosen) * len(chosen)
        real += sum(chosen)
    assert (padded - real) / padded < 0.05


def test_batches_are_deterministic_and_cover_the_data():
    lengths = list(range(10, 74))
    first = list(itertools.islice(data.length_grouped_batches(lengths, 8, seed=3), 8))
    again = list(itertools.islice(data.length_grouped_batches(lengths, 8, seed=3), 8))
    assert first == again
    assert sorted(i for b in first for i in b) == list(range(64))


def test_collate_pads_right_and_ignores_padding(encoded):
    examples, _ = data.training_examples(encoded[:3], ("CoT",), 1.0, "lead", False, 0)
    batch = data.collate(examples, pad_id=0)
    width = max(len(e.input_ids) for e in examples)
    assert batch["input_ids"].shape == (3, width)
    for row, ex in enumerate(examples):
        n = len(ex.input_ids)
        assert batch["attention_mask"][row].sum() == n
        assert torch.all(batch["labels"][row, n:] == data.IGNORE_INDEX)


def test_sequences_are_the_chat_template_ids_and_the_synthetic_path_is_unchanged(tokenizer):
    """encode and the cached real-data path share one rendering (template_ids, batched); the embedded
    task's sequences are those of a per-record apply_chat_template call, as before."""
    from omegaconf import OmegaConf

    from kd_sweeps.schema import DataConfig

    records = make_split(20, seed=4)
    single = [tokenizer.apply_chat_template(data.messages(r), tokenize=True, return_dict=True)["input_ids"]
              for r in records]
    assert data.template_ids(tokenizer, records) == single
    data_cfg = OmegaConf.structured(DataConfig(n_train=20, seed=4))
    encoded, stats, rows = data.load_encoded(data_cfg, "train", tokenizer)
    assert [e.input_ids for e in encoded] == [e.input_ids for e in data.encode(make_split(20, seed=4), tokenizer, 4096)[0]]
    assert [e.input_ids for e in encoded] == single and rows == {"rows": "synthetic", "train": 20, "too_long": 0}
