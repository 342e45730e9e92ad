"""The training loop: gradient accumulation does not change the step, the teacher stays frozen."""

from __future__ import annotations

import copy

import pytest
import torch

from kd_sweeps import batch_loss, data, teachers, train
from kd_sweeps.schema import LossConfig, TrainConfig
from kd_sweeps.synthetic import make_split
from tests.helpers import tiny_setup


@pytest.fixture(scope="module")
def setup():
    return tiny_setup(32)


def run(setup, grad_accum: int, steps: int = 2, kd_ratio: float = 0.5):
    tokenizer, examples, student, teacher = setup
    model = copy.deepcopy(student).double()
    settings = TrainConfig(max_steps=steps, batch_size=8, micro_batch_size=8 // grad_accum, lr=1e-2,
                           precision="fp32")
    losses = []
    train.train_loop(model, teacher.double(), examples, tokenizer.pad_token_id, settings,
                     LossConfig(kd_ratio=kd_ratio), torch.device("cpu"),
                     on_step=lambda step, metrics, micro: losses.append(metrics["loss"]))
    return losses, torch.cat([p.detach().flatten() for p in model.parameters()])


def test_gradient_accumulation_does_not_change_the_step(setup):
    losses_1, params_1 = run(setup, grad_accum=1)
    losses_4, params_4 = run(setup, grad_accum=4)
    assert losses_1 == pytest.approx(losses_4, rel=1e-9)
    # Adam divides by sqrt(v): float64 rounding (~1e-16) in the summed gradient can show up
    # around 1e-9 in parameters whose gradient is near zero; anything larger is a real difference.
    assert (params_1 - params_4).abs().max().item() < 1e-8


def test_teacher_is_not_updated_and_student_is(setup):
    _, _, student, teacher = setup
    before_teacher = [p.clone() for p in teacher.double().parameters()]
    _, params = run(setup, grad_accum=1)
    start = torch.cat([p.detach().flatten() for p in student.double().parameters()])
    assert not torch.allclose(params, start)
    assert all(torch.equal(a, b) for a, b in zip(before_teacher, teacher.parameters()))
    assert all(p.grad is None for p in teacher.parameters())


def test_kd_ratio_zero_is_plain_cross_entropy(setup):
    tokenizer, examples, student, teacher = setup
    batch = data.collate(examples[:4], tokenizer.pad_token_id)
    n = int((batch["labels"][:, 1:] != data.IGNORE_INDEX).sum())
    total, ce, kd = batch_loss.step_losses(student, teacher, batch, n, LossConfig(kd_ratio=0.0), False)
    logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    reference = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                  batch["labels"][:, 1:].reshape(-1), ignore_index=-100)
    assert total.item() == pytest.approx(reference.item(), rel=1e-5)
    assert ce == pytest.approx(reference.item(), rel=1e-5)


def test_warmup_then_cosine():
    values = [train.warmup_cosine(s, 100, 0.1) for s in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert values[10] == pytest.approx(1.0) and values[-1] < 0.01
    assert all(a >= b for a, b in zip(values[10:], values[11:]))


def test_nan_loss_stops_with_step_named(setup):
    tokenizer, examples, student, teacher = setup
    model = copy.deepcopy(student)
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    settings = TrainConfig(max_steps=3, batch_size=8, precision="fp32")
    with pytest.raises(FloatingPointError, match="at step 0"):
        train.train_loop(model, teacher, examples, tokenizer.pad_token_id, settings,
                         LossConfig(), torch.device("cpu"))


def test_cached_teacher_matches_the_online_teacher(setup, tmp_path):
    """With k = V - 1 the top-k cache holds the whole distribution: the same losses up to fp16."""
    from kd_sweeps import teacher_cache_build

    tokenizer, examples, student, teacher = setup
    encoded, _ = data.encode(make_split(32, seed=0), tokenizer, 4096)
    examples, _ = data.training_examples(encoded, ("CoT", "A"), 0.5, "lead", False, 0)
    vocab = teacher.get_output_embeddings().weight.shape[0]
    cache = teacher_cache_build.build_cache(teacher.float(), encoded, tmp_path / "cache", vocab - 1, 1.0, 8,
                                      torch.device("cpu"))
    settings = TrainConfig(max_steps=2, batch_size=8, lr=1e-2, precision="fp32")
    results = []
    for kd_teacher in (teacher, teachers.CachedTeacher(cache)):
        losses = []
        train.train_loop(copy.deepcopy(student).float(), kd_teacher, examples, tokenizer.pad_token_id, settings,
                         LossConfig(kd_ratio=1.0), torch.device("cpu"),
                         on_step=lambda step, metrics, micro: losses.append(metrics["kd_loss"]))
        results.append(losses)
    assert results[0] == pytest.approx(results[1], rel=1e-2, abs=1e-3)
    assert results[0][0] > 0.01  # a real divergence, not two zeros
