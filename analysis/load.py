"""Read sweep runs from their sources into one tidy, typed DataFrame (``analysis.frame``).

Two sources describe the same runs: the ``result.json`` each grid point writes
and its offline W&B run (id = <run_id>-<sweep>, group = sweep, same config and summary); an online
W&B project is a third (``analysis.online``). Each is reduced to records shaped like ``result.json``
and goes through ``runs_frame``, so the same runs give equal frames whichever source is read.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pandas as pd

from analysis.frame import COLUMNS, runs_frame, wandb_status  # noqa: F401 (also read from here)

log = logging.getLogger(__name__)

# entity/project, optionally :group ("team/kd:sections-vs-trunc").
_ENTITY_PROJECT = re.compile(r"^(?P<path>[\w.-]+/[\w.-]+)(?::(?P<group>.+))?$")


def read_result_records(sweep_dir) -> list[dict]:
    """Every readable result.json below sweep_dir; unreadable ones are logged and skipped. A run
    met twice (a copied point folder, a link to one) is counted once, with a warning."""
    records, seen = [], {}
    for path in sorted(Path(sweep_dir).rglob("result.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            log.warning("%s: skipped, not readable as JSON (%s)", path, exc)
            continue
        if not isinstance(record, dict):
            log.warning("%s: skipped, not a JSON object (a %s)", path, type(record).__name__)
            continue
        key = f"{record.get('sweep')}/{record['run_id']}" if record.get("run_id") else str(path.resolve())
        if key in seen:
            log.warning("%s: skipped, the same run (%s) as %s", path, key, seen[key])
            continue
        seen[key] = path
        records.append(record)
    return records


def load_results(sweep_dir) -> pd.DataFrame:
    """Frame of every result.json below sweep_dir (jobs that never wrote one are absent)."""
    return runs_frame(read_result_records(sweep_dir))


def wandb_record(run) -> dict:
    """An OfflineRun as a result.json-shaped record."""
    summary = dict(run.summary)
    # result.json keeps the error message outside the summary; a W&B run only has it
    # if the trainer also put it in the summary.
    error = summary.pop("error", None)
    return {
        "run_id": run.run_id.split("-", 1)[0],  # W&B id = <point id>-<sweep> (kd_sweeps.wandb_naming)
        "sweep": run.group,
        "status": wandb_status(run.state),
        "error": error,
        "config": run.config,
        "summary": summary,
    }


def load_offline_wandb(root) -> pd.DataFrame:
    """Frame of every offline W&B run below root but sweep summary runs; corrupt logs are
    logged and skipped."""
    # Imported here: it needs wandb's protobufs, which result.json users may not have.
    from analysis.wandb_offline import find_runs, is_summary, merge_resumed, read_run

    runs = []
    for file in find_runs(root):
        try:
            run = read_run(file)
        except ValueError as exc:  # one damaged log should not hide the whole sweep
            log.warning("skipped offline W&B run: %s", exc)
            continue
        if not is_summary(run):  # a sweep's summary run (job_type summary) is no grid point
            runs.append(run)
    return runs_frame([wandb_record(run) for run in merge_resumed(runs)])


def _has_wandb_runs(root: Path) -> bool:
    from analysis.wandb_offline import find_runs

    return bool(find_runs(root))


def online_path(source) -> tuple[str, str | None] | None:
    """('entity/project', group or None) if source names a W&B project, else None."""
    match = _ENTITY_PROJECT.match(str(source))
    return (match["path"], match["group"]) if match else None


def load(source, group: str | None = None, tags=None, state: str | None = None,
         api=None) -> pd.DataFrame:
    """Runs frame from a sweep directory (result.json files), offline W&B runs, or
    an online W&B project ``entity/project[:group]`` (group, tags, state filter it).

    A local path wins over the W&B reading of the same string.
    """
    path = Path(source)
    if path.is_dir():
        if next(path.rglob("result.json"), None) is not None:
            return load_results(path)
        if _has_wandb_runs(path):
            return load_offline_wandb(path)
        raise FileNotFoundError(f"{path}: no result.json files and no offline W&B runs below it")
    if path.exists():
        raise NotADirectoryError(f"{path}: expected a sweep directory or a W&B run directory")
    online = online_path(source)
    # "multirun/typo" looks like entity/project too; a local first part says it is a path.
    if online is not None and not Path(online[0].split("/")[0]).exists():
        from analysis.online import load_online

        project, named_group = online
        if named_group and group and named_group != group:
            raise ValueError(f"{source!r} names group {named_group!r} but group={group!r} "
                             "was also given; give one")
        return load_online(project, group=group or named_group, tags=tags, state=state, api=api)
    raise FileNotFoundError(f"{path}: no such directory, and not a W&B 'entity/project'")
