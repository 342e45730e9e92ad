"""What ``launch.py`` runs inside each job: Hydra's runtime facts → ``run.main``; failure isolation.

A point is first claimed (kd_sweeps/claim.py): a launch that finds it claimed by another one skips
it and writes nothing there. In a sweep, a point that raises is recorded as failed (result.json, W&B
state) and the sweep goes on; the end-of-sweep summary lists it and the command exits non-zero. A
single run re-raises. A preemption signal is not a failure: the point is recorded as preempted, then
the signal's earlier handler acts (submitit requeues the job, which resumes from the saved state) or
the process stops. Ctrl-C records ``interrupted`` in a record this launch opened, nothing otherwise.

Every job returns its outcome in this launch (``outcome``: ran / skipped / claimed / failed /
interrupted), which the launcher hands to the end-of-sweep summary (kd_sweeps/launcher.py).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from omegaconf import DictConfig, open_dict

from kd_sweeps.point_record import PointRecord, read_result
from kd_sweeps.redact import redact_text, redact_yaml_files

log = logging.getLogger(__name__)


def outcome(kind: str, point: Path, status=None, error=None, summary=None) -> dict:
    """A job's return value: what happened to its point in this launch."""
    return {"outcome": kind, "point": str(point), "status": status, "error": error, "summary": summary or {}}


def run_point(cfg: DictConfig) -> dict:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from kd_sweeps import distributed
    from kd_sweeps.claim import PointClaim, PointClaimed

    hydra_cfg = HydraConfig.get()
    output_dir = Path(hydra_cfg.runtime.output_dir)
    # Rank 0 claims for the whole multi-process point and tells the other ranks once they have joined
    # the process group (run.main): they must neither train alone nor wait for a rank 0 that left.
    claim = PointClaim(output_dir) if distributed.process_rank() == 0 else None
    if claim is not None:
        claim.__enter__()
    try:
        if claim is not None and not claim.owned and distributed.launch_env() is None:
            raise PointClaimed(f"grid point {output_dir} is claimed by another launch")
        return _run_claimed(cfg, hydra_cfg, output_dir, claimed=claim is None or claim.owned)
    except PointClaimed as taken:
        who = claim.describe() if claim is not None else "the launch rank 0 named"
        if hydra_cfg.mode != RunMode.MULTIRUN:  # the one point asked for is not run: say so
            raise SystemExit(f"{taken} ({who}); not run here, its record left alone") from None
        log.warning("%s (%s): skipped, its record left alone", taken, who)
        return outcome("claimed", output_dir, error=f"claimed by {who}")
    finally:
        if claim is not None:
            claim.__exit__()


def _run_claimed(cfg: DictConfig, hydra_cfg, output_dir: Path, claimed: bool) -> dict:
    from hydra.types import RunMode

    overrides = list(hydra_cfg.overrides.task)
    if hydra_cfg.output_subdir is not None:  # Hydra saved the config with any token it was given
        redact_yaml_files(output_dir / hydra_cfg.output_subdir)
    with open_dict(cfg):
        cfg.output_dir = str(output_dir)
    os.environ.setdefault("WANDB_SILENT", "true")
    from kd_sweeps import distributed, run

    from kd_sweeps.checkpoint import Preempted
    from kd_sweeps.claim import PointClaimed

    before = read_result(output_dir)
    try:
        summary = run.main(cfg, overrides, claimed)
    except Preempted as stop:  # recorded as preempted; now submitit requeues the job, or we stop
        stop.hand_over()  # never returns: exits (submitit) or re-raises
    except PointClaimed:
        raise
    except Exception as err:
        if hydra_cfg.mode != RunMode.MULTIRUN or not claimed:
            raise
        log.exception("grid point %s failed", redact_text(" ".join(overrides)))
        error = f"{type(err).__name__}: {err}"
        # Failed before its record was opened (the record is the one found at the start): record the
        # failure, unless that record holds a finished result (a forced rerun keeps it). In a
        # multi-process job only rank 0 writes the record.
        if read_result(output_dir) == before and (before or {}).get("status") != "ok" \
                and distributed.process_rank() == 0:
            PointRecord(output_dir).failure(cfg.sweep, overrides, error)
        return outcome("failed", output_dir, "failed", redact_text(error))
    record = read_result(output_dir) or {}
    kind = "skipped" if record.get("last_action") == "skipped" else "ran"
    return outcome(kind, output_dir, record.get("status", "ok"), summary=summary)
