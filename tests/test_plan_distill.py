"""The plan's generation cost per distill.mode: the on-policy rollouts' budgets are the run's own
(kd_sweeps.distill.OnPolicy.budget), the teacher's sequences cost N completions to their budget,
counted once per sweep in the total, and both enter the training time and GPU-hours."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from omegaconf import OmegaConf

from kd_sweeps import plan as planner
from kd_sweeps.cost import ModelShape, generation_flops
from kd_sweeps.plan_distill import generation_cost
from kd_sweeps.plan_lengths import assumed_sequences
from tests.conftest import compose_config

SMALL = ["data.n_train=200", "train.max_steps=10"]  # encoding 200 sequences keeps each plan under a second
GRID = ["distill=offline,on_policy,sequence", "trunc=0.5,1.0", *SMALL]


@pytest.fixture(scope="module")
def modes():
    return {(p.overrides[0].split("=")[1], p.overrides[1]): p for p in planner.make_plan(GRID).points}


@pytest.fixture(scope="module")
def shapes_and_encoded():
    from kd_sweeps import data
    from kd_sweeps.models import qwen3_config, spec_dict
    from kd_sweeps.tokenizer import build_tokenizer

    cfg = compose_config(SMALL)
    tokenizer = build_tokenizer()
    encoded, _, _ = data.load_encoded(cfg.data, "train", tokenizer)
    shapes = {role: ModelShape.from_config(qwen3_config(spec_dict(cfg.model[role]), tokenizer))
              for role in ("student", "teacher")}
    return shapes, encoded


def test_offline_generates_nothing(modes):
    for trunc in ("trunc=0.5", "trunc=1.0"):
        point = modes[("offline", trunc)]
        assert not point.problems and point.generation_flops == 0


def test_on_policy_rollouts_have_the_runs_budgets(modes, shapes_and_encoded):
    from kd_sweeps.distill import OnPolicy

    shapes, encoded = shapes_and_encoded
    for trunc in (0.5, 1.0):
        point = modes[("on_policy", f"trunc={trunc}")]
        rollout = OnPolicy(encoded, None, ("P", "CoT", "A"), trunc, False, 0.5, 42, shapes["student"])
        per_rollout = np.mean([generation_flops(shapes["student"], len(prompt), budget)
                               for prompt, budget in map(rollout.budget, range(len(encoded)))])
        # conf/distill/on_policy.yaml: lmbda 0.5; 10 steps of 16 sequences: 80 rollouts expected.
        assert point.generation.completions == 80
        assert point.generation_flops == pytest.approx(80 * per_rollout, rel=1e-12)
    half, full = (modes[("on_policy", f"trunc={t}")].generation_flops for t in (0.5, 1.0))
    assert 0.4 < half / full < 0.55  # half the budget, a little less than half the attention


def test_sequences_cost_every_completion_to_its_budget_once(modes, shapes_and_encoded):
    shapes, encoded = shapes_and_encoded
    longest = max(len(e.input_ids) - e.spans.cot[0] for e in encoded)  # distill.teacher_sequences' limit
    expected = sum(generation_flops(shapes["teacher"], e.spans.cot[0], max(1, min(4096 - e.spans.cot[0], longest)))
                   for e in encoded)
    half, full = modes[("sequence", "trunc=0.5")], modes[("sequence", "trunc=1.0")]
    assert half.generation_flops == full.generation_flops == pytest.approx(expected, rel=1e-12)
    assert half.generation.completions == len(encoded) and half.generation.key == full.generation.key
    plan = planner.Plan(list(modes.values()))
    rollouts = sum(modes[("on_policy", t)].generation_flops for t in ("trunc=0.5", "trunc=1.0"))
    assert plan.generation_total() == pytest.approx(rollouts + expected)  # one build for the sweep


def test_generation_is_in_the_training_time_and_gpu_hours(modes):
    from kd_sweeps.plan_verdict import DEFAULT_TRAIN_FLOPS_PER_S

    for (mode, trunc), point in modes.items():
        seconds = (point.flops + point.generation_flops) / DEFAULT_TRAIN_FLOPS_PER_S  # one process
        assert point.fit.train_seconds == pytest.approx(seconds), (mode, trunc)
        assert point.fit.train_gpu_hours == pytest.approx(seconds / 3600)


def test_the_table_and_csv_show_generation(modes, tmp_path):
    plan = planner.Plan(sorted(modes.values(), key=lambda p: p.index))
    lines = planner.format_plan(plan).splitlines()[1:]  # after the overrides every point shares
    assert "gen FLOPs" in lines[0]
    column = lines[0].index("gen FLOPs") + len("gen FLOPs")  # right-aligned under its header
    cells = {line.split()[0]: line[:column].split()[-1] for line in lines[2:8]}
    assert cells == {str(p.index): "0" if not p.generation_flops else f"{p.generation_flops:.3g}"
                     for p in plan.points}
    assert f"{plan.generation_total():.3g}" in next(line for line in lines if "total (6 points)" in line)
    assert any(line.startswith("gen FLOPs: on_policy:") for line in lines)
    planner.write_csv(plan, tmp_path / "plan.csv")
    rows = list(csv.DictReader(open(tmp_path / "plan.csv")))
    assert [float(r["generation_flops"]) for r in rows] == [p.generation_flops for p in plan.points]
    offline = planner.make_plan(["trunc=0.5", *SMALL])
    assert "gen FLOPs" not in planner.format_plan(offline)


def test_generation_by_hand_with_processes():
    """Uniform assumed sequences of P=10, CoT=20, A=10 tokens: L = 30 after the prompt."""
    shape = ModelShape(n_layers=2, hidden=64, n_heads=4, n_kv_heads=4, head_dim=16, intermediate=128, vocab=100)
    seqs = assumed_sequences(5, (10, 20, 10), 64, "test")
    kept = np.ones(5, dtype=bool)
    cfg = OmegaConf.create({"trunc": 0.5, "seed": 1, "distill": {"mode": "on_policy", "lmbda": 0.25},
                            "train": {"batch_size": 8}})
    cost = generation_cost(cfg, shape, shape, seqs, kept, steps=4, processes=2)
    # 0.25 x 4 steps x 8 = 8 rollouts of int(0.5 x 30) = 15 tokens, on each of the 2 processes.
    assert (cost.completions, cost.tokens) == (8, 8 * 15)
    assert cost.flops == 2 * 8 * generation_flops(shape, 10, 15) and cost.serial_flops == 0
    cfg = OmegaConf.create({"trunc": 0.5, "seed": 1, "model": {"teacher": {"a": 1}, "student": {"b": 2}},
                            "data": {"max_tokens": 30, "num_proc": 4},
                            "distill": {"mode": "sequence", "temperature": 0.0, "top_p": 1.0, "top_k": 0,
                                        "max_new_tokens": None}})
    cost = generation_cost(cfg, shape, shape, seqs, kept, steps=4, processes=2)
    # Budget min(30 - 10, 30) = 20 new tokens per prompt (data.max_tokens binds), each prompt once.
    assert (cost.completions, cost.tokens) == (5, 100)
    assert cost.flops == cost.serial_flops == 5 * generation_flops(shape, 10, 20)
    cfg.distill.max_new_tokens = 7
    assert generation_cost(cfg, shape, shape, seqs, kept, 4, 1).tokens == 35
