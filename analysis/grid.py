"""A sweep's full grid, from the ``multirun.yaml`` Hydra saves, and which points lack a result.

Hydra's basic sweeper turns the sweep overrides (``hydra.sweeper.params``
first, then the command line's ``hydra.overrides.task``) into the cartesian
product of their values, in order; job n is the n-th combination. We redo
that with Hydra's own override parser, so ``a=1,2``, ``range(0,3)``,
``choice(...)``, quoting and ``[P,A]`` lists mean what they meant to Hydra.
"""

from __future__ import annotations

import copy
import functools
import itertools
import logging
import math
from pathlib import Path
from typing import Any, Iterable, Mapping

import pandas as pd
import yaml

log = logging.getLogger(__name__)

MULTIRUN_FILE = "multirun.yaml"

# Override key -> runs-frame column holding the same value, for runs known only
# through the frame (W&B runs keep no override list). Group choices such as
# sections=cot match the chosen config's name, which the frame keeps.
KEY_COLUMNS = {
    "sweep": "sweep", "seed": "seed", "trunc": "trunc",
    "sections": "sections", "sections.name": "sections", "sections.include": "sections_include",
    "truncation.mode": "truncation_mode", "truncation.cut_after_think": "cut_after_think",
    "loss": "loss", "loss.name": "loss", "loss.kd_ratio": "kd_ratio",
    "loss.temperature": "temperature", "data": "dataset", "data.name": "dataset",
    "model.teacher.name_or_path": "teacher", "model.student.name_or_path": "student",
}


class _GroupOptions:
    """Stands in for Hydra's config loader where ``glob(...)`` needs a group's options:
    the config files of that group in the sweep's file config sources."""

    def __init__(self, sources: Iterable[Mapping]):
        self.dirs = [Path(s["path"]) for s in sources
                     if s.get("schema") == "file" and s.get("path")]

    def get_group_options(self, group: str, results_filter=None, **_: Any) -> list[str]:
        names = {p.stem for d in self.dirs for p in (d / group).glob("*.yaml")}
        if not names:
            raise ValueError(f"glob() over config group {group!r}: no options found in "
                             f"{[str(d) for d in self.dirs]} (the sweep's config sources)")
        return sorted(names)


def _parser(config_sources: Iterable[Mapping] = ()):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create(config_loader=_GroupOptions(config_sources))


def point_key(override) -> str:
    """Key of a parsed override without +/++/~, with its @package if any."""
    key = override.key_or_group
    return f"{key}@{override.package}" if override.package is not None else key


def expand(overrides: list[str], config_sources: Iterable[Mapping] = ()) -> list[list[str]]:
    """The job override lists a basic sweep over ``overrides`` runs, in job order."""
    parser = _parser(config_sources)
    choices: dict[str, list[str]] = {}  # a later override of a key replaces the earlier one
    for override in parser.parse_overrides(list(overrides)):
        if override.is_hydra_override():
            continue
        key = override.get_key_element()
        if override.is_sweep_override():
            if not override.is_discrete_sweep():
                raise ValueError(f"{override.input_line!r}: a {override.value_type.name} sweep "
                                 "has no finite grid")
            choices[key] = [f"{key}={value}" for value in override.sweep_string_iterator()]
        else:
            choices[key] = [f"{key}={override.get_value_element_as_str()}"]
    return [list(job) for job in itertools.product(*choices.values())]


@functools.lru_cache(maxsize=4096)
def _parse_one(override: str) -> tuple[str, Any] | None:
    # Hydra's parser takes about a millisecond per string; a sweep repeats a few
    # strings (trunc=0.5) over all its jobs, so each is parsed once.
    (parsed,) = _parser().parse_overrides([override])
    return None if parsed.is_hydra_override() else (point_key(parsed), parsed.value())


def parse_point(job_overrides: Iterable[str]) -> dict[str, Any]:
    """{key: value} of one job's override strings, values typed as Hydra types them."""
    pairs = [_parse_one(str(o)) for o in job_overrides]
    return {key: copy.deepcopy(value) for key, value in filter(None, pairs)}


def read_multirun(sweep_dir) -> dict:
    path = Path(sweep_dir) / MULTIRUN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; the grid of a sweep comes from the "
                                f"{MULTIRUN_FILE} Hydra writes into its sweep directory")
    # Plain YAML: interpolations such as ${now:...} stay unresolved, which is fine here.
    return yaml.safe_load(path.read_text()) or {}


# Hydra rewrites multirun.yaml at every launch into the same sweep dir; the end of each launch
# keeps a copy as launches/<UTC time>-multirun.yaml (kd_sweeps.callbacks), so the grid of a sweep
# launched in parts is the union of them all.
LAUNCHES_DIR = "launches"
LAUNCH_SUFFIX = "-multirun.yaml"


class GridPoint(dict):
    """One grid point, {override key: value}; ``latest`` is whether the sweep's latest launch
    has it (a point of an earlier launch only is False)."""

    latest: bool = True


def launch_files(sweep_dir) -> list[Path]:
    """The kept multirun.yaml of each launch of the sweep, oldest first (names start with
    their UTC time)."""
    return sorted((Path(sweep_dir) / LAUNCHES_DIR).glob(f"*{LAUNCH_SUFFIX}"))


def _launch_grid(multirun: Mapping) -> list[dict]:
    """The points of one launch's multirun.yaml, in job order."""
    hydra = multirun.get("hydra") or {}
    params = (hydra.get("sweeper") or {}).get("params") or {}
    overrides = [f"{key}={value}" for key, value in params.items()]
    overrides += list((hydra.get("overrides") or {}).get("task") or [])
    sources = (hydra.get("runtime") or {}).get("config_sources") or []
    points = [parse_point(job) for job in expand(overrides, sources)]
    if isinstance(multirun.get("sweep"), str):
        for point in points:
            point.setdefault("sweep", multirun["sweep"])
    return points


def _identity(point: Mapping) -> tuple:
    return tuple(sorted((str(k), repr(_norm(v))) for k, v in point.items()))


def expected_grid(sweep_dir) -> list[GridPoint]:
    """Every grid point of the sweep in sweep_dir, as {override key: value}: the union of the
    grids of its launches (multirun.yaml and each launches/*-multirun.yaml). The latest launch's
    points come first, in its job order (``latest`` True), then those only earlier launches had,
    newest launch first.

    Keys Hydra sets for every job alike (``sweep=demo``) are in every point;
    the sweep's name is added from the config when no override sets it.
    """
    current = Path(sweep_dir) / MULTIRUN_FILE
    files = launch_files(sweep_dir)
    latest = current if current.is_file() or not files else files[-1]
    grids = [_launch_grid(read_multirun(sweep_dir) if latest == current
                          else yaml.safe_load(latest.read_text()) or {})]
    for path in reversed(files):
        if path != latest:
            grids.append(_launch_grid(yaml.safe_load(path.read_text()) or {}))
    seen, points = set(), []
    for launch, grid in enumerate(grids):
        for values in grid:
            if _identity(values) not in seen:
                seen.add(_identity(values))
                point = GridPoint(values)
                point.latest = launch == 0
                points.append(point)
    return points


def latest_launch_runs(df: pd.DataFrame, sweep_dir) -> pd.Series:
    """Per row of df: whether its run stands for a point of the sweep's latest launch (matched as
    grid_status matches: by the overrides in its result.json, else by its columns)."""
    from analysis.load import read_result_records

    grid = expected_grid(sweep_dir)
    varying = varying_keys(grid)
    latest = [point for point in grid if point.latest]
    by_key: dict[tuple, list[GridPoint]] = {}
    for point in latest:
        by_key.setdefault(tuple(repr(_norm(point.get(k))) for k in varying), []).append(point)
    records = {r["run_id"]: r for r in read_result_records(sweep_dir) if r.get("run_id")}
    marks = []
    for row in df.to_dict("records"):
        record = records.get(None if _missing(row.get("run_id")) else row["run_id"])
        values = _record_values(record) if record is not None else None
        values = values if values is not None else frame_values(row)
        known = all(k in values for k in varying)
        candidates = by_key.get(tuple(repr(_norm(values.get(k))) for k in varying), []) \
            if known else latest
        marks.append(any(_matches(p, values, varying) for p in candidates))
    return pd.Series(marks, index=df.index, dtype=bool)


def sweep_dirs(root) -> list[Path]:
    """Directories at or below root holding a multirun.yaml (one per sweep)."""
    root = Path(root)
    found = [root] if (root / MULTIRUN_FILE).is_file() else []
    found += sorted(p.parent for p in root.rglob(f"*/{MULTIRUN_FILE}"))
    unique: dict[Path, Path] = {}  # a sweep reached again through a link (even one that loops) is one
    for folder in found:
        real = folder.resolve()
        if real not in unique or folder.absolute() == real:  # named by its own path where it is reached so
            unique[real] = folder
    return list(unique.values())


def _norm(value: Any) -> Any:
    """Comparable form: numbers as floats (trunc=1 is trunc=1.0), lists as tuples."""
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if hasattr(value, "item") and not isinstance(value, str):  # numpy scalars
        return _norm(value.item())
    if isinstance(value, (list, tuple)):
        return tuple(_norm(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((str(k), _norm(v)) for k, v in value.items()))
    return value


def _missing(value: Any) -> bool:
    return _norm(value) is None


def frame_values(row: Mapping) -> dict[str, Any]:
    """The override values a frame row tells (only keys with a column, see KEY_COLUMNS)."""
    values = {}
    for key, col in KEY_COLUMNS.items():
        if col in row and not _missing(row[col]):
            value = row[col]
            if col == "sections_include":  # kept as 'CoT+A' in the frame
                value = str(value).split("+")
            values[key] = value
    return values


def _observed(df: pd.DataFrame, sweep_dir) -> list[dict]:
    """Every run we know of, with its override values and status.

    A run whose result.json lies in sweep_dir is known by the overrides Hydra
    recorded for it (exact); a run known only through the frame by its columns.
    Where sweep_dir holds result.json files, only their runs count, so another
    launch of the same sweep (another dir, same values) fills none of its points.
    Points that failed before a run id existed are known only from result.json.
    """
    from analysis.load import read_result_records

    records = read_result_records(sweep_dir)
    by_id = {r["run_id"]: r for r in records if r.get("run_id")}
    observed = []
    for row in df.to_dict("records"):
        record = by_id.get(None if _missing(row.get("run_id")) else row["run_id"])
        if records and record is None:
            continue
        values = _record_values(record) if record is not None else None
        observed.append({"values": values if values is not None else frame_values(row),
                         "status": row.get("status"), "run_id": row.get("run_id"),
                         "error": row.get("error")})
    for record in records:
        values = _record_values(record)
        if not record.get("run_id") and values is not None:
            observed.append({"values": values, "status": record.get("status"), "run_id": None,
                             "error": record.get("error")})
    return observed


def _record_values(record: Mapping) -> dict | None:
    overrides = record.get("overrides")
    if not isinstance(overrides, list):
        return None
    try:
        values = parse_point(overrides)
    except Exception as exc:  # Hydra's parse errors have no common base class
        log.warning("run %s: overrides %s not parsable (%s)", record.get("run_id"), overrides, exc)
        return None
    if record.get("sweep"):
        values.setdefault("sweep", record["sweep"])
    return values


def varying_keys(grid: list[dict]) -> list[str]:
    """Keys whose value differs between grid points, in override order."""
    keys = list(dict.fromkeys(k for point in grid for k in point))
    return [k for k in keys if len({repr(_norm(p.get(k))) for p in grid}) > 1]


def _matches(point: Mapping, values: Mapping, varying: list[str]) -> bool:
    known = [k for k in point if k in values]
    if any(_norm(point[k]) != _norm(values[k]) for k in known):
        return False
    # A run that tells none of the swept values cannot be placed in the grid.
    return not varying or any(k in values for k in varying)


def describe(point: Mapping, keys: Iterable[str] | None = None) -> str:
    """'trunc=0.25 sections=cot' for the given keys (all but sweep by default)."""
    keys = [k for k in point if k != "sweep"] if keys is None else list(keys)

    def text(value: Any) -> str:
        if isinstance(value, (list, tuple)):
            return "[" + ",".join(text(v) for v in value) + "]"
        return "null" if value is None else str(value)
    return " ".join(f"{k}={text(point[k])}" for k in keys if k in point)


# Which run stands for a point when several match: a finished one first.
_STATUS_RANK = {"ok": 0, "running": 1, "failed": 2}


GRID_STATUS_COLUMNS = ["sweep_dir", "job", "latest_launch", "point", "status", "run_id", "error"]


def grid_status(df: pd.DataFrame, sweep_dir) -> pd.DataFrame:
    """One row per grid point (expected_grid's order): job (its place in that order: the job
    number for the latest launch's points), latest_launch, point, status (ok | running | failed
    | crashed | missing), run_id and error of the run that stands for it."""
    grid = expected_grid(sweep_dir)
    varying = varying_keys(grid)
    # Runs that tell every swept value are looked up by them; only the others are
    # tried against each point, so a 1,000-point sweep is not a million comparisons.
    by_values: dict[tuple, list[dict]] = {}
    partial = []
    for entry in _observed(df, sweep_dir):
        if all(k in entry["values"] for k in varying):
            key = tuple(repr(_norm(entry["values"][k])) for k in varying)
            by_values.setdefault(key, []).append(entry)
        else:
            partial.append(entry)
    rows = []
    for job, point in enumerate(grid):
        candidates = by_values.get(tuple(repr(_norm(point.get(k))) for k in varying), [])
        matches = [o for o in candidates + partial if _matches(point, o["values"], varying)]
        best = min(matches, key=lambda o: _STATUS_RANK.get(o["status"], 3), default=None)
        rows.append({"sweep_dir": str(sweep_dir), "job": job, "latest_launch": point.latest,
                     "point": describe(point, varying or None),
                     "status": "missing" if best is None else (best["status"] or "unknown"),
                     "run_id": None if best is None or _missing(best["run_id"]) else best["run_id"],
                     "error": None if best is None or _missing(best["error"]) else best["error"]})
    return pd.DataFrame(rows, columns=GRID_STATUS_COLUMNS)


def missing_points(df: pd.DataFrame, sweep_dir) -> list[dict]:
    """Grid points no run in df (nor any result.json in sweep_dir) stands for.

    Failed points are not missing: they have a run, and grid_status lists them.
    """
    grid = expected_grid(sweep_dir)
    status = grid_status(df, sweep_dir)
    return [grid[job] for job in status.loc[status["status"] == "missing", "job"]]
