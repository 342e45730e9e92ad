"""What ``launch.py`` runs inside each job: Hydra's runtime facts → ``run.main``; failure isolation.

In a sweep, a point that raises is recorded as failed (result.json, W&B state) and the sweep goes
on; the end-of-sweep summary lists it and the command exits non-zero. A single run re-raises. A
preemption signal is not a failure: the point is recorded as preempted, then the signal's earlier
handler acts (submitit requeues the job, which resumes from the saved state) or the process stops.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from omegaconf import DictConfig, open_dict

from kd_sweeps.redact import redact_text, redact_yaml_files
from kd_sweeps.tracking import RESULT_FILE, now_iso, write_result

log = logging.getLogger(__name__)


def run_point(cfg: DictConfig) -> dict:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    output_dir = Path(hydra_cfg.runtime.output_dir)
    overrides = list(hydra_cfg.overrides.task)
    if hydra_cfg.output_subdir is not None:  # Hydra saved the config with any token it was given
        redact_yaml_files(output_dir / hydra_cfg.output_subdir)
    with open_dict(cfg):
        cfg.output_dir = str(output_dir)
    os.environ.setdefault("WANDB_SILENT", "true")
    from kd_sweeps import distributed, run

    from kd_sweeps.checkpoint import Preempted

    try:
        return run.main(cfg, overrides)
    except Preempted as stop:  # recorded as preempted; now submitit requeues the job, or we stop
        stop.hand_over()  # never returns: exits (submitit) or re-raises
    except Exception as err:
        if hydra_cfg.mode != RunMode.MULTIRUN:
            raise
        log.exception("grid point %s failed", redact_text(" ".join(overrides)))
        # Failed before its record was opened; in a multi-process job only rank 0 writes the record.
        if not (output_dir / RESULT_FILE).exists() and distributed.process_rank() == 0:
            write_result(output_dir, {
                "run_id": None, "sweep": cfg.sweep, "status": "failed",
                "error": f"{type(err).__name__}: {err}", "overrides": overrides, "config": None,
                "summary": {}, "started_at": now_iso(), "finished_at": now_iso(),
                "launched_at": now_iso(), "last_action": "failed"})
        return {"status": "failed", "error": str(err)}
