"""The plan's evaluation cost: problems x samples x tokens, generation FLOPs and wall time against
a hand computation, the job time limit each point must fit, and the warning when it does not."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from kd_sweeps import plan as planner
from kd_sweeps.cost import ModelShape, forward_flops
from kd_sweeps.plan_eval import EvalAssumptions, benchmark_problems, eval_cost, fit_warning

SMALL = ["data.n_train=500"]  # as in test_plan: each plan stays under a second
TINY = ModelShape(2, 8, 2, 1, 4, 16, 10, tied_embeddings=True)  # 1232 matmul weights


def _cfg(separate_job=False, timeout_min=60, n_samples=4, max_new_tokens=1000):
    return OmegaConf.create({
        "data": {"source": "synthetic", "n_test": 50},
        "eval": {"benchmarks": ["aime24", "math500", "synthetic", "my_local_set"], "n_problems": 100,
                 "n_samples": n_samples, "max_new_tokens": max_new_tokens, "separate_job": separate_job,
                 "job": {"timeout_min": timeout_min}}})


def test_problems_are_capped_by_each_benchmarks_size():
    # AIME 2024 has 30 problems, MATH-500 500 (capped at n_problems=100), the embedded task's test
    # split data.n_test=50, a benchmark of unknown size counts n_problems.
    cfg = _cfg()
    assert benchmark_problems(cfg.eval, cfg.data) == {"aime24": 30, "math500": 100, "synthetic": 50,
                                                      "my_local_set": 100}


def test_eval_cost_by_hand():
    cost = eval_cost(_cfg(), TINY, prompt_tokens=20.4, assumptions=EvalAssumptions(tokens_per_s=400.0),
                     launcher_timeout_min=60)
    completions = (30 + 100 + 50 + 100) * 4  # problems x n_samples
    assert (cost.problems, cost.completions, cost.tokens_per_completion) == (280, completions, 1000)
    assert cost.tokens == completions * 1000
    # One completion, step by step: the 20-token prompt's forward, then 1,000 tokens each costing
    # 2 x 1232 FLOPs of weights and 2 layers x 4 x 2 heads x 4 dims = 64 FLOPs per cached position.
    one = forward_flops(TINY, [20]) + sum(2 * 1232 + 64 * (20 + i) for i in range(1, 1001))
    assert cost.flops == completions * one
    assert cost.seconds == pytest.approx(completions * 1000 / 400.0)  # 2,800 s
    assert (cost.limit_s, cost.limit_source) == (3600.0, "hydra.launcher.timeout_min=60")
    assert fit_warning(cost) is None


def test_tokens_per_completion_from_the_options():
    assert EvalAssumptions().tokens_per_completion(1000) == 1000  # default: the worst case
    assert EvalAssumptions(fraction=0.25).tokens_per_completion(1000) == 250
    assert EvalAssumptions(tokens=300).tokens_per_completion(1000) == 300
    assert EvalAssumptions(tokens=5000).tokens_per_completion(1000) == 1000  # generation stops there
    with pytest.raises(ValueError) as err:
        EvalAssumptions(tokens=0, fraction=1.5, tokens_per_s=0)
    assert all(key in str(err.value) for key in ("--eval-tokens=0", "--eval-fraction=1.5",
                                                 "--eval-tokens-per-s=0"))


def test_the_warning_fires_when_evaluation_outlasts_its_limit():
    fast, slow = EvalAssumptions(tokens_per_s=1000.0), EvalAssumptions(tokens_per_s=100.0)
    # 1,120 completions x 1,000 tokens: 1,120 s at 1,000 tokens/s, 11,200 s at 100.
    in_job = eval_cost(_cfg(), TINY, 20, slow, launcher_timeout_min=60)
    warning = fit_warning(in_job)
    assert warning and "3.1 h" in warning and "has 60 min (hydra.launcher.timeout_min=60)" in warning
    assert "set eval.separate_job=true" in warning
    assert fit_warning(eval_cost(_cfg(), TINY, 20, fast, launcher_timeout_min=60)) is None
    # Its own job: eval.job.timeout_min is the limit, whatever the launcher's.
    own = eval_cost(_cfg(separate_job=True, timeout_min=10), TINY, 20, fast, launcher_timeout_min=10_000)
    assert own.limit_s == 600 and "eval.job.timeout_min=10" in fit_warning(own)
    assert "raise eval.job.timeout_min" in fit_warning(own)
    # No limit (the basic launcher): nothing to warn about.
    assert fit_warning(eval_cost(_cfg(), TINY, 20, slow, launcher_timeout_min=None)) is None


def test_training_shares_the_jobs_limit():
    # 3.3e15 training FLOPs at 1e12 FLOP/s = 3,300 s of a 3,600 s job: 300 s left for 1,120 s.
    rated = EvalAssumptions(tokens_per_s=1000.0, train_flops_per_s=1e12)
    cost = eval_cost(_cfg(), TINY, 20, rated, launcher_timeout_min=60, train_flops=3.3e15)
    assert cost.limit_s == pytest.approx(300.0)
    assert "minus the estimated training time (55 min)" in fit_warning(cost)
    over = eval_cost(_cfg(), TINY, 20, rated, launcher_timeout_min=60, train_flops=4e15)
    assert fit_warning(over).startswith("no time left to evaluate")
    # Its own job does not share with training.
    apart = eval_cost(_cfg(separate_job=True), TINY, 20, rated, launcher_timeout_min=60, train_flops=4e15)
    assert fit_warning(apart) is None
    # The rate is per GPU: 4 processes train the same FLOPs in a quarter of the time (825 s).
    shared = eval_cost(_cfg(), TINY, 20, rated, launcher_timeout_min=60, train_flops=3.3e15, processes=4)
    assert shared.limit_s == pytest.approx(3600.0 - 825.0)


def test_the_launchers_time_limit_per_point():
    composer = planner.GridComposer(["launcher=basic,local,slurm_gpu_4b_8b"])
    limits = [composer.launcher_timeout_min(point) for point in composer.points()]
    assert limits == [None, 240, 1440]
    facts = [composer.launcher(point) for point in composer.points()]
    assert [(f.kind, f.processes, f.requeues, f.gpus_per_node) for f in facts] == [
        ("basic", 1, 0, None), ("local", 1, 0, 0), ("slurm", 4, 3, 4)]
    command_line = planner.GridComposer(["launcher=local", "hydra.launcher.timeout_min=7"])
    assert command_line.launcher_timeout_min(command_line.points()[0]) == 7


def test_plan_warns_for_the_points_that_do_not_fit(capsys):
    # 200 completions x 256 tokens at 100 tokens/s = 512 s: over a 5-minute job, under a 10-minute one.
    argv = ["trunc=0.5", "launcher=local", *SMALL]
    assert planner.main([*argv, "hydra.launcher.timeout_min=5", "--eval-tokens-per-s", "100"]) == 0
    out, err = capsys.readouterr()
    assert "200 x 256" in out and "51.2k" in out and "5 min" in out and "9 min!" in out
    assert "throughput = 100 generated tokens/s" in out and "1 x eval.max_new_tokens" in out
    assert "1 warning(s)" in err and "evaluation needs about 9 min" in err
    assert planner.main([*argv, "hydra.launcher.timeout_min=10", "--eval-tokens-per-s", "100"]) == 0
    out, err = capsys.readouterr()
    assert "warning" not in err and "!" not in out


def test_plan_eval_numbers_and_csv(tmp_path):
    plan = planner.make_plan(["trunc=0.5,1.0", "eval.n_samples=3", *SMALL],
                             eval_assumptions=EvalAssumptions(tokens=100, tokens_per_s=50.0))
    costs = [p.eval for p in plan.points]
    assert [(c.completions, c.tokens) for c in costs] == [(600, 60_000)] * 2  # 200 problems x 3
    assert costs[0].flops == costs[1].flops  # the same student generates: trunc does not matter
    assert plan.eval_total("seconds") == pytest.approx(2 * 60_000 / 50.0)
    planner.write_csv(plan, tmp_path / "plan.csv")
    import csv

    rows = list(csv.DictReader(open(tmp_path / "plan.csv")))
    assert [float(r["eval_flops"]) for r in rows] == [c.flops for c in costs]
    assert rows[0]["eval_tokens"] == "60000" and rows[0]["eval_time_limit_s"] == ""
    assert (rows[0]["processes"], rows[0]["verdict"], rows[0]["done"]) == ("1", "fits", "False")
    assert float(rows[0]["memory_per_rank_bytes"]) == plan.points[0].peak_memory  # one process: the same formula
    assert float(rows[0]["eval_gpu_hours"]) == pytest.approx(60_000 / 50.0 / 3600)


def test_a_bad_option_is_refused_before_planning(capsys):
    with pytest.raises(SystemExit) as exit_info:
        planner.main(["trunc=0.5", "--eval-fraction", "2", "--eval-tokens-per-s", "-1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--eval-fraction=2.0: must be in (0, 1]" in err and "--eval-tokens-per-s=-1.0" in err
