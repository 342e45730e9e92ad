"""A real Slurm: a point preempted mid-training is requeued and resumes exactly; an evaluation job
waits for its training job (--dependency=afterok). Start the cluster with `.ci/slurm/up.sh`."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from analysis.wandb_offline import find_runs, is_summary, read_run, read_runs
from kd_sweeps.wandb_naming import point_of_wandb_id
from tests.conftest import ROOT
from tests.helpers import FAST, FAST_WANDB, point_results, slurm_skip_reason

pytestmark = pytest.mark.slurm
SLURM = ["launcher=slurm_cpu_tiny", "hydra.launcher.partition=debug"]
# Long enough to be interrupted in the middle (a step takes ~0.05 s here), logged at every step.
LONG = [arg for arg in FAST_WANDB if not arg.startswith("train.max_steps=")] + [
    "train.max_steps=120", "train.log_every=1", "train.checkpoint_every=5"]


@pytest.fixture(autouse=True)
def _require_slurm():
    reason = slurm_skip_reason()
    if reason:
        pytest.skip(reason)


def _env(tmp_path: Path) -> dict:
    return {**os.environ, "KD_SWEEPS_CACHE": str(tmp_path / "cache"), "WANDB_MODE": "offline",
            "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def _command(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "launch.py"), "-m", *args]


def _wait_for(predicate, timeout: float, what: str, poll: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _job_field(job: str, field: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    match = re.search(rf"\b{field}=(\S+)", out)
    return match[1] if match else ""


def _losses(run) -> dict[int, float]:
    return {row["_step"]: row["train/loss"] for row in run.history if "train/loss" in row}


@pytest.mark.timeout(600)
def test_a_point_preempted_on_slurm_is_requeued_and_resumes_exactly(tmp_path):
    env = _env(tmp_path)
    # The uninterrupted reference: the same point in this process (and its models cached).
    reference = tmp_path / "reference"
    done = subprocess.run(_command("trunc=1.0", f"hydra.sweep.dir={reference}", *LONG), cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (expected_run,) = read_runs(reference, read_history=True)
    expected = _losses(expected_run)
    assert sorted(expected) == list(range(120))

    sweep = tmp_path / "slurm"
    started = time.monotonic()
    proc = subprocess.Popen(_command("trunc=1.0", f"hydra.sweep.dir={sweep}", *LONG, *SLURM), cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # Training is under way once its first periodic state is saved; then Slurm's warning signal.
        _wait_for(lambda: next(sweep.glob("*/train_state/train_state.pt"), None), 180, "the first saved state")
        # submitit submits a one-point sweep as a plain job (no array): its folder is its id.
        job = _wait_for(lambda: next((p.name for p in (sweep / ".submitit").iterdir() if p.is_dir()), None),
                        30, "the job folder")
        subprocess.run(["scancel", "--signal=USR2", job], check=True)
        # submitit requeues the job; Slurm holds a requeued job for a while: release it now.
        _wait_for(lambda: _job_field(job, "Restarts") == "1" and _job_field(job, "JobState") == "PENDING",
                  60, "the requeue")
        subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
        output, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, output[-4000:]
    assert "1 grid point(s): 1 ran, 0 skipped (already done), 0 failed" in output
    (result,) = point_results(sweep)
    assert result["status"] == "ok" and result["run_id"] == point_of_wandb_id(expected_run.run_id)

    # Two attempts of one W&B run: the first stopped at step k, the second went on from its saved state.
    runs = [r for r in (read_run(f, read_history=True) for f in find_runs(sweep)) if not is_summary(r)]
    first, second = sorted(runs, key=lambda r: r.start_time)
    assert first.run_id == second.run_id == result["wandb"]["id"]  # <point id>-<sweep>
    interrupted_at, resumed_from = max(_losses(first)), min(_losses(second))
    assert 5 <= interrupted_at < 119 and resumed_from == interrupted_at + 1
    (merged,) = read_runs(sweep, read_history=True)
    resumed = _losses(merged)
    assert sorted(resumed) == list(range(120)) and merged.segments == 2
    largest = max(abs(resumed[step] - expected[step]) for step in range(resumed_from, 120))
    print(f"requeued at step {interrupted_at}; largest later-step loss difference {largest:.3g}; "
          f"Slurm sweep {elapsed:.0f} s")
    assert largest <= 1e-6
    for key in ("final_loss", "train_flops", "tokens_trained", "tokens_supervised", "accuracy"):
        assert result["summary"][key] == pytest.approx(expected_run.summary[key], rel=1e-6), key


def _accounting(job: str) -> dict:
    out = subprocess.run(["sacct", "-n", "-P", "-X", "-j", job, "-o", "State,Start,End"], capture_output=True,
                         text=True).stdout.strip().splitlines()
    state, start, end = out[0].split("|") if out else ("", "", "")
    return {"state": state, "start": start, "end": end}


@pytest.mark.timeout(600)
def test_evaluation_runs_as_a_dependent_slurm_job_after_training(tmp_path):
    """Two points on the CPU preset (launcher=slurm_cpu_tiny), a job array whose sbatch file a real
    Slurm accepts; each point's evaluation is a job of its own that starts once its training ended."""
    sweep = tmp_path / "sweep"
    done = subprocess.run(_command("trunc=0.5,1.0", f"hydra.sweep.dir={sweep}", "eval.separate_job=true",
                                   "eval.job.cpus_per_task=1", "eval.job.mem_gb=2", *FAST, *SLURM),
                          cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=540)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "waiting for 2 evaluation job(s)" in done.stdout and "2 ran, 0 skipped" in done.stdout
    results = point_results(sweep)
    assert [r["status"] for r in results] == ["ok", "ok"], [r["error"] for r in results]
    submission = next((sweep / ".submitit").glob("*/*_submission.sh")).read_text()  # the training array's
    assert "#SBATCH --time=30" in submission and "#SBATCH --cpus-per-task=2" in submission
    assert "#SBATCH --array=0-1" in submission
    for result in results:
        info = result["summary"]["eval_job"]
        assert info["cluster"] == "slurm" and "accuracy" in result["summary"]
        script = next(Path(info["folder"]).glob("*_submission.sh")).read_text()
        training = re.search(r"#SBATCH --dependency=afterok:(\d+)", script)[1]
        assert "#SBATCH --kill-on-invalid-dep=yes" in script and "#SBATCH --mem=2GB" in script
        evaluation = _wait_for(lambda: (a := _accounting(info["job_id"]))["end"] not in ("", "Unknown") and a,
                               60, "accounting of the evaluation job")
        trained = _wait_for(lambda: (a := _accounting(training))["end"] not in ("", "Unknown") and a,
                            60, "accounting of the training job")
        assert evaluation["state"] == trained["state"] == "COMPLETED"
        assert evaluation["start"] >= trained["end"]  # ISO times: it started once training had ended
