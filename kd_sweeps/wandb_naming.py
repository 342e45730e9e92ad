"""How a grid point appears in W&B: a readable name, one tag per grid key, the sweep as group and
in the run id. Everything here is redacted before W&B sees it: a token-shaped sweep name or a
secret's value in ``logger.tags`` would otherwise sit in clear in the run file `wandb sync` uploads.
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path
from typing import Optional

from kd_sweeps.identity import NON_IDENTITY_KEYS
from kd_sweeps.redact import env_secrets, redact

log = logging.getLogger(__name__)
# Override keys that say where or how a point runs, not what it is: kept out of names and tags.
_NOT_A_LABEL = frozenset(NON_IDENTITY_KEYS) | {"experiment"}  # the sweep (group) names the experiment
_TAG_MAX = 64  # W&B refuses longer tags
_NAME_MAX = 128  # a longer display name is unreadable in W&B's run table anyway
_SWEEP_IN_ID = 32  # characters of the sweep name kept in a run id


def grid_keys(sweep_dir: Path) -> Optional[set[str]]:
    """The keys a sweep varies, from the ``multirun.yaml`` Hydra wrote in ``sweep_dir`` before its
    jobs: ``hydra.sweeper.params`` (an experiment preset's grid) and the command line's sweep
    overrides (``trunc=0.25,0.5``). None outside a multirun (no such file)."""
    import yaml
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        hydra_cfg = (yaml.safe_load((Path(sweep_dir) / "multirun.yaml").read_text()) or {}).get("hydra") or {}
        keys = {str(k).lstrip("+~") for k in ((hydra_cfg.get("sweeper") or {}).get("params") or {})}
        task = (hydra_cfg.get("overrides") or {}).get("task") or []
        keys |= {o.key_or_group for o in OverridesParser.create().parse_overrides(task) if o.is_sweep_override()}
    except FileNotFoundError:
        return None
    except Exception as err:  # noqa: BLE001 - a name is not worth failing a point for
        log.warning("W&B run name: %s/multirun.yaml not readable (%s); every override names the run",
                    sweep_dir, err)
        return None
    return keys


def point_labels(overrides: list[str], grid: Optional[set[str]] = None) -> list[str]:
    """The overrides that tell a grid point apart (``trunc=0.5``, ``sections=cot``), without the
    ``+``/``++`` prefixes and without those of NON_IDENTITY_KEYS (logger, launcher, sweep, ...).
    With the sweep's grid keys, only theirs (unless none of them is among the overrides)."""
    labels = []
    for override in overrides:
        label = str(override).lstrip("+")
        key = label.split("=", 1)[0].lstrip("~")
        if key and key.split(".", 1)[0].split("@", 1)[0] not in _NOT_A_LABEL:
            labels.append((key, label))
    in_grid = [label for key, label in labels if grid and key in grid]
    return in_grid or [label for _, label in labels]


def run_name(labels: list[str], point_id: str) -> str:
    """A W&B display name from a point's labels (``trunc=0.5 sections=cot``); its id when it has none."""
    name = " ".join(labels) or point_id
    return name if len(name) <= _NAME_MAX else name[:_NAME_MAX - 1] + "…"


def wandb_run_id(point_id: str, sweep: str) -> str:
    """``<point id>-<sweep>``: the same point in another sweep is another W&B run, a requeued or
    resumed one keeps its run. The sweep part keeps the name's safe characters (at most 32); a name
    that needed changes (a secret, a character W&B ids refuse) gets a hash of it so that two such
    sweeps stay apart. ``point_of_wandb_id`` gives the point id back."""
    safe = re.sub(r"[^A-Za-z0-9_.]", "_", redact(sweep))[:_SWEEP_IN_ID]
    if safe != sweep:
        safe += "_" + hashlib.sha256(sweep.encode()).hexdigest()[:8]
    return f"{point_id}-{safe}"


def point_of_wandb_id(wandb_id: str) -> str:
    """The point id (result.json's run_id) in a W&B run id; ids written before the sweep was part of
    them are the point id itself."""
    return wandb_id.split("-", 1)[0]


def wandb_fields(point_id: str, sweep: str, overrides: list[str], sweep_dir: Path, tags: list[str]) -> dict:
    """``wandb.init``'s name, tags, group, id and notes for a point, every one redacted."""
    secrets = env_secrets()
    labels = [redact(label, secrets) for label in point_labels(overrides, grid_keys(sweep_dir))]
    all_tags = dict.fromkeys(_tag(t) for t in [*labels, *redact(list(tags), secrets)] if t)
    notes = f"sweep {sweep}, point {point_id}: {' '.join(overrides)}"
    return {"name": run_name(labels, point_id), "tags": list(all_tags), "group": redact(sweep, secrets),
            "id": wandb_run_id(point_id, sweep), "notes": redact(notes, secrets)}


def _tag(text: str) -> str:
    return text if len(text) <= _TAG_MAX else text[:_TAG_MAX - 1] + "…"
