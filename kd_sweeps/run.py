"""One grid point, end to end: validate → models and data → KD training → evaluation → cost → record.

``main(cfg)`` is what ``launch.py`` calls for every point of a sweep; it returns the run's summary.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from kd_sweeps import distributed, identity
from kd_sweeps.point_record import RESULT_FILE, PointRecord, read_result
from kd_sweeps.recipe import PointRecipe
from kd_sweeps.tracking import Tracker
from kd_sweeps.validation import validate

log = logging.getLogger(__name__)


def main(cfg: DictConfig, overrides: list[str] | None = None, claimed: bool = True) -> dict:
    """Run one grid point. ``claimed``: whether this process holds the point's claim (rank 0 takes it
    for the whole point, kd_sweeps/claim.py; other ranks' value is ignored)."""
    validate(cfg)  # before anything heavy: a bad point fails in a second with every problem listed
    resolved = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)  # plain strings for the record and W&B
    point_id = identity.run_id(resolved)
    output_dir = Path(cfg.output_dir)
    env = distributed.init_distributed(cfg.train.device)  # one process, or one rank of torchrun / submitit tasks
    try:
        if not distributed.all_gather(claimed, env)[0]:  # rank 0's claim decides for every rank
            from kd_sweeps.claim import PointClaimed

            raise PointClaimed(f"grid point {output_dir} is claimed by another launch")
        distributed.micro_batch_size(cfg.train.batch_size, cfg.train.micro_batch_size, env)  # fails before any load
        done = read_result(output_dir)
        distributed.barrier(env)  # every rank has read the record before rank 0 rewrites it
        if done and done.get("status") == "ok" and done.get("run_id") == point_id and not cfg.force:
            log.info("run %s is done (%s); skipped (force=true reruns it)", point_id, output_dir / RESULT_FILE)
            if env.is_main:
                PointRecord(output_dir).skipped(done)
            return done["summary"]
        if cfg.eval.separate_job and not cfg.force:
            from kd_sweeps import eval_job

            if eval_job.trained_only(done, point_id, output_dir):  # every rank read the same record
                return eval_job.finish_evaluation(cfg, output_dir, point_id) if env.is_main else {}
        # Rank 0 alone keeps the record (result.json, W&B); the other ranks train and evaluate nothing.
        record = Tracker(output_dir, point_id, cfg.sweep, resolved, cfg.logger, overrides) if env.is_main \
            else _Unrecorded(point_id)
        with record as tracker:
            distributed.barrier(env)  # rank 0's record says "running" before another rank reads it
            if cfg.eval.separate_job:  # the record stays open for the evaluation job
                tracker.status_on_success = "evaluating"
            summary = PointRecipe(cfg, tracker, output_dir, env).run()
            tracker.set_summary(summary)
        if cfg.eval.separate_job and env.is_main:
            from kd_sweeps import eval_job

            return eval_job.submit(cfg, output_dir, point_id)
        return summary
    finally:
        distributed.destroy(env)


class _Unrecorded:
    """A rank other than 0's stand-in for the Tracker: it records nothing."""

    def __init__(self, run_id: str):
        self.run_id = run_id

    def __enter__(self) -> "_Unrecorded":
        return self

    def __exit__(self, *exc) -> bool:
        return False

    def log_step(self, step: int, metrics: dict) -> None:
        pass

    def set_summary(self, summary: dict) -> None:
        pass
