"""Evaluation as its own job (eval.separate_job=true): the same point, the same numbers, one run.

Locally the evaluation job is a separate process (submitit's local executor); the Slurm version
with its ``afterok`` dependency is in tests/test_slurm_jobs.py.
"""

from __future__ import annotations

import json
import os

import pytest

from analysis.load import load
from analysis.wandb_offline import read_runs
from kd_sweeps import eval_job
from kd_sweeps.record_files import write_json_atomic
from kd_sweeps.validation import ConfigError, validate
from tests.helpers import FAST_WANDB, launch, point_results

EVAL_KEYS = ("accuracy", "accuracy_stderr", "eval/synthetic/accuracy", "eval/synthetic/n",
             "eval/synthetic/generated_tokens", "eval/synthetic/per_problem", "eval/synthetic/finished_rate",
             "eval/synthetic/gen_tokens_mean", "eval/synthetic/gen_tokens_max", "finished_rate", "gen_tokens_mean")


@pytest.mark.slow  # two sweeps launched as a user does (subprocesses that train and evaluate)
def test_separate_evaluation_job_gives_the_same_point_and_numbers(tmp_path, cache_dir):
    together, apart = tmp_path / "together", tmp_path / "apart"
    refs = "eval.baselines=[student,teacher]"  # measured in the training job, then read by the evaluation job
    launch(["-m", "trunc=1.0", f"hydra.sweep.dir={together}", *FAST_WANDB, refs], tmp_path, cache_dir)
    out = launch(["-m", "trunc=1.0", f"hydra.sweep.dir={apart}", "eval.separate_job=true", *FAST_WANDB, refs],
                 tmp_path, cache_dir)
    assert "1 grid point(s): 1 ran, 0 skipped (already done), 0 failed" in out.stdout
    (one,), (other,) = point_results(together), point_results(apart)
    assert one["run_id"] == other["run_id"]  # where it is evaluated is not part of the point
    assert other["status"] == "ok" and other["error"] is None
    job = other["summary"]["eval_job"]
    assert job["cluster"] == "local" and (apart / other["run_id"] / "eval_job").is_dir()
    for key in (*EVAL_KEYS, "base_accuracy", "teacher_accuracy"):  # the references too, read from the cache
        assert other["summary"][key] == one["summary"][key], key
    summary = other["summary"]
    assert summary["base/synthetic/accuracy"] == summary["base_accuracy"]
    assert 0 <= summary["finished_rate"] <= 1 and summary["finished_rate"] == summary["eval/synthetic/finished_rate"]
    assert summary["eval/synthetic/gen_tokens_max"] <= 48  # FAST_WANDB: eval.max_new_tokens=48
    assert summary["eval/synthetic/generated_tokens"] == summary["eval/synthetic/gen_tokens_mean"] * 8
    results = [json.loads(line) for line in (apart / other["run_id"] / "eval" / "synthetic.jsonl").read_text().splitlines()]
    assert sorted(r["problem"] for r in results) == list(range(8))  # one line per completion, as they ended
    # The evaluation job continued the training's W&B run: one run, two segments, finished.
    (run,) = read_runs(apart / other["run_id"] / "wandb")
    assert run.segments == 2 and run.state == "finished"
    assert run.summary["accuracy"] == other["summary"]["accuracy"] and "train_flops" in run.summary
    frame = load(apart)
    assert list(frame["status"]) == ["ok"] and frame["accuracy"].notna().all()

    # The evaluation job fails (out of time, say): running the sweep again evaluates the saved
    # checkpoint again, without training it again.
    record_file = apart / other["run_id"] / "result.json"
    checkpoint = apart / other["run_id"] / "checkpoint" / "model.safetensors"
    trained_at = checkpoint.stat().st_mtime_ns
    failed = {**other, "status": "failed", "error": "evaluation job 1 ended (TIMEOUT) without recording a result",
              "summary": {k: v for k, v in other["summary"].items() if k not in EVAL_KEYS}}
    write_json_atomic(record_file, failed)
    again = launch(["-m", "trunc=1.0", f"hydra.sweep.dir={apart}", "eval.separate_job=true", *FAST_WANDB],
                   tmp_path, cache_dir)
    assert "1 grid point(s): 1 ran, 0 skipped (already done), 0 failed" in again.stdout
    redone = json.loads(record_file.read_text())
    assert redone["status"] == "ok" and checkpoint.stat().st_mtime_ns == trained_at
    # Every completion was on disk already: the new job read them back and generated none again.
    assert len((apart / other["run_id"] / "eval" / "synthetic.jsonl").read_text().splitlines()) == 8
    assert redone["summary"]["eval_job"]["job_id"] != job["job_id"]
    for key in (*EVAL_KEYS, "train_time_s", "train_flops"):
        assert redone["summary"][key] == other["summary"][key], key


def test_a_point_whose_evaluation_was_never_submitted_is_failed_not_waited_for(tmp_path):
    record = {"run_id": "abc", "sweep": "s", "status": "evaluating", "error": None, "overrides": [],
              "config": {}, "summary": {"train_flops": 1.0}, "last_action": "ran"}
    write_json_atomic(tmp_path / "result.json", record)
    eval_job.wait(tmp_path)
    stored = json.loads((tmp_path / "result.json").read_text())
    assert stored["status"] == "failed" and "never submitted" in stored["error"]
    assert stored["summary"] == {"train_flops": 1.0}  # what training recorded is kept


def test_evaluate_point_refuses_a_point_that_is_not_waiting_for_evaluation(tmp_path):
    write_json_atomic(tmp_path / "result.json", {"status": "ok", "config": {}})
    with pytest.raises(RuntimeError, match="status 'evaluating'.*found 'ok'"):
        eval_job.evaluate_point(str(tmp_path))


def test_a_second_evaluation_job_of_a_point_leaves_the_record_to_the_first(tmp_path):
    from kd_sweeps.claim import EVAL_CLAIM_FILE, PointClaim

    write_json_atomic(tmp_path / "result.json", {"status": "evaluating", "config": {}})
    before = (tmp_path / "result.json").read_bytes()
    with PointClaim(tmp_path, EVAL_CLAIM_FILE):  # the first evaluation job runs
        with pytest.raises(RuntimeError, match=f"evaluation is already running .*pid {os.getpid()}"):
            eval_job.evaluate_point(str(tmp_path))
    assert (tmp_path / "result.json").read_bytes() == before


def test_evaluation_job_resources_are_validated(compose):
    cfg = compose(["eval.job.mem_gb=0", "eval.job.timeout_min=-5", "eval.job.gpus_per_node=-1"])
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    for key in ("eval.job.mem_gb=0", "eval.job.timeout_min=-5", "eval.job.gpus_per_node=-1"):
        assert key in str(err.value)


@pytest.mark.slow  # a submitit local job: a subprocess, and the wait for its end
def test_an_evaluation_job_that_dies_fails_its_point_with_the_log_named(tmp_path):
    import os

    import submitit

    executor = submitit.AutoExecutor(folder=tmp_path / "eval_job", cluster="local")
    job = executor.submit(os._exit, 3)  # killed before it could record anything
    record = {"run_id": "abc", "sweep": "s", "status": "evaluating", "error": None, "config": {},
              "summary": {"eval_job": {"cluster": "local", "job_id": job.job_id,
                                       "folder": str(tmp_path / "eval_job")}}}
    write_json_atomic(tmp_path / "result.json", record)
    eval_job.wait(tmp_path, job)
    stored = json.loads((tmp_path / "result.json").read_text())
    assert stored["status"] == "failed" and f"evaluation job {job.job_id} ended" in stored["error"]
    assert str(job.paths.stderr) in stored["error"]


def test_a_preempted_evaluation_job_stays_evaluating_and_is_handed_to_submitit(tmp_path, monkeypatch):
    """The scheduler's signal stops generation (finished completions are on disk): the record stays
    "evaluating" for the requeued job, and the signal goes on to submitit's handler, which requeues
    (on a time limit too: the submitted callable is checkpointable)."""
    from kd_sweeps.checkpoint import Preempted

    handled = []
    def preempted(cfg, checkpoint, paths=None):
        raise Preempted("evaluation stopped by a preemption signal", handler=lambda *args: handled.append(args))

    monkeypatch.setattr(eval_job, "evaluate_checkpoint", preempted)
    record = {"run_id": "abc", "sweep": "s", "status": "evaluating", "error": None, "overrides": [],
              "config": {"logger": {"mode": "disabled"}}, "summary": {"train_flops": 1.0}, "last_action": "ran"}
    write_json_atomic(tmp_path / "result.json", record)
    with pytest.raises(Preempted):
        eval_job.evaluate_point(str(tmp_path))
    stored = json.loads((tmp_path / "result.json").read_text())
    assert stored["status"] == "evaluating" and stored["error"] is None and handled
    requeue = eval_job.EvaluationJob().checkpoint(str(tmp_path))
    assert isinstance(requeue.function, eval_job.EvaluationJob) and requeue.args == (str(tmp_path),)

    # A requeue after a hard kill finds the record "running" (never closed): it evaluates again.
    write_json_atomic(tmp_path / "result.json", {**record, "status": "running"})
    with pytest.raises(Preempted):
        eval_job.evaluate_point(str(tmp_path))
