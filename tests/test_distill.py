"""distill=on_policy and distill=sequence: a hand-computed on-policy step in float64, lmbda=0 is the
offline run, rollouts within their truncation budget, the teacher's sequences built once for a
sweep and verified on load, and an on-policy run that resumes exactly."""

from __future__ import annotations

import copy
import json
import os
import signal

import pytest
import torch

from kd_sweeps import batch_loss, data, distill, run, train
from kd_sweeps.checkpoint import Preempted, TrainState
from kd_sweeps.cost import ModelShape
from kd_sweeps.generate import Sampling
from kd_sweeps.synthetic import make_split
from kd_sweeps.schema import LossConfig, TrainConfig
from kd_sweeps.tokenizer import build_tokenizer
from tests.conftest import compose_config
from tests.helpers import random_embedded_model
from tests.helpers import FAST

pytestmark = pytest.mark.usefixtures("one_thread")
SEED = 7


@pytest.fixture(scope="module")
def pair():
    """(tokenizer, encoded traces, student, teacher): random float64 Qwen3s whose samples vary."""
    tokenizer = build_tokenizer()
    encoded, _ = data.encode(make_split(8, seed=0), tokenizer, 4096)
    student = random_embedded_model(tokenizer, layers=1, hidden=32, seed=1).double()
    teacher = random_embedded_model(tokenizer, layers=1, hidden=48, seed=2).double().requires_grad_(False)
    return tokenizer, encoded, student, teacher


def _on_policy(tokenizer, encoded, trunc=1.0, lmbda=1.0, sections=("P", "CoT", "A"), temperature=1.0):
    from kd_sweeps.evaluate import stop_token_ids

    generator = distill.Generator(stop_token_ids(tokenizer), tokenizer.pad_token_id, data.marker_ids(tokenizer)[1],
                                  Sampling(temperature=temperature), slots=4)
    shape = ModelShape(1, 32, 2, 2, 16, 128, len(tokenizer), True)
    return distill.OnPolicy(encoded, generator, tuple(sections), trunc, False, lmbda, SEED, shape)


def _examples(encoded, sections=("P", "CoT", "A")):
    return data.training_examples(encoded, sections, 1.0, "lead", False, 0)[0]


def test_an_on_policy_step_matches_a_hand_computed_one_in_float64(pair):
    """One rollout sampled by hand (no KV cache: the whole sequence again at every token, the same
    seeded generator), the teacher's and student's distributions at every sampled position, forward KL
    averaged over them; the implementation's sampled tokens, loss and gradients agree."""
    tokenizer, encoded, student, teacher = pair
    rollout = _on_policy(tokenizer, encoded, sections=("CoT", "A"))
    example = _examples(encoded)[3]
    (made,) = rollout.rollouts(student, [example], step=5, autocast=False)

    prompt, budget = rollout.budget(example.index)
    generator = torch.Generator().manual_seed(distill.rollout_seed(SEED, 5, 0))
    ids = list(prompt)
    with torch.no_grad():
        while len(ids) - len(prompt) < budget:
            logits = student(torch.tensor([ids])).logits[0, -1]  # (V,)
            token = int(torch.multinomial(logits.float().softmax(-1), 1, generator=generator))
            ids.append(token)
            if token in rollout.generator.stop_ids:
                break
    assert made.input_ids.tolist() == ids  # the same sampled tokens
    assert len(ids) - len(prompt) > 3  # a real rollout, not one token

    # Supervised: every sampled token (P excluded) predicted from its predecessor: positions
    # len(prompt)-1 .. len(ids)-2 predict tokens len(prompt) .. len(ids)-1.
    hand_student = copy.deepcopy(student)
    s_logits = hand_student(torch.tensor([ids])).logits[0, :-1]  # (T-1, V)
    with torch.no_grad():
        t_logits = teacher(torch.tensor([ids])).logits[0, :-1]
    rows = torch.arange(len(prompt) - 1, len(ids) - 1)
    t_logp, s_logp = t_logits[rows].log_softmax(-1), s_logits[rows].log_softmax(-1)
    hand = (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean()  # forward KL, temperature 1
    hand.backward()

    loss = LossConfig(name="forward_kl", kd_ratio=1.0)
    batch = data.collate([made], tokenizer.pad_token_id)
    for impl in ("full", "chunked"):
        model = copy.deepcopy(student)
        scaled, _, kd = batch_loss.step_losses(model, teacher, batch, made.n_supervised, loss, False, impl)
        scaled.backward()
        assert made.n_supervised == len(rows)
        assert scaled.item() == pytest.approx(hand.item(), rel=1e-5), impl
        for mine, theirs in zip(model.parameters(), hand_student.parameters()):
            torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-4, atol=1e-7)


def test_a_rollout_under_trunc_is_never_longer_than_its_budget(pair):
    tokenizer, encoded, student, _ = pair
    rollout = _on_policy(tokenizer, encoded, trunc=0.5)
    examples = _examples(encoded)
    made = rollout.rollouts(student, examples, step=0, autocast=False)
    for example, sampled in zip(examples, made):
        prompt, budget = rollout.budget(example.index)
        reference = len(encoded[example.index].input_ids) - len(prompt)
        assert budget == max(1, int(0.5 * reference))
        assert len(prompt) < len(sampled.input_ids) <= len(prompt) + budget
    assert rollout.counters["rollouts"] == len(examples)
    assert 0 < rollout.counters["generated_tokens"] <= sum(rollout.budget(e.index)[1] for e in examples)
    assert rollout.counters["generation_flops"] > 0


def test_spans_of_a_rollout_come_from_its_generated_markers():
    think, end = 1, 2
    assert distill.spans_of_rollout([9, 9, think, 5, end, 7], 2, end).of("CoT") == (2, 5)
    assert distill.spans_of_rollout([9, 9, think, 5, end, 7], 2, end).of("A") == (5, 6)
    cut = distill.spans_of_rollout([9, 9, think, 5, 5], 2, end)  # cut before </think>: all CoT
    assert cut.of("CoT") == (2, 5) and cut.of("A") == (5, 5)
    bare = distill.spans_of_rollout([9, 9, 5, 5], 2, end)  # no <think> generated: still the model's CoT
    assert bare.of("P") == (0, 2) and bare.of("CoT") == (2, 4)


def test_the_lmbda_draws_are_a_function_of_seed_and_step(pair):
    tokenizer, encoded, _, _ = pair
    rollout = _on_policy(tokenizer, encoded, lmbda=0.5)
    draws = [rollout.draws(step) for step in range(400)]
    assert draws == [rollout.draws(step) for step in range(400)]
    assert 0.4 < sum(draws) / len(draws) < 0.6
    assert not any(_on_policy(tokenizer, encoded, lmbda=0.0).draws(step) for step in range(100))


def _point(tmp_path, name, *extra):
    cfg = compose_config([*FAST, "train.max_steps=2", "eval.baselines=[]",
                          f"cache_dir={tmp_path / 'cache'}", *extra])
    cfg.output_dir = str(tmp_path / name)
    return run.main(cfg)


def test_lmbda_zero_is_the_offline_run(tmp_path):
    offline = _point(tmp_path, "offline")
    on_policy = _point(tmp_path, "on_policy", "distill=on_policy", "distill.lmbda=0")
    for key in ("final_loss", "train_flops", "tokens_trained", "accuracy", "eval/synthetic/per_problem"):
        assert on_policy[key] == offline[key], key
    assert on_policy["rollouts"] == 0 and on_policy["generation_flops"] == 0
    assert on_policy["total_flops"] == offline["total_flops"] == offline["train_flops"]
    from safetensors.torch import load_file

    a, b = (load_file(tmp_path / name / "checkpoint" / "model.safetensors") for name in ("offline", "on_policy"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_teachers_sequences_are_built_once_for_two_points_and_verified(tmp_path):
    first = _point(tmp_path, "full", "distill=sequence", "distill.max_new_tokens=24")
    second = _point(tmp_path, "half", "distill=sequence", "distill.max_new_tokens=24", "trunc=0.5")
    assert first["sequences_built_here"] and not second["sequences_built_here"]
    assert first["sequences_path"] == second["sequences_path"]
    assert first["sequence_generation_flops"] == second["sequence_generation_flops"] > 0
    assert second["total_flops"] == second["train_flops"] + second["sequence_generation_flops"]
    folder = tmp_path / "cache" / first["sequences_path"].split("/")[-1]
    completions = json.loads((folder / "sequences.json").read_text())
    assert len(completions) == 64 and all(1 <= len(c) <= 24 for c in completions)  # data.n_train, the budget
    text = (folder / "sequences.json").read_text()
    (folder / "sequences.json").write_text(text.replace("[", "[1, ", 1))  # one token more: a damaged cache
    with pytest.raises(ValueError, match=f"teacher sequences {folder} are corrupted"):
        distill.load_sequences(folder, 64)


def test_distill_combinations_that_cannot_work_are_refused(compose):
    from kd_sweeps.validation import ConfigError, validate

    with pytest.raises(ConfigError) as err:
        validate(compose(["distill=on_policy", "train.teacher_cache=topk", "truncation.mode=middle",
                          "distill.lmbda=1.5"]))
    text = str(err.value)
    assert "distill.lmbda=1.5: must be in [0, 1]" in text
    assert "distill.mode=on_policy with train.teacher_cache=topk" in text
    assert "distill.mode=on_policy with truncation.mode=middle" in text


def test_an_on_policy_run_resumes_as_if_never_stopped(pair, tmp_path):
    """Stopped by a preemption signal after step 2 of 4 (each step drawn on- or off-policy), saved,
    resumed: the same draws, the same samples, the same weights as the uninterrupted run."""
    tokenizer, encoded, student, teacher = pair
    examples = _examples(encoded, ("CoT", "A"))
    settings = TrainConfig(max_steps=4, batch_size=4, lr=5e-3, precision="fp32")

    def steps(resume=None, signal_at=None):
        model, rollout, seen = copy.deepcopy(student), _on_policy(tokenizer, encoded, lmbda=0.5), {}

        def on_step(step, metrics, micro):
            seen[step] = (metrics["loss"], metrics["on_policy"])
            if step == signal_at:
                os.kill(os.getpid(), signal.SIGUSR2)

        train.train_loop(model, teacher, examples, tokenizer.pad_token_id, settings,
                         LossConfig(name="jsd", beta=0.5), torch.device("cpu"), on_step, resume=resume,
                         rollout=rollout, seed=3)
        return seen, model, rollout

    reference, ref_model, ref_rollout = steps()
    assert {on for _, on in reference.values()} == {0.0, 1.0}  # both kinds of step in four
    state = TrainState(tmp_path)
    with pytest.raises(Preempted, match="after step 2"):
        steps(train.Resume(state), signal_at=1)
    resumed, model, rollout = steps(train.Resume(state))
    assert sorted(resumed) == [2, 3]
    assert all(resumed[s] == reference[s] for s in resumed), (resumed, reference)
    assert rollout.counters == ref_rollout.counters | {"generation_time_s": rollout.counters["generation_time_s"]}
    for a, b in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_two_processes_sample_the_same_rollouts_as_one(tmp_path, monkeypatch):
    """``torchrun --nproc_per_node 2``, the student sharded: every rank generates the whole global
    batch alike (the same forward calls, as sharding needs) and trains on its slice; the losses and
    token counts equal one process's, and the counted generation is twice one rank's."""
    import subprocess
    import sys

    from tests.conftest import ROOT
    from tests.helpers import E2E, TOLERANCE, free_port

    args = [*E2E, "distill=on_policy", "distill.lmbda=1.0", "eval.baselines=[]", "logger=disabled"]
    env = {**os.environ, "KD_SWEEPS_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(free_port())]
    proc = subprocess.run([*torchrun, str(ROOT / "launch.py"), *args, f"hydra.run.dir={tmp_path / 'two'}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    two = json.loads((tmp_path / "two" / "result.json").read_text())["summary"]
    monkeypatch.setenv("KD_SWEEPS_CACHE", str(tmp_path / "cache"))  # the models rank 0 prepared
    cfg = compose_config(args)
    cfg.output_dir = str(tmp_path / "one")
    one = run.main(cfg)
    for key in ("tokens_trained", "tokens_supervised", "rollouts", "rollout_steps"):
        assert two[key] == one[key], key
    assert two["generated_tokens"] == 2 * one["generated_tokens"] > 0
    assert two["final_loss"] == pytest.approx(one["final_loss"], abs=TOLERANCE)
