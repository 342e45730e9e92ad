"""Evaluation as a job of its own (``eval.separate_job=true``).

The training job saves the checkpoint, closes its record as "evaluating" and submits the evaluation
with the resources of ``eval.job``. Under Slurm that is an sbatch job which starts only once the
training job has ended well (``--dependency=afterok:<training job>``): training's GPUs go back to
the queue at once, and generation (hours for long traces) gets its own time limit and memory.
Elsewhere it is a separate local process, waited for. The evaluation job reopens the point's
result.json and W&B run and adds the accuracies; the end-of-sweep summary waits for it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, OmegaConf

from kd_sweeps.point_record import PointRecord, read_result
from kd_sweeps.tracking import Tracker

log = logging.getLogger(__name__)
JOB_DIR = "eval_job"  # submitit's files of the evaluation job, inside the point's folder


def _executor(cfg: DictConfig, folder: Path, run_id: str):
    import submitit

    on_slurm = os.environ.get("SUBMITIT_EXECUTOR") == "slurm"  # set by submitit inside its jobs
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm" if on_slurm else "local")
    job = cfg.eval.job
    params = dict(name=f"eval-{run_id}", timeout_min=job.timeout_min, cpus_per_task=job.cpus_per_task,
                  mem_gb=job.mem_gb)
    if job.gpus_per_node is not None:
        params["gpus_per_node"] = job.gpus_per_node
    if on_slurm:
        params.update({f"slurm_{key}": job[key] for key in ("partition", "account", "qos") if job[key]})
        # SLURM_JOB_ID is this array task's own id. If the training job does not end well the
        # dependency can never be met: Slurm then cancels the evaluation instead of keeping it queued.
        params["slurm_additional_parameters"] = {"dependency": f"afterok:{os.environ['SLURM_JOB_ID']}",
                                                 "kill-on-invalid-dep": "yes", "requeue": True}
    executor.update_parameters(**params)
    return executor, "slurm" if on_slurm else "local"


def submit(cfg: DictConfig, output_dir: Path, run_id: str) -> dict:
    """Submit the evaluation of the checkpoint in ``output_dir``; record the job in result.json.
    Returns the record's summary (with the accuracies when the job ran locally, since it is waited
    for; without them under Slurm, where the job starts after this one ends)."""
    import submitit

    record = read_result(output_dir)
    try:
        executor, cluster = _executor(cfg, output_dir / JOB_DIR, run_id)
        # Without this job's SLURM_* variables (array ids, ranks) and its W&B service's address.
        with submitit.helpers.clean_env(extra_names=("WANDB_SERVICE",)):
            job = executor.submit(EvaluationJob(), str(output_dir))
    except Exception as err:  # e.g. sbatch refused the resources: the point fails, named
        PointRecord(output_dir).failed(record, f"evaluation job not submitted: {type(err).__name__}: {err}")
        raise
    record["summary"]["eval_job"] = {"cluster": cluster, "job_id": str(job.job_id),
                                     "folder": str(output_dir / JOB_DIR)}
    PointRecord(output_dir).write(record)  # the job that will finish it
    log.info("evaluation of %s submitted as %s job %s", run_id, cluster, job.job_id)
    if cluster == "local":
        return wait(output_dir, job)
    return record["summary"]


def wait(output_dir: Path, job=None) -> dict:
    """Wait for the point's evaluation job (``job``, or the one its record names); if the job ended
    without closing the record (killed, out of time or memory), record the point as failed with the
    job's state and log. Returns the record's summary."""
    import submitit

    record = read_result(output_dir)
    info = record["summary"].get("eval_job")
    if info is None:  # the training job ended between closing its record and submitting
        PointRecord(output_dir).failed(
            record, "training finished but its evaluation job was never submitted; rerun the point")
        return record["summary"]
    if job is None:
        job = submitit.SlurmJob(folder=info["folder"], job_id=info["job_id"])
    try:
        job.result()
    except Exception as err:  # the job's own error is in result.json when it got that far
        log.warning("evaluation job %s of %s: %s", info["job_id"], Path(output_dir).name, err)
    record = read_result(output_dir)
    if record["status"] in ("evaluating", "running"):
        state = job.state  # the scheduler's accounting may lag the job's end by a moment
        known = f" ({state})" if state not in ("RUNNING", "PENDING", "UNKNOWN") else ""
        PointRecord(output_dir).failed(record, f"evaluation job {info['job_id']} ended{known} without recording "
                                               f"a result; see {job.paths.stderr}")
    return record["summary"]


def trained_only(record: Optional[dict], run_id: str, output_dir: Path) -> bool:
    """Whether the point's training finished (summary recorded, checkpoint saved) but its evaluation
    did not: the evaluation job failed, died, or is still pending."""
    if not record or record.get("run_id") != run_id or record.get("status") not in ("evaluating", "failed"):
        return False
    summary = record.get("summary") or {}
    return "train_flops" in summary and "accuracy" not in summary \
        and (Path(output_dir) / "checkpoint" / "config.json").exists()


def finish_evaluation(cfg: DictConfig, output_dir: Path, run_id: str) -> dict:
    """For a ``trained_only`` point: wait for its pending Slurm evaluation job, or (failed, or its
    local job's waiter is gone) submit the evaluation again; the training is not redone."""
    record = read_result(output_dir)
    if record["status"] == "evaluating" and (record["summary"].get("eval_job") or {}).get("cluster") == "slurm":
        wait(output_dir)
        record = read_result(output_dir)
        if record["status"] == "ok":
            return record["summary"]
    log.info("run %s: training is done (%s); evaluating it again", run_id, output_dir / "checkpoint")
    PointRecord(output_dir).evaluating(record)
    return submit(cfg, output_dir, run_id)


class EvaluationJob:
    """What the evaluation job runs: ``evaluate_point``. Having ``checkpoint`` makes submitit requeue
    the job when it reaches its time limit too, not only when it is preempted (up to the executor's
    ``max_num_timeout``); the requeued job resumes from the results files."""

    def __call__(self, output_dir: str) -> dict:
        return evaluate_point(output_dir)

    def checkpoint(self, output_dir: str):
        import submitit

        return submitit.helpers.DelayedSubmission(self, output_dir)


def evaluate_point(output_dir: str) -> dict:
    """The evaluation job: evaluate ``output_dir/checkpoint`` and complete the point's record.
    Stopped by a preemption signal or its time limit, it leaves the record "evaluating" (the
    finished completions are on disk in ``eval/``) and hands the signal on: submitit requeues it."""
    from kd_sweeps.claim import EVAL_CLAIM_FILE, PointClaim

    folder = Path(output_dir)
    with PointClaim(folder, EVAL_CLAIM_FILE) as claim:
        if not claim.owned:
            raise RuntimeError(f"{folder}: its evaluation is already running ({claim.describe()}); "
                               f"this job leaves the record to it")
        return _evaluate_claimed(folder)


def evaluate_checkpoint(cfg: DictConfig, checkpoint: Path, paths: dict[str, str] | None = None) -> dict:
    """``evaluate.evaluate_model`` on a saved checkpoint, then the references of ``eval.baselines``
    (``paths``: ``evaluate.reference_paths`` of the training's summary)."""
    import torch
    from transformers import AutoTokenizer

    from kd_sweeps import baselines, distributed, evaluate, selection

    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    device = distributed.init_distributed(cfg.train.device).device  # one process: no group is joined
    tokenizer = AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=cfg.model.trust_remote_code)
    engine = evaluate.resolve_engine(cfg.eval.engine, device)
    model = None if engine == "vllm" else selection.load_checkpoint(checkpoint, device, cfg.model.attn_implementation)
    eval_sets = evaluate.load_eval_sets(cfg)
    summary = {**evaluate.evaluate_model(cfg, model, tokenizer, eval_sets, device, checkpoint),
               "eval_engine": engine}
    model = None
    if paths and all(paths.get(role) for role in cfg.eval.baselines):
        summary.update(baselines.reference_summary(cfg, paths, tokenizer, device, eval_sets))
    return summary


def _evaluate_claimed(folder: Path) -> dict:
    from kd_sweeps.checkpoint import Preempted
    from kd_sweeps.evaluate import reference_paths

    record = read_result(folder)
    status = None if record is None else record.get("status")
    # "running": an earlier run of this job died without closing the record (a requeue after a kill)
    resumable = status == "running" and "train_flops" in (record.get("summary") or {})
    if status != "evaluating" and not resumable:
        raise RuntimeError(f"{folder / 'result.json'}: expected a point whose training finished "
                           f"(status 'evaluating'), found {status!r}")
    cfg = OmegaConf.create(record["config"])
    os.environ.setdefault("WANDB_SILENT", "true")
    stopped = None
    with Tracker.reopen(folder, record, cfg.logger) as tracker:
        tracker.status_on_success = "evaluating"  # until the summary is in
        try:
            summary = evaluate_checkpoint(cfg, folder / "checkpoint", reference_paths(record.get("summary") or {}))
        except Preempted as stop:
            stopped = stop
        else:
            tracker.status_on_success = "ok"
            tracker.set_summary(summary)
    if stopped is not None:
        log.info("run %s: evaluation stopped by a signal; the requeued job resumes it", tracker.run_id)
        stopped.hand_over()  # submitit: requeue and exit
    log.info("run %s: accuracy %.3f ± %.3f", tracker.run_id, summary["accuracy"], summary["accuracy_stderr"])
    return summary
