"""Sweeps through submitit (local processes or Slurm) that survive a lost grid point.

hydra-submitit-launcher gathers its jobs with ``job.results()``, which raises when a job ended
without a result: killed past its time limit (``hydra.launcher.timeout_min``), out of memory,
cancelled, or SIGKILLed. The first such job aborts the whole sweep: the other points' results are
never collected, the end-of-sweep summary never runs, and the lost point's result.json still says
"running". ``RecordsLostPoints`` gathers every job instead; a lost one is recorded as failed in its
result.json (why, and the time limit it had) and returned to Hydra as a failed point, like a point
that raised. The launchers themselves live in ``hydra_plugins/kd_sweeps_launcher`` because Hydra
only instantiates launchers from the ``hydra_plugins`` package (conf/launcher/*.yaml select them).

In-process sweeps (``launcher=basic``) get no per-point timeout: a point runs in the sweep's own
process, where a hung call cannot be stopped without stopping the sweep (a thread cannot be killed;
SIGALRM does not interrupt C code and would leave torch and W&B half-way through). Use
``launcher=local`` when points may hang.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Sequence

from kd_sweeps.point_record import PointRecord

log = logging.getLogger(__name__)
TIMEOUT_STATES = ("TIMEOUT", "DEADLINE")  # Slurm's states for a job stopped at its time limit
_SUBMITIT_TIMEOUT = "Job not requeued because"  # submitit gave up on a timed-out job (UncompletedJobError)


def lost_reason(state: str, timeout_min: float, waited_s: float, detail: str) -> str:
    """Why a job ended without a result, for its result.json."""
    limit = f"hydra.launcher.timeout_min={timeout_min:g}"
    if state.upper() in TIMEOUT_STATES or waited_s >= 60 * timeout_min:
        head = f"killed: timed out after {timeout_min:g} min ({limit})"
    else:
        head = f"killed before it finished (job state {state}; out of memory, cancelled or SIGKILL; {limit})"
    return f"{head}: {detail}"


# What happened to each grid point of this launch, in this (the sweep's) process: the launchers
# append one entry per job (from its return value, or its loss); the end-of-sweep summary counts them.
OUTCOMES: list[dict] = []


def note_returns(returns: Sequence[Any]) -> None:
    """Add each JobReturn's outcome to OUTCOMES (a job that raised past run_point counts failed)."""
    from hydra.core.utils import JobStatus

    for ret in returns:
        value = getattr(ret, "_return_value", None)
        overrides = list(ret.overrides or [])
        if ret.status == JobStatus.COMPLETED and isinstance(value, dict) and "outcome" in value:
            OUTCOMES.append({**value, "overrides": overrides})
            continue
        point = str(ret.hydra_cfg.hydra.runtime.output_dir) if getattr(ret, "hydra_cfg", None) else ""
        error = f"{type(value).__name__}: {value}" if isinstance(value, BaseException) else str(value)
        OUTCOMES.append({"outcome": "failed", "point": point, "status": "failed", "error": error, "summary": {},
                         "overrides": overrides})


def _stub_return(overrides: Sequence[str], kind: str, error: str):
    """A JobReturn for a job that never returned one (it raised before its task ran, or Ctrl-C)."""
    from hydra.core.utils import JobReturn, JobStatus

    ret = JobReturn(overrides=list(overrides), status=JobStatus.COMPLETED)
    ret.return_value = {"outcome": kind, "point": "", "status": kind, "error": error, "summary": {}}
    return ret


class CountsEveryPoint:
    """Mixed into Hydra's BasicLauncher (conf/launcher/basic.yaml): the same in-process jobs, one
    at a time, but none can end the sweep without a summary. A job that raises outside its task
    (its folder cannot be created or written) is a failed point and the next one runs; Ctrl-C marks
    the running point and those not started as interrupted, and the summary still runs."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[Any]:
        from hydra.core.utils import JobStatus

        returns: list = []
        for offset, overrides in enumerate(job_overrides):
            try:
                (ret,) = super().launch([overrides], initial_job_idx + offset)
            except KeyboardInterrupt:
                log.error("interrupted (SIGINT): %d grid point(s) not finished", len(job_overrides) - offset)
                returns += [_stub_return(o, "interrupted", "interrupted by SIGINT (Ctrl-C)")
                            for o in job_overrides[offset:]]
                break
            except Exception as err:  # noqa: BLE001 - Hydra could not set the job up
                log.exception("grid point %s could not start", " ".join(overrides))
                ret = _stub_return(overrides, "failed", f"{type(err).__name__}: {err}")
            if ret.status == JobStatus.FAILED:  # raised past run_point: a failed point, not a stop
                note_returns([ret])
                ret = _stub_return(overrides, "failed", OUTCOMES.pop()["error"])
            returns.append(ret)
        note_returns(returns)
        return returns


def record_lost_point(point_dir: Path, overrides: Sequence[str], sweep: str, reason: str) -> dict:
    """Mark the point failed in its result.json, keeping what its run recorded (config, id, start).
    A record that says ok is left alone: the point finished before its process was lost; so is one
    whose point another launch holds now (its claim, kd_sweeps/claim.py)."""
    from kd_sweeps.claim import PointClaim

    with PointClaim(point_dir) as claim:
        if not claim.owned:
            log.warning("lost grid point %s is claimed by %s: its record is left alone", point_dir,
                        claim.describe())
            return {"status": "failed", "error": reason}
        return PointRecord(point_dir).lost(overrides, sweep, reason)


class RecordsLostPoints:
    """Mixed into hydra-submitit-launcher's LocalLauncher / SlurmLauncher: the same submission, but
    every job is gathered and a lost one is recorded as a failed point (see the module doc)."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[Any]:
        import submitit
        from hydra.core.singleton import Singleton
        from hydra.core.utils import filter_overrides
        from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
        from omegaconf import OmegaConf

        assert self.config is not None and len(job_overrides) > 0
        # As hydra-submitit-launcher 1.2 builds its executor: init keys, then prefixed parameters.
        init_keys = {"max_num_timeout", "submitit_folder"}
        init = {"folder": self.params["submitit_folder"]}
        if "max_num_timeout" in self.params:
            init[f"{self._EXECUTOR}_max_num_timeout"] = self.params["max_num_timeout"]
        executor = submitit.AutoExecutor(cluster=self._EXECUTOR, **init)
        shared = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{k if k in shared else f"{self._EXECUTOR}_{k}": v
                                      for k, v in self.params.items() if k not in init_keys})
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        log.info(f"Submitit '{self._EXECUTOR}' sweep output dir : {sweep_dir}")
        job_params = []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
            job_params.append((list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state()))
        submitted = time.monotonic()
        jobs = executor.map_array(self, *zip(*job_params))
        returns = [self._gather(job, list(overrides), submitted) for job, overrides in zip(jobs, job_overrides)]
        note_returns(returns)
        return returns

    def _gather(self, job, overrides: list[str], submitted: float):
        from hydra.core.utils import JobReturn, JobStatus

        timeout_min = self.params.get("timeout_min", 60)
        try:
            returned = job.results()[0]
        except Exception as err:  # the job's process ended without a result
            reason = lost_reason(str(getattr(job, "state", "UNKNOWN")), timeout_min,
                                 time.monotonic() - submitted, f"{type(err).__name__}: {err}")
        else:
            # submitit's warning signal before the time limit, once no requeue is left, raises
            # UncompletedJobError inside the run, which records it as a plain failure: name the limit.
            value = returned.return_value if returned.status == JobStatus.COMPLETED else None
            error = value.get("error") if isinstance(value, dict) else None
            if not (error and _SUBMITIT_TIMEOUT in error):
                return returned
            reason = lost_reason("TIMEOUT", timeout_min, time.monotonic() - submitted, error)
        point_dir = self._point_dir(overrides)
        log.error("grid point %s lost: %s", job.job_id, reason)
        record = record_lost_point(point_dir, overrides, str(self.config.get("sweep", "")), reason) \
            if point_dir else {"status": "failed", "error": reason}
        lost = JobReturn(overrides=overrides, working_dir=str(point_dir or ""), status=JobStatus.COMPLETED,
                         task_name=str(self.config.hydra.job.name))
        ok = record.get("status") == "ok"
        lost.return_value = {"outcome": "ran" if ok else "failed", "point": str(point_dir or ""),
                             "status": record.get("status", "failed"), "error": None if ok else reason,
                             "summary": record.get("summary") or {}}
        return lost

    def _point_dir(self, overrides: list[str]) -> Path | None:
        """The folder Hydra gives this job (hydra.sweep.dir / hydra.sweep.subdir, the point's id)."""
        try:
            cfg = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
            return Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir)
        except Exception:  # an unresolvable config fails the job itself, before any folder exists
            log.exception("no folder for grid point %s", " ".join(overrides))
            return None
