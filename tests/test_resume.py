"""A run stopped by a preemption signal at step k resumes and ends exactly like an uninterrupted one."""

from __future__ import annotations

import copy
import json
import os
import signal

import pytest
import torch

from kd_sweeps import evaluate, run, train
from kd_sweeps.checkpoint import Preempted, TrainState
from kd_sweeps.schema import LossConfig, TrainConfig
from tests.conftest import compose_config
from tests.helpers import FAST, tiny_setup

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest



@pytest.fixture(scope="module")
def setup():
    return tiny_setup(48, attn="sdpa")


def train_steps(setup, resume=None, signal_at=None, max_steps=6, examples=None, loss=None, **recipe):
    tokenizer, default_examples, student, teacher = setup
    examples = default_examples if examples is None else examples
    model = copy.deepcopy(student)
    losses = {}

    def on_step(step, metrics, micro):
        losses[step] = metrics["loss"]
        if step == signal_at:  # what Slurm does before a preemption: a signal to the job
            os.kill(os.getpid(), signal.SIGUSR2)

    settings = TrainConfig(max_steps=max_steps, batch_size=8, lr=5e-3, precision="bf16", **recipe)
    train.train_loop(model, teacher, examples, tokenizer.pad_token_id, settings, loss or LossConfig(),
                     torch.device("cpu"), on_step, resume=resume, seed=3)
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


def test_paper_recipe_resumes_bit_exact_across_epochs(setup, tmp_path):
    """OneCycleLR (its beta1 cycle too), decay on every parameter, micro-batches, per-sequence loss and
    random_labels redrawn at the epoch boundary: the resumed run is the uninterrupted one, bit for bit."""
    from kd_sweeps import data
    from kd_sweeps.synthetic import make_split

    encoded, _ = data.encode(make_split(16, seed=0), setup[0], 4096)
    examples, _ = data.training_examples(encoded, ("P", "CoT", "A"), 0.5, "random_labels", False, 3)
    assert len(examples) == 16  # 2 steps of 8 per epoch: 4 steps are 2 epochs, two draws of the labels
    recipe = dict(examples=examples, loss=LossConfig(normalize="sequence"), micro_batch_size=2,
                  schedule="onecycle", betas=(0.9, 0.999), decay_norms_and_biases=True)
    reference, ref_model = train_steps(setup, max_steps=4, **recipe)
    state = TrainState(tmp_path)
    with pytest.raises(Preempted, match="after step 3"):  # in the second epoch
        train_steps(setup, resume=train.Resume(state), signal_at=2, max_steps=4, **recipe)
    resumed, model = train_steps(setup, resume=train.Resume(state), max_steps=4, **recipe)
    assert sorted(resumed) == [3]
    assert all(resumed[s] == reference[s] for s in resumed), (resumed, reference)
    for a, b in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(a, b)


def test_handler_is_restored_after_training(setup):
    before = signal.getsignal(signal.SIGUSR2)
    train_steps(setup, max_steps=1)
    assert signal.getsignal(signal.SIGUSR2) == before


def test_a_preempted_grid_point_resumes_its_run(tmp_path, monkeypatch):
    """Through run.main: the W&B run id and result.json survive, the metrics equal an uninterrupted run."""
    cache = tmp_path / "cache"
    overrides = [*FAST, "train.max_steps=4", f"cache_dir={cache}"]

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
    from kd_sweeps import precision

    # The summary says what ran: the precision train.precision=auto resolved to here, and the steps.
    assert reference["precision"] == precision.resolve("auto", "cpu") and reference["train_steps"] == 4
    with pytest.raises(Preempted):
        point(tmp_path / "b", signal_at=1)
    interrupted = json.loads((tmp_path / "b" / "result.json").read_text())
    assert interrupted["status"] == "preempted" and "Preempted" in interrupted["error"]
    resumed = point(tmp_path / "b")
    for key in ("final_loss", "train_flops", "tokens_trained", "tokens_supervised", "accuracy"):
        assert resumed[key] == reference[key], key
    assert not (tmp_path / "b" / "train_state" / "train_state.pt").exists()


def test_an_evaluation_interrupted_in_the_training_job_resumes_without_training_again(tmp_path, monkeypatch):
    """The trained state is saved after the last step while the evaluation runs in this job: a point
    stopped during its evaluation is relaunched with no optimizer step left, and its summary equals an
    uninterrupted run's (the per-problem completions come back from eval/<benchmark>.jsonl)."""
    overrides = [*FAST, "train.max_steps=4", f"cache_dir={tmp_path / 'cache'}"]
    reference = run.main(compose_config([*overrides, f"output_dir={tmp_path / 'a'}"]))
    real_evaluate = evaluate.evaluate_model

    def stopped(*args, **kwargs):
        raise Preempted("time limit during the evaluation")  # as Slurm would stop it

    monkeypatch.setattr(evaluate, "evaluate_model", stopped)
    with pytest.raises(Preempted):
        run.main(compose_config([*overrides, f"output_dir={tmp_path / 'b'}"]))
    assert (tmp_path / "b" / "train_state" / "train_state.pt").exists()  # the trained state survived
    monkeypatch.setattr(evaluate, "evaluate_model", real_evaluate)
    steps = []
    real_step = train._optimizer_step
    monkeypatch.setattr(train, "_optimizer_step", lambda *a, **k: steps.append(a[9]) or real_step(*a, **k))
    resumed = run.main(compose_config([*overrides, f"output_dir={tmp_path / 'b'}"]))
    assert steps == []  # no training step ran again
    for key in ("final_loss", "train_flops", "tokens_trained", "accuracy", "eval/synthetic/per_problem"):
        assert resumed[key] == reference[key], key
    assert not (tmp_path / "b" / "train_state" / "train_state.pt").exists()  # removed once evaluated
