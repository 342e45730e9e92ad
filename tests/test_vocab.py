"""Teacher and student must share their tokens; their output layers may differ only in padding rows
(Qwen3: 151,669 tokens in 151,936 rows), and then KD compares the shared first columns, alike in the
full and the chunked loss and in the teacher's top-k cache."""

from __future__ import annotations

import copy

import pytest
import torch

from kd_sweeps import batch_loss, data, models
from kd_sweeps.schema import LossConfig
from tests.conftest import compose_config
from tests.tiny_hub import build_tiny_hub_model


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("vocab")
    torch.manual_seed(0)
    return {"student": build_tiny_hub_model(root / "student", padded_rows=5),
            "teacher": build_tiny_hub_model(root / "teacher", hidden=48, padded_rows=13),
            "other": build_tiny_hub_model(root / "other", bpe_vocab=500)}


def _pair_config(hub, teacher: str):
    return compose_config(["model.teacher.source=pretrained", f"model.teacher.name_or_path={hub[teacher]}",
                           "model.student.source=pretrained", f"model.student.name_or_path={hub['student']}",
                           "train.precision=fp32", "model.attn_implementation=eager"])


def _load(hub, teacher: str):
    cfg = _pair_config(hub, teacher)
    tokenizer = models.load_tokenizer(cfg, None)
    return tokenizer, models.load_pair(cfg, tokenizer, torch.device("cpu"))


def test_heads_padded_differently_are_allowed(hub):
    tokenizer, (teacher, student) = _load(hub, "teacher")
    rows = (teacher.model.get_output_embeddings().weight.shape[0], student.model.get_output_embeddings().weight.shape[0])
    assert rows == (len(tokenizer) + 13, len(tokenizer) + 5)
    assert models.kd_vocab_size(teacher.model, student.model) == len(tokenizer) + 5


def test_another_tokenizer_is_refused_naming_both_models_and_tokens(hub):
    with pytest.raises(ValueError) as info:
        _load(hub, "other")
    message = str(info.value)
    assert str(hub["other"]) in message and str(hub["student"]) in message
    assert "different vocabularies" in message and "teacher id" in message and "student id" in message


def test_a_head_smaller_than_the_vocabulary_is_refused(hub):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hub["student"])
    student = AutoModelForCausalLM.from_pretrained(hub["student"])
    short = copy.deepcopy(student)
    short.resize_token_embeddings(len(tokenizer) - 1)
    with pytest.raises(ValueError, match="fewer rows than the shared vocabulary"):
        models.check_vocabularies(tokenizer, tokenizer, short, student)


@pytest.mark.parametrize("name", ["jsd", "forward_kl"])  # autograd; gradient written by hand
@pytest.mark.parametrize("kd_ratio", [0.5, 1.0])
def test_full_and_chunked_losses_drop_the_padding_columns_alike(hub, kd_ratio, name):
    tokenizer, (teacher, student) = _load(hub, "teacher")
    torch.manual_seed(1)
    ids = torch.randint(0, len(tokenizer), (2, 12))
    labels = ids.clone()
    labels[0, :4] = data.IGNORE_INDEX
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    loss = LossConfig(name=name, kd_ratio=kd_ratio, temperature=2.0)
    n = int((labels[:, 1:] != data.IGNORE_INDEX).sum())
    values = {}
    for impl in ("full", "chunked"):
        model = copy.deepcopy(student.model).double()
        total, ce, kd = batch_loss.step_losses(model, teacher.model.double(), batch, n, loss, False, impl)
        total.backward()
        values[impl] = (total.item(), ce, kd, model.get_output_embeddings().weight.grad.clone())
    # The reference: both models cut to the shared rows (ids stay valid: they are real tokens).
    shared = len(tokenizer) + 5
    cut_student, cut_teacher = copy.deepcopy(student.model).double(), copy.deepcopy(teacher.model).double()
    cut_teacher.resize_token_embeddings(shared)
    total, ce, kd = batch_loss.step_losses(cut_student, cut_teacher, batch, n, loss, False, "full")
    total.backward()
    for impl in ("full", "chunked"):
        got_total, got_ce, got_kd, grad = values[impl]
        assert got_total == pytest.approx(total.item(), rel=1e-9)
        assert (got_ce, got_kd) == (pytest.approx(ce, rel=1e-9), pytest.approx(kd, rel=1e-9))
        assert torch.allclose(grad, cut_student.get_output_embeddings().weight.grad, rtol=1e-7, atol=1e-12)
        assert not grad[shared:].any()  # the student's padding rows get no KD or CE gradient


def test_teacher_cache_takes_its_top_k_over_the_shared_columns(hub, tmp_path):
    from kd_sweeps import teacher_cache_build as tc

    tokenizer, (teacher, student) = _load(hub, "teacher")
    shared = models.kd_vocab_size(teacher.model, student.model)
    # Make the teacher's padding rows win every top-k if they were looked at.
    with torch.no_grad():
        teacher.model.get_output_embeddings().weight[shared:] = 50.0
    encoded = [data.Encoded(list(range(3, 20)), None), data.Encoded(list(range(30, 41)), None)]
    cache = tc.build_cache(teacher.model, encoded, tmp_path / "cache", 4, 1.0, 2, torch.device("cpu"),
                           vocab_size=shared)
    assert int(cache.rows(0, 0, 16)[1].max()) < shared and cache.meta["vocab"] == shared
    unlimited = tc.build_cache(teacher.model, encoded, tmp_path / "all", 4, 1.0, 2, torch.device("cpu"))
    assert int(unlimited.rows(0, 0, 16)[1].max()) >= shared  # the padding rows would have been picked
