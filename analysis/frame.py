"""Sweep runs as one tidy, typed DataFrame (one row per run): the columns, their types and checks.

Records shaped like ``result.json`` (a point's own file, an offline W&B run, an online W&B run:
``analysis.load`` and ``analysis.online`` make them) go through ``runs_frame``, so the same runs give
equal frames whichever source is read.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any, Iterable, Mapping

import pandas as pd

log = logging.getLogger(__name__)

# Nullable pandas dtypes, so a missing value never changes a column's type
# (a plain int column would silently become float at the first gap).
COLUMNS: dict[str, str] = {
    "sweep": "string",
    "run_id": "string",
    "status": "string",
    "error": "string",
    "sections": "string",
    "sections_include": "string",
    "trunc": "float64",
    "truncation_mode": "string",
    "cut_after_think": "boolean",
    "loss": "string",
    "kd_ratio": "float64",
    "temperature": "float64",
    "teacher": "string",
    "student": "string",
    "dataset": "string",
    "seed": "Int64",
    # FLOPs overflow int64 for large models, so they stay floats.
    "train_flops": "float64",
    "train_flops_student": "float64",
    "train_flops_teacher": "float64",
    "train_time_s": "float64",
    "peak_memory_bytes": "Int64",
    "tokens_trained": "Int64",
    "tokens_supervised": "Int64",
    "tokens_padded": "Int64",
    "examples_skipped": "Int64",
    "accuracy": "float64",
    "accuracy_stderr": "float64",
    # Generation over all benchmarks: share of completions that stopped on their own before
    # eval.max_new_tokens, and generated tokens per completion (NaN for runs that predate them).
    "finished_rate": "float64",
    "gen_tokens_mean": "float64",
    # References for the run's accuracy: the embedded teacher's and the base student's held-out
    # accuracy before KD (None for pretrained models, which are not evaluated before KD).
    "teacher_accuracy": "float64",
    "base_accuracy": "float64",
    "max_new_tokens": "Int64",  # eval.max_new_tokens: the limit a completion that never stops hits
    # Where the supervised sequences came from (distill.mode: offline | sequence | on_policy) and what
    # generating them cost (kd_sweeps/distill.py): the student's on-policy rollouts (FLOPs, tokens),
    # the teacher's cached sequences (their full cost, once, on every point that trains on them), and
    # total_flops = train_flops + both, the cost to compare modes at. NaN for runs that predate them.
    "distill_mode": "string",
    "generation_flops": "float64",
    "generated_tokens": "Int64",
    "sequence_generation_flops": "float64",
    "total_flops": "float64",
    # Every config key that can change a result (analysis.checks.result_keys), as JSON: runs of one
    # curve must agree on all of them (checks.check_comparable).
    "settings": "string",
}

# Column prefix and dtype for each per-benchmark summary key eval/<bench>/<metric>.
BENCHMARK_METRICS: dict[str, tuple[str, str]] = {
    "accuracy": ("acc", "float64"),
    "stderr": ("stderr", "float64"),
    "n": ("n", "Int64"),
    "generated_tokens": ("gen_tokens", "Int64"),
}
# Recorded by some evaluations only; a column appears only where a run has it,
# so frames of runs without it keep exactly the columns above.
OPTIONAL_BENCHMARK_METRICS: dict[str, tuple[str, str]] = {
    "per_problem": ("per_problem", "object"),  # list of per-problem scores, for bootstraps
    "finished_rate": ("finished_rate", "float64"),  # completions that ended with a stop token
    "gen_tokens_mean": ("gen_tokens_mean", "float64"),  # generated tokens per completion
    "gen_tokens_max": ("gen_tokens_max", "Int64"),
}
_ALL_METRICS = {**BENCHMARK_METRICS, **OPTIONAL_BENCHMARK_METRICS}

# Where each config-derived column lives in the resolved config.
_CONFIG_PATHS: dict[str, tuple[str, ...]] = {
    "trunc": ("trunc",),
    "truncation_mode": ("truncation", "mode"),
    "cut_after_think": ("truncation", "cut_after_think"),
    "loss": ("loss", "name"),
    "kd_ratio": ("loss", "kd_ratio"),
    "temperature": ("loss", "temperature"),
    "teacher": ("model", "teacher", "name_or_path"),
    "student": ("model", "student", "name_or_path"),
    "dataset": ("data", "name"),
    "seed": ("seed",),
    "max_new_tokens": ("eval", "max_new_tokens"),
    "distill_mode": ("distill", "mode"),
}
_SUMMARY_COLUMNS = [c for c in COLUMNS if c.startswith(("train_", "peak_", "tokens_", "examples_"))]
_SUMMARY_COLUMNS += ["accuracy", "accuracy_stderr", "finished_rate", "gen_tokens_mean",
                     "teacher_accuracy", "base_accuracy", "generation_flops", "generated_tokens",
                     "sequence_generation_flops", "total_flops"]

# W&B run states mapped onto result.json statuses; others (crashed, running) are kept.
_WANDB_STATUS = {"finished": "ok", "failed": "failed"}



def _get(tree: Mapping | None, path: tuple[str, ...]) -> Any:
    """Value at a key path of a nested dict; also accepts a dotted flat key."""
    if not isinstance(tree, Mapping):
        return None
    dotted = ".".join(path)
    if dotted in tree:  # configs flattened by some loggers
        return tree[dotted]
    node: Any = tree
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    return node


def _flatten(tree: Mapping | None, prefix: str = "") -> dict[str, Any]:
    """Nested summary dicts to '/'-joined keys: W&B may nest what result.json keeps flat."""
    flat: dict[str, Any] = {}
    if not isinstance(tree, Mapping):
        return flat
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, name + "/"))
        else:
            flat[name] = value
    return flat


def _sections(config: Mapping | None) -> tuple[Any, Any]:
    """(preset name, 'CoT+A'-style include string) from the sections config."""
    node = _get(config, ("sections",))
    if isinstance(node, str):  # a bare preset name
        return node, None
    include = _get(config, ("sections", "include"))
    if isinstance(include, (list, tuple)):
        include = "+".join(str(part) for part in include)
    return _get(config, ("sections", "name")), include


# Summary values that must be numbers in [0, 1] (shares) or ≥ 0 (costs, counts); others are not checked.
_SHARES = ("accuracy", "accuracy_stderr", "teacher_accuracy", "base_accuracy", "finished_rate")
_SHARE_METRICS = ("accuracy", "stderr", "finished_rate")


def _invalid(key: str, value: Any) -> str | None:
    """Why a summary value cannot be used (None: it can, or it is not one that is checked)."""
    parts = key.split("/")
    metric = parts[-1] if len(parts) >= 3 and parts[0] == "eval" else None
    share = key in _SHARES or metric in _SHARE_METRICS
    cost = key in _SUMMARY_COLUMNS or (metric in _ALL_METRICS and metric != "per_problem")
    if not (share or cost) or value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"{value!r} is not a number"
    if not math.isfinite(value):
        return f"{value!r} is not finite"
    if share and not 0.0 <= value <= 1.0:
        return f"{value!r} is outside [0, 1]"
    if value < 0:
        return f"{value!r} is negative"
    return None


def _checked_summary(record: Mapping) -> dict[str, Any]:
    """The flat summary with unusable values left out, each named in a warning with its run."""
    summary = _flatten(record.get("summary"))
    run = f"run {record.get('run_id') or '?'} (sweep {record.get('sweep') or '?'})"
    if record.get("status") == "ok" and not summary:
        log.warning("%s: status ok but no summary; it has no numbers to show", run)
    for key, value in list(summary.items()):
        why = _invalid(key, value)
        if why:
            log.warning("%s: summary %s=%s; left out", run, key, why)
            summary[key] = None
    return summary


def _row(record: Mapping) -> dict[str, Any]:
    from analysis.checks import settings_json

    config = record.get("config") or {}
    summary = _checked_summary(record)
    row: dict[str, Any] = {
        "sweep": record.get("sweep"),
        "run_id": record.get("run_id"),
        "status": record.get("status"),
        "error": record.get("error"),
    }
    row["sections"], row["sections_include"] = _sections(config)
    row.update({col: _get(config, path) for col, path in _CONFIG_PATHS.items()})
    row["settings"] = settings_json(config)
    row.update({col: summary.get(col) for col in _SUMMARY_COLUMNS})
    if row["distill_mode"] is None:  # a config flattened without it: the summary records it too
        row["distill_mode"] = summary.get("distill_mode")
    for bench, metric, value in _benchmark_items(summary):
        row[f"{_ALL_METRICS[metric][0]}_{bench}"] = value
    return row


def _benchmark_items(summary: Mapping) -> Iterable[tuple[str, str, Any]]:
    """(benchmark, metric, value) for each eval/<benchmark>/<metric> summary key."""
    for key, value in summary.items():
        parts = key.split("/")
        if len(parts) >= 3 and parts[0] == "eval" and parts[-1] in _ALL_METRICS:
            yield "/".join(parts[1:-1]), parts[-1], value


def _clean(value: Any, dtype: str) -> Any:
    """Bring one raw JSON value to something the column dtype accepts, else None."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    try:
        if dtype == "object":  # a list of scores
            return [float(v) for v in value] if isinstance(value, (list, tuple)) else None
        if dtype == "string":
            return value if isinstance(value, str) else json.dumps(value)
        if dtype == "boolean":
            if isinstance(value, str):
                return {"true": True, "false": False}.get(value.strip().lower())
            return bool(value)
        if dtype == "Int64":
            number = float(value)
            fits = number.is_integer() and abs(number) < 2**63
            return int(number) if fits else None
        return float(value)
    except (TypeError, ValueError, OverflowError):
        return None  # a malformed value is missing data, not a reason to fail


def runs_frame(records: list[dict]) -> pd.DataFrame:
    """One typed row per run record (result.json shape), sorted by (sweep, run_id)."""
    rows = [_row(record) for record in records]
    seen = {(bench, metric) for record in records
            for bench, metric, _ in _benchmark_items(_flatten(record.get("summary")))}
    # Every benchmark gets all four columns, grouped per benchmark, in name order;
    # optional metrics follow its four where some run recorded them.
    dtypes = dict(COLUMNS)
    for bench in sorted({bench for bench, _ in seen}):
        dtypes.update({f"{prefix}_{bench}": dtype for prefix, dtype in BENCHMARK_METRICS.values()})
        dtypes.update({f"{prefix}_{bench}": dtype
                       for metric, (prefix, dtype) in OPTIONAL_BENCHMARK_METRICS.items()
                       if (bench, metric) in seen})
    data = {col: pd.Series([_clean(row.get(col), dtype) for row in rows], dtype=dtype)
            for col, dtype in dtypes.items()}
    frame = pd.DataFrame(data, columns=list(dtypes))
    if not frame.empty:
        frame = frame.sort_values(["sweep", "run_id"], na_position="last", kind="stable")
    return frame.reset_index(drop=True)


def wandb_status(state: str | None) -> str | None:
    """A W&B run state as a result.json status (finished -> ok, failed -> failed)."""
    return _WANDB_STATUS.get(state, state)
