"""A run stopped by a preemption signal at step k resumes and ends exactly like an uninterrupted one."""

from __future__ import annotations

import copy
import json
import os
import signal

import pytest
import torch

from kd_sweeps import run, train
from kd_sweeps.checkpoint import Preempted, TrainState
from tests.conftest import compose_config
from tests.test_end_to_end import FAST
from tests.test_train import tiny_setup


@pytest.fixture(scope="module")
def setup():
    return tiny_setup(48, attn="sdpa")


def train_steps(setup, resume=None, signal_at=None, max_steps=6):
    tokenizer, examples, student, teacher = setup
    model = copy.deepcopy(student)
    losses = {}

    def on_step(step, metrics, micro):
        losses[step] = metrics["loss"]
        if step == signal_at:  # what Slurm does before a preemption: a signal to the job
            os.kill(os.getpid(), signal.SIGUSR2)

    settings = train.LoopSettings(max_steps=max_steps, batch_size=8, lr=5e-3, precision="bf16", seed=3)
    train.train_loop(model, teacher, examples, tokenizer.pad_token_id, settings, train.LossSettings(),
                     torch.device("cpu"), on_step, resume=resume)
    return losses, model


def test_signal_saves_and_resume_matches_uninterrupted(setup, tmp_path):
    reference, ref_model = train_steps(setup)
    state = TrainState(tmp_path)
    with pytest.raises(Preempted, match="after step 3"):
        train_steps(setup, resume=train.Resume(state), signal_at=2)
    assert state.exists()
    resumed, model = train_steps(setup, resume=train.Resume(state))
    assert sorted(resumed) == [3, 4, 5]  # it continued after the 3 finished steps
    largest = max(abs(resumed[s] - reference[s]) for s in resumed)
    assert largest == 0.0, f"largest loss difference after resume: {largest}"
    for a, b in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(a, b)


def test_handler_is_restored_after_training(setup):
    before = signal.getsignal(signal.SIGUSR2)
    train_steps(setup, max_steps=1)
    assert signal.getsignal(signal.SIGUSR2) == before


def test_a_preempted_grid_point_resumes_its_run(tmp_path, monkeypatch):
    """Through run.main: the W&B run id and result.json survive, the metrics equal an uninterrupted run."""
    cache = tmp_path / "cache"
    overrides = [*FAST, "train.max_steps=4", f"cache_dir={cache}", "logger=disabled"]

    def point(out, signal_at=None):
        cfg = compose_config([*overrides, f"output_dir={out}"])
        real_step = train._optimizer_step

        def step_then_signal(*args, **kwargs):
            result = real_step(*args, **kwargs)
            if args[9] == signal_at:
                os.kill(os.getpid(), signal.SIGUSR2)
            return result

        monkeypatch.setattr(train, "_optimizer_step", step_then_signal)
        return run.main(cfg)

    reference = point(tmp_path / "a")
    with pytest.raises(Preempted):
        point(tmp_path / "b", signal_at=1)
    interrupted = json.loads((tmp_path / "b" / "result.json").read_text())
    assert interrupted["status"] == "preempted" and "Preempted" in interrupted["error"]
    resumed = point(tmp_path / "b")
    for key in ("final_loss", "train_flops", "tokens_trained", "tokens_supervised", "accuracy"):
        assert resumed[key] == reference[key], key
    assert not (tmp_path / "b" / "train_state" / "train_state.pt").exists()
