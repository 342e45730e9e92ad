"""Where a run's record goes: a W&B run (offline by default) and ``result.json``, written atomically.

``result.json`` is the store nothing else depends on: the resolved config, the summary, the status
(running → ok | failed with the error | preempted, to resume from its saved state | interrupted by
Ctrl-C), which job on which host wrote it, and timestamps.
W&B gets the same config and summary plus the per-step history, in a run named by the point's
grid values (``trunc=0.5 sections=cot``) with one tag per grid key, group = sweep, job type train
(eval for a separate evaluation job) and id = point id + sweep; ``finish()`` is always called,
with a non-zero exit code when the run failed.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Optional

from kd_sweeps.point_record import PointRecord
from kd_sweeps.redact import redact
from kd_sweeps.wandb_naming import wandb_fields

log = logging.getLogger(__name__)
DISK_FULL = ("No space left on device", "File too large", "Disk quota exceeded")  # ENOSPC, EFBIG, EDQUOT


class Tracker:
    """One grid point's record keeping. Use as a context manager: the run is always finished."""

    def __init__(self, output_dir: Path, run_id: str, sweep: str, config: dict, logger_cfg,
                 overrides: Optional[list[str]] = None):
        self.output_dir = Path(output_dir)
        # Secrets (tokens passed in the config or overrides) are removed before anything is recorded.
        self.run_id, self.sweep, self.config = run_id, sweep, redact(config)
        self.logger_cfg = logger_cfg
        self.record = PointRecord(self.output_dir)
        self.result = PointRecord.opened(run_id, sweep, overrides or [], self.config)
        self.wandb_run = None
        self.job_type = "train"  # W&B job type; "eval" when a separate evaluation job resumes the run
        self.status_on_success = "ok"  # "evaluating" while a separate evaluation job is pending

    @classmethod
    def reopen(cls, output_dir: Path, result: dict, logger_cfg) -> "Tracker":
        """The record of a point that a previous job started (its evaluation job continues it):
        the same result.json and the same W&B run (same id, resumed)."""
        tracker = cls(output_dir, result["run_id"], result["sweep"], result["config"], logger_cfg,
                      result.get("overrides"))
        tracker.result = PointRecord.reopened(result)
        tracker.job_type = "eval"
        return tracker

    def __enter__(self) -> "Tracker":
        self.record.write(self.result)
        if self.logger_cfg.mode != "disabled":
            try:
                self.wandb_run = self._start_wandb()
            except Exception as err:  # recorded as failed like any other error, then raised
                error = RuntimeError(
                    f"logger.mode={self.logger_cfg.mode}: W&B did not start ({type(err).__name__}: {err}). "
                    "Check the network, WANDB_BASE_URL and `wandb login` (WANDB_INIT_TIMEOUT bounds the wait), "
                    "or run with logger.mode=offline and upload later with `wandb sync`")
                self.__exit__(RuntimeError, error, None)
                raise error from err
        return self

    def _start_wandb(self):
        import wandb  # imported here: a config check or a plan never pays for it

        # W&B records the command line (sys.argv) in the run's metadata: give it the redacted one.
        argv = sys.argv[:]
        sys.argv[:] = redact(argv)
        try:
            return self._init_wandb(wandb)
        finally:
            sys.argv[:] = argv

    def _init_wandb(self, wandb):
        # Name, tags, group, id and notes are redacted (kd_sweeps.wandb_naming). A later job of the
        # point (its evaluation job) reuses them from result.json, so the run keeps its name.
        stored = self.result.get("wandb") if isinstance(self.result.get("wandb"), dict) else {}
        fields = {key: stored[key] for key in ("name", "tags", "group", "id", "notes") if key in stored} or \
            wandb_fields(self.run_id, self.sweep, self.result.get("overrides") or [], self.output_dir.parent,
                         list(self.logger_cfg.tags))
        self.result["wandb"] = fields
        return wandb.init(
            project=self.logger_cfg.project, entity=self.logger_cfg.entity, job_type=self.job_type,
            resume="allow", config=self.config, dir=str(self.output_dir), mode=self.logger_cfg.mode,
            settings=wandb.Settings(silent=True, console="off"), **fields,
        )

    def log_step(self, step: int, metrics: dict) -> None:
        if self.wandb_run is not None:
            self.wandb_run.log({f"train/{k}": v for k, v in metrics.items()}, step=step)

    def set_summary(self, summary: dict) -> None:
        summary = redact(summary)
        self.result["summary"].update(summary)
        if self.wandb_run is not None:
            for key, value in summary.items():
                self.wandb_run.summary[key] = value

    def __exit__(self, exc_type, exc, tb) -> bool:
        failed = exc is not None
        preempted = failed and _is_preemption(exc)
        interrupted = isinstance(exc, KeyboardInterrupt)  # Ctrl-C: SIGINT, not an error of the run
        status = "preempted" if preempted else "interrupted" if interrupted \
            else "failed" if failed else self.status_on_success
        error = None
        if interrupted:
            error = "interrupted by SIGINT (Ctrl-C); run the same command again to rerun it"
        elif failed:
            error = redact(f"{exc_type.__name__}: {exc}")
            if any(full in str(exc) for full in DISK_FULL):  # the OS names the limit, not the place
                error += (f" (writing under output_dir={self.output_dir}: free disk space or "
                          "choose another output_dir / hydra.sweep.dir, then rerun the point)")
        try:
            self.record.closed(self.result, status, error)
        finally:
            if self.wandb_run is not None:
                if failed:  # the W&B record names the error too, not only result.json
                    self.wandb_run.summary["error"] = self.result["error"]
                if preempted:  # the requeued job resumes this same run (same id, resume="allow")
                    self.wandb_run.mark_preempting()
                offline_dir = Path(self.wandb_run.dir).parent if self.logger_cfg.mode == "offline" else None
                self.wandb_run.finish(exit_code=1 if failed else 0)
                if offline_dir is not None:
                    _wait_for_offline_log(offline_dir)
        return False  # the error still propagates to the launcher


def _wait_for_offline_log(run_dir: Path, timeout_s: float = 30.0) -> None:
    """Wait until the offline run's log in ``run_dir`` holds its exit record.

    ``finish()`` can return before W&B's service process has written the run's last records (seen
    on a loaded 2-core machine: a reader right after found neither the config nor the exit), and
    the end-of-sweep summary and the analysis read these files at once."""
    from analysis.wandb_offline import read_run

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if read_run(run_dir).exit_code is not None:
                return
        except Exception:  # noqa: BLE001 - a log still being written may not parse yet
            pass
        if time.monotonic() > deadline:
            log.warning("W&B offline log in %s has no exit record %.0f s after finish()", run_dir, timeout_s)
            return
        time.sleep(0.1)


def _is_preemption(exc: BaseException) -> bool:
    from kd_sweeps.checkpoint import Preempted  # torch is loaded already in a job that trains

    return isinstance(exc, Preempted)
