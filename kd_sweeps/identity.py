"""A grid point's identity: a hash of its resolved config without where or how it runs.

Two launches of the same point (a requeue, a repeated sweep) get the same id, which names the W&B
run, so a point resumes or is skipped instead of being duplicated.
"""

from __future__ import annotations

import hashlib
import json

# Keys that say where/how a point runs or is logged, not what it computes.
NON_IDENTITY_KEYS = ("logger", "output_dir", "cache_dir", "sweep", "extra", "launcher", "force", "hydra")
# which job evaluates, with what resources; which references are measured beside the point
NON_IDENTITY_EVAL_KEYS = ("separate_job", "job", "baselines")
# how many processes tokenize (the same rows either way); what the plan assumes (the run never reads it)
NON_IDENTITY_DATA_KEYS = ("num_proc", "assumed_lengths")


def identity_config(resolved: dict) -> dict:
    kept = {k: v for k, v in resolved.items() if k not in NON_IDENTITY_KEYS}
    if isinstance(kept.get("eval"), dict):
        kept["eval"] = {k: v for k, v in kept["eval"].items() if k not in NON_IDENTITY_EVAL_KEYS}
    if isinstance(kept.get("data"), dict):
        kept["data"] = {k: v for k, v in kept["data"].items() if k not in NON_IDENTITY_DATA_KEYS}
    if isinstance(kept.get("distill"), dict) and kept["distill"].get("mode") == "offline":
        del kept["distill"]  # offline reads none of its keys: ids stay those of points run before it existed
    return kept


def run_id(resolved: dict) -> str:
    """12 hex digits of sha256 over the canonical JSON of the identity config."""
    payload = json.dumps(identity_config(resolved), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def point_id_resolver(*, _root_) -> str:
    """OmegaConf resolver ``${kd_point_id:}``: the run id of the config it sits in, so Hydra can name
    a job's directory after it (``hydra.sweep.subdir``). Only the identity keys are resolved, never
    the ``hydra`` node that holds this interpolation."""
    from omegaconf import OmegaConf

    resolved = {key: OmegaConf.to_container(_root_[key], resolve=True) if OmegaConf.is_config(_root_[key])
                else _root_[key] for key in _root_ if key not in NON_IDENTITY_KEYS}
    return run_id(resolved)
