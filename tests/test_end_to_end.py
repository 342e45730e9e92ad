"""The real sweep, shrunk: `launch.py -m` trains, evaluates, records, and summarizes on a CPU.

Models are embedded Qwen3 checkpoints prepared with a handful of steps (their accuracy is not the
point here); everything else — Hydra, the data pipeline, KD, evaluation, W&B offline runs,
result.json, the end-of-sweep table and plot — is the code a user runs.
"""

from __future__ import annotations

import json
import math

import pytest

from analysis.wandb_offline import read_runs
from kd_sweeps.wandb_naming import point_of_wandb_id
from tests.helpers import FAST, FAST_WANDB, launch, point_results


@pytest.mark.slow  # a sweep launched as a user does: trains and evaluates in subprocesses
def test_sweep_trains_evaluates_records_and_summarizes(tmp_path, cache_dir):
    sweep_dir = tmp_path / "sweep"
    proc = launch(["-m", "trunc=0.5,1.0", "sweep=e2e", f"hydra.sweep.dir={sweep_dir}", *FAST_WANDB],
                  tmp_path, cache_dir)
    results = point_results(sweep_dir)
    assert [r["status"] for r in results] == ["ok", "ok"]
    assert [r["config"]["trunc"] for r in results] == [0.5, 1.0]
    half, full = (r["summary"] for r in results)
    for key in ("accuracy", "accuracy_stderr", "train_flops", "train_time_s", "peak_memory_bytes",
                "tokens_trained", "tokens_supervised", "eval/synthetic/generated_tokens"):
        assert key in full
    # Same sequences, half of each kept: about half the tokens and less than 0.6x the FLOPs.
    assert 0.4 < half["tokens_trained"] / full["tokens_trained"] < 0.6
    assert half["train_flops"] < 0.6 * full["train_flops"]
    runs = {point_of_wandb_id(run.run_id): run for run in read_runs(sweep_dir)}  # W&B id: <point>-<sweep>
    assert set(runs) == {r["run_id"] for r in results}
    for r in results:
        run = runs[r["run_id"]]
        assert run.group == "e2e" and run.state == "finished"
        assert run.config["trunc"] == r["config"]["trunc"]
        assert run.summary["train_flops"] == pytest.approx(r["summary"]["train_flops"])
    assert (sweep_dir / results[0]["run_id"] / "checkpoint" / "model.safetensors").exists()
    # The end-of-sweep table and plot.
    assert "| trunc |" in proc.stdout and "tradeoff plot:" in proc.stdout
    assert (sweep_dir / "tradeoff.png").stat().st_size > 0
    assert (sweep_dir / "summary.csv").exists()
    # The embedded models were prepared once and cached for the next sweep.
    assert len(list(cache_dir.glob("teacher-*/prep.json"))) == 1
    assert len(list(cache_dir.glob("base-*/prep.json"))) == 1
    assert "2 grid point(s): 2 ran, 0 skipped" in proc.stdout
    # The same sweep again: every point is done, so nothing is trained; force=true reruns them.
    again = launch(["-m", "trunc=0.5,1.0", "sweep=e2e", f"hydra.sweep.dir={sweep_dir}", *FAST_WANDB],
                   tmp_path, cache_dir)
    assert "2 grid point(s): 0 ran, 2 skipped" in again.stdout and "| trunc |" in again.stdout
    assert point_results(sweep_dir) == [{**r, "last_action": "skipped", "launched_at": n["launched_at"]}
                                        for r, n in zip(results, point_results(sweep_dir))]


@pytest.mark.slow  # a sweep launched as a user does: trains and evaluates in subprocesses
def test_a_failing_point_is_recorded_and_its_sibling_still_runs(tmp_path, cache_dir):
    sweep_dir = tmp_path / "sweep"
    # With only the answer supervised and a quarter of each sequence kept, no example has a
    # supervised token: that point fails with a clear error; trunc=1.0 runs normally.
    proc = launch(["-m", "trunc=0.25,1.0", "sections=ans", "sweep=e2e-fail", f"hydra.sweep.dir={sweep_dir}",
                   *FAST], tmp_path, cache_dir, check=False)
    assert proc.returncode != 0
    failed, ok = point_results(sweep_dir)
    assert failed["config"]["trunc"] == 0.25 and failed["status"] == "failed"
    assert "have a supervised token" in failed["error"]
    assert ok["status"] == "ok"
    assert "2 grid point(s): 1 ran, 0 skipped (already done), 1 failed" in proc.stdout
    assert "1 grid point(s) failed" in proc.stderr


def test_bad_config_fails_before_any_work(tmp_path, cache_dir):
    proc = launch(["trunc=1.5", "loss.kd_ratio=2", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path,
                  tmp_path / "untouched-cache", check=False)
    assert proc.returncode != 0
    assert "trunc=1.5: must be in (0, 1]" in proc.stderr and "loss.kd_ratio=2.0: must be in [0, 1]" in proc.stderr
    # A value outside a closed choice is refused when Hydra composes the config, one point or a sweep.
    proc = launch(["-m", "trunc=0.5,1.0", "loss.name=forwrd_kl", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
                  tmp_path, tmp_path / "untouched-cache", check=False)
    assert proc.returncode != 0 and "Invalid value 'forwrd_kl', expected one of [forward_kl," in proc.stderr
    assert "did you mean `loss.name=forward_kl`" in proc.stderr
    assert not (tmp_path / "untouched-cache").exists() and not (tmp_path / "sweep").exists()


@pytest.mark.slow  # two launch.py subprocesses (about 4 s)
def test_cfg_job_and_help(tmp_path, cache_dir):
    cfg = launch(["--cfg", "job", "trunc=0.5", "sections=cot"], tmp_path, cache_dir)
    assert "trunc: 0.5" in cfg.stdout and "- CoT" in cfg.stdout
    helped = launch(["--help"], tmp_path, cache_dir)
    for group in ("sections: all, ans, cot, cot_ans, custom, prompt_ans, prompt_cot", "loss:", "model:",
                  "launcher:"):
        assert group in helped.stdout


@pytest.mark.slow  # a sweep launched as a user does: trains and evaluates in subprocesses
def test_best_val_point_records_validation_and_saves_the_best_checkpoint(tmp_path, cache_dir):
    """train.checkpoint_selection=best_val: validation losses in result.json and W&B, the best
    step's weights as the checkpoint (safetensors + tokenizer, loadable by transformers)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir = tmp_path / "point"
    launch(["train.checkpoint_selection=best_val", "train.val_every=1", "data.n_val=6", f"hydra.run.dir={run_dir}",
            *FAST_WANDB], tmp_path, cache_dir)
    result = json.loads((run_dir / "result.json").read_text())
    summary = result["summary"]
    assert result["status"] == "ok"
    steps, losses = zip(*summary["val_history"])
    assert list(steps) == [1, 2, 3] and all(math.isfinite(v) for v in losses)
    assert summary["best_val_loss"] == min(losses) and summary["best_val_step"] == steps[losses.index(min(losses))]
    assert summary["checkpoint_step"] == summary["best_val_step"] and summary["val_loss"] == losses[-1]
    assert (run_dir / "checkpoint" / "model.safetensors").exists()
    model = AutoModelForCausalLM.from_pretrained(run_dir / "checkpoint")
    assert type(model).__name__ == "Qwen3ForCausalLM"
    assert len(AutoTokenizer.from_pretrained(run_dir / "checkpoint")) == model.config.vocab_size
    (run,) = read_runs(run_dir, read_history=True)
    assert [row["train/val_loss"] for row in run.history if "train/val_loss" in row] == pytest.approx(list(losses))
    assert run.summary["best_val_step"] == summary["best_val_step"]
