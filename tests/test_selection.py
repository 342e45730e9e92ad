"""Checkpoint selection: best_val keeps the weights of the step with the lowest validation CE (not
the last step's when training diverges late), saved as safetensors with the tokenizer, loadable by
transformers; the validation loss is the plain CE on full sequences; the embedded validation split
is disjoint from training and test problems."""

from __future__ import annotations

import math

import pytest
import torch

from kd_sweeps import data, models, selection, train
from kd_sweeps.losses import ce_loss
from kd_sweeps.schema import LossConfig, TrainConfig
from kd_sweeps.synthetic import make_split
from kd_sweeps.tokenizer import build_tokenizer

TINY = {"layers": 1, "hidden": 32, "heads": 2}
STEPS = 12


def _student(tokenizer):
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(0)
    return Qwen3ForCausalLM._from_config(models.qwen3_config(TINY, tokenizer), attn_implementation="eager")


def test_best_val_saves_the_lowest_validation_step_not_the_last(tmp_path):
    tokenizer = build_tokenizer()
    encoded, _ = data.encode(make_split(64, seed=0), tokenizer, 4096)
    examples, _ = data.training_examples(encoded, ("P", "CoT", "A"), 1.0, "lead", False, 0)
    val_encoded, _ = data.encode(make_split(10**6, seed=1, split="val"), tokenizer, 4096)
    val, _ = data.training_examples(val_encoded, selection.VAL_SECTIONS, 1.0, "lead", False, 0)
    student = _student(tokenizer)
    snapshots = {}

    def compute_loss(model) -> float:
        return selection.validation_loss(model, val, tokenizer.pad_token_id, 8, False, "chunked", torch.device("cpu"))

    def save(model) -> None:
        selection.save_checkpoint(model, tokenizer, tmp_path / "checkpoint")

    selector = selection.BestValidation(2, STEPS, compute_loss, save)

    def on_step(step, metrics, micro):
        selector.after_step(step, student)
        snapshots[step + 1] = {k: v.detach().clone() for k, v in student.state_dict().items()}

    # lr warming up to 1.0: the loss first falls, then the updates overshoot and it climbs again
    # (validation losses ~5.5, 9.9, 9.7, 15, 12.9, 8.3).
    settings = TrainConfig(max_steps=STEPS, batch_size=8, lr=1.0, warmup_ratio=0.5, grad_clip=0.0, precision="fp32")
    train.train_loop(student, None, examples, tokenizer.pad_token_id, settings, LossConfig(kd_ratio=0.0),
                     torch.device("cpu"), on_step=on_step)

    steps, losses = zip(*selector.history)
    assert list(steps) == list(range(2, STEPS + 1, 2))  # every val_every steps, the last included
    best = steps[losses.index(min(losses))]
    assert selector.best_step == best and selector.best_loss == min(losses)
    assert best != STEPS and losses[-1] > min(losses)  # the case this test is about: the end is worse
    folder = tmp_path / "checkpoint"
    assert (folder / "model.safetensors").exists() and (folder / "tokenizer.json").exists()
    assert not list(tmp_path.glob("checkpoint.tmp*"))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(folder)
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, snapshots[best][key]), key
    assert AutoTokenizer.from_pretrained(folder).get_vocab() == tokenizer.get_vocab()
    summary = selector.summary()
    assert summary["best_val_step"] == best and summary["val_loss"] == losses[-1]


def test_validation_loss_is_plain_ce_on_full_sequences():
    tokenizer = build_tokenizer()
    encoded, _ = data.encode(make_split(5, seed=1, split="val"), tokenizer, 4096)
    val, _ = data.training_examples(encoded, selection.VAL_SECTIONS, 1.0, "lead", False, 0)
    assert all(len(e.input_ids) == len(enc.input_ids) for e, enc in zip(val, encoded))  # never truncated
    model = _student(tokenizer).double()
    got = selection.validation_loss(model, val, tokenizer.pad_token_id, 2, False, "full", torch.device("cpu"))
    nll = count = 0.0
    with torch.no_grad():
        for example in val:  # one sequence at a time, no padding: the plain reference
            logits = model(example.input_ids[None]).logits[:, :-1]
            targets = example.labels[None, 1:]
            mask = targets != data.IGNORE_INDEX
            nll += float(ce_loss(logits, targets.clamp_min(0), mask)) * int(mask.sum())
            count += int(mask.sum())
    assert got == pytest.approx(nll / count, rel=1e-9)
    assert model.training  # left as it was found
    chunked = selection.validation_loss(model, val, tokenizer.pad_token_id, 3, False, "chunked", torch.device("cpu"))
    assert chunked == pytest.approx(got, rel=1e-9)


def test_selector_state_survives_a_resume():
    saved = []
    losses = iter([3.0, 1.0, 2.0, 0.5])
    first = selection.BestValidation(1, 4, lambda m: next(losses), saved.append)
    first.after_step(0, "w0")
    first.after_step(1, "w1")
    second = selection.BestValidation(1, 4, lambda m: next(losses), saved.append)
    second.restore(first.state())
    second.after_step(2, "w2")
    assert second.best_step == 2 and saved == ["w0", "w1"]
    second.after_step(3, "w3")
    assert second.best_step == 4 and saved[-1] == "w3"
    assert [s for s, _ in second.history] == [1, 2, 3, 4]


def test_nan_is_never_the_best():
    losses = iter([2.0, math.nan])
    selector = selection.BestValidation(1, 2, lambda m: next(losses), lambda m: None)
    selector.after_step(0, None)
    selector.after_step(1, None)
    assert selector.best_step == 1


def test_embedded_validation_split_is_disjoint_from_training_and_test():
    val = make_split(10**6, seed=44, split="val")
    test = make_split(10**6, seed=43, split="test")
    train_records = make_split(5000, seed=42)
    problems = {r["problem"] for r in val}
    assert 30 < len(val) == len(problems) < 70  # a fixed ~10% of the 440 combinations, distinct
    assert not problems & {r["problem"] for r in test}
    assert not problems & {r["problem"] for r in train_records}
    # Preparing the embedded teacher and base still draws from every non-test combination.
    assert problems & {r["problem"] for r in make_split(5000, seed=42, split="prep")}
