"""Runs → grid points: one row per (curve, trunc, benchmark) with mean, interval, % retained, cost.

A curve is a sections preset (with any group_by values, see checks.curve_keys);
the runs of one point are its seeds. Tables and the paper figures both read
these rows, so a number in a figure is the number in the table.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from analysis.checks import as_columns, curve_keys, ok_runs, preset_labels
from analysis.stats import FULL_TRUNC, interval, mean_stderr, retained_averages

# The paper's order of the six section presets (kd_sweeps.sections.SECTION_PRESETS;
# not imported, as that module loads torch); other names follow alphabetically.
PRESET_ORDER = ("all", "prompt_cot", "cot", "cot_ans", "ans", "prompt_ans")
COST_COLUMNS = ("train_flops", "train_time_s", "peak_memory_bytes", "tokens_trained",
                "tokens_supervised")
GENERATION_COLUMNS = ("finished_rate", "gen_tokens_mean")  # means over a point's runs
ALL_BENCHMARKS = "accuracy"  # the benchmark name used when runs report no per-benchmark split
# What a grid point's runs share (checks.check_comparable refuses curves where they differ),
# kept on its rows so a table of points names its models and data.
IDENTITY_COLUMNS = ("teacher", "student", "dataset")


def benchmarks(df: pd.DataFrame) -> list[str]:
    """Benchmark names with an acc_<name> column, in column order."""
    return [c[len("acc_"):] for c in df.columns if c.startswith("acc_")]


def metric_columns(bench: str) -> tuple[str, str, str]:
    """(accuracy, stderr, per-problem) columns of one benchmark."""
    if bench == ALL_BENCHMARKS:
        return "accuracy", "accuracy_stderr", "per_problem_accuracy"
    return f"acc_{bench}", f"stderr_{bench}", f"per_problem_{bench}"


def generation_columns(bench: str) -> tuple[str, str]:
    """(finished rate, mean generated tokens per completion) columns of one benchmark."""
    if bench == ALL_BENCHMARKS:
        return "finished_rate", "gen_tokens_mean"
    return f"finished_rate_{bench}", f"gen_tokens_mean_{bench}"


def preset_rank(name) -> tuple[int, str]:
    """Sort key putting the paper's presets first, in the paper's order."""
    name = "" if name is None or name is pd.NA else str(name)
    return (PRESET_ORDER.index(name) if name in PRESET_ORDER else len(PRESET_ORDER), name)


def numeric_column(runs: pd.DataFrame, col: str) -> pd.Series:
    """Column col as numbers, keeping integer columns integer (missing where not a
    number; all NaN if absent)."""
    if col not in runs:
        return pd.Series(math.nan, index=runs.index, dtype=float)
    return pd.to_numeric(runs[col], errors="coerce")


def reference_accuracies(runs: pd.DataFrame) -> list[dict]:
    """The distinct teacher and base-student accuracies the runs report (all rows given: pass
    ok runs), each as {role: 'teacher' | 'base', accuracy, teacher_accuracy, models: {column:
    model name}}; none where the value is unknown (pretrained models, older runs)."""
    def column(name: str) -> pd.Series:
        if name in runs:
            return runs[name].astype(object).where(runs[name].notna(), None)
        return pd.Series(None, index=runs.index, dtype=object)

    teacher_acc = numeric_column(runs, "teacher_accuracy").astype(float)
    base_acc = numeric_column(runs, "base_accuracy").astype(float)
    found = []
    for role, accuracy, columns in (("teacher", teacher_acc, ("teacher",)),
                                    ("base", base_acc, ("student", "teacher"))):
        known = accuracy.notna()
        # The base row repeats per teacher only where teachers differ (its % of teacher does).
        teachers = teacher_acc[known].astype(object).where(teacher_acc[known].notna(), None)
        keys = zip(accuracy[known], teachers, *(column(c)[known] for c in columns))
        for value, teacher, *models in dict.fromkeys(keys):
            found.append({"role": role, "accuracy": value, "teacher_accuracy": teacher,
                          "models": dict(zip(columns, models))})
    return found


def point_interval(runs: pd.DataFrame, column: str, level: float = 0.95, seed: int = 0) -> dict:
    """stats.interval of one grid point's runs of ``column``: an accuracy (``accuracy``,
    ``acc_<bench>``) with its stderr and per-problem columns, bounded to [0, 1]; any other with
    ``<column>_stderr``. Tables and figures both call this, so an error bar is the interval in the table."""
    accuracy = column == "accuracy" or column.startswith("acc_")
    if accuracy:
        _, err_col, problems_col = metric_columns(column[len("acc_"):] if column != "accuracy"
                                                  else ALL_BENCHMARKS)
    else:
        err_col, problems_col = f"{column}_stderr", None
    problems = runs[problems_col].iloc[0] if problems_col in runs and len(runs) == 1 else None
    problems = problems if isinstance(problems, list) else None  # missing: NaN or None
    return interval(numeric_column(runs, column), numeric_column(runs, err_col), problems,
                    level=level, seed=seed, bounds=(0.0, 1.0) if accuracy else None)


def _point_rows(runs: pd.DataFrame, benches: list[str], level: float, seed: int) -> list[dict]:
    """One row per benchmark for the runs (seeds) of one grid point."""
    costs = {col: float(numeric_column(runs, col).mean()) for col in COST_COLUMNS}
    rows = []
    for bench in benches:
        acc_col, err_col, _ = metric_columns(bench)
        values, errs = numeric_column(runs, acc_col), numeric_column(runs, err_col)
        stats = point_interval(runs, acc_col, level, seed)
        if stats["runs"] == 0:
            continue
        # Error bar for plots: spread over seeds, or the single run's own stderr.
        spread = mean_stderr(values)[1] if stats["runs"] > 1 \
            else float(errs.dropna().iloc[0]) if errs.notna().any() else math.nan
        finished, tokens = (float(numeric_column(runs, col).mean())
                            for col in generation_columns(bench))  # NaN for older runs
        rows.append({"benchmark": bench, **stats, "stderr": spread, **costs,
                     "finished_rate": finished, "gen_tokens_mean": tokens})
    return rows


def grid_points(df: pd.DataFrame, group_by=None, level: float = 0.95,
                seed: int = 0) -> pd.DataFrame:
    """Per (curve, trunc, benchmark): runs, mean, stderr, ci_low/ci_high (``level``),
    interval (how it was made), mean cost, mean finished rate and generated tokens per
    completion (GENERATION_COLUMNS), and % retained columns (see add_retained).

    Only ok runs count. Benchmarks are the acc_<name> columns, or the overall
    'accuracy' when there are none.
    """
    ok = ok_runs(df)
    benches = benchmarks(ok) or [ALL_BENCHMARKS]
    extra = as_columns(group_by)
    identity = [col for col in IDENTITY_COLUMNS if col not in extra]
    columns = ["curve", "sections", *extra, "trunc", "benchmark", "runs", "mean", "stderr",
               "ci_low", "ci_high", "interval", *COST_COLUMNS, *GENERATION_COLUMNS,
               *identity, "run_ids", "seeds"]
    if ok.empty:
        return add_retained(pd.DataFrame(columns=columns))
    keys = [curve_keys(ok, extra), numeric_column(ok, "trunc")]
    presets = preset_labels(ok)  # 'custom (P+A)' where one name covers several choices
    rows = []
    for (curve, trunc), runs in ok.groupby(keys, sort=False, dropna=False):
        first = runs.index[0]
        fixed = {"curve": curve, "sections": presets.loc[first], "trunc": trunc,
                 **{col: ok.at[first, col] for col in extra},
                 **{col: ok.at[first, col] if col in ok else None for col in identity},
                 "run_ids": _joined(runs, "run_id"), "seeds": _joined(runs, "seed")}
        rows += [{**fixed, **row} for row in _point_rows(runs, benches, level, seed)]
    points = pd.DataFrame(rows, columns=columns)
    order = sorted(range(len(points)), key=lambda i: (
        preset_rank(points["sections"].iloc[i]), str(points["curve"].iloc[i]),
        points["trunc"].iloc[i], benches.index(points["benchmark"].iloc[i])))
    return add_retained(points.iloc[order].reset_index(drop=True))


def _joined(runs: pd.DataFrame, col: str) -> str | None:
    """A point's distinct values of col as 'a;b' (None where no run has one)."""
    if col not in runs:
        return None
    values = [str(v) for v in dict.fromkeys(runs[col].dropna())]
    return ";".join(values) or None


def add_retained(points: pd.DataFrame) -> pd.DataFrame:
    """Add % retained: each point's mean over the trunc=1.0 mean of its curve.

    ``retained`` is per benchmark; ``retained_mean_of_ratios`` and
    ``retained_ratio_of_means`` average it over the benchmarks of each
    (curve, trunc) in the two ways stats.retained_averages describes. Means
    are over seeds first, so the ratio is of seed means. NaN without a
    trunc=1.0 point.
    """
    points = points.copy()
    for col in ("retained", "retained_mean_of_ratios", "retained_ratio_of_means"):
        points[col] = pd.Series(math.nan, index=points.index, dtype=float)
    if points.empty:
        return points
    trunc = points["trunc"].astype(float).to_numpy()
    full = points[np.isclose(trunc, FULL_TRUNC)]
    reference = {(c, b): m for c, b, m in zip(full["curve"], full["benchmark"], full["mean"])}
    ref = np.array([reference.get((c, b), math.nan)
                    for c, b in zip(points["curve"], points["benchmark"])], dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = points["mean"].to_numpy(dtype=float) / ref
    points["retained"] = np.where(ref == 0, math.nan, ratio)
    for (curve, _), rows in points.groupby(["curve", "trunc"], sort=False):
        acc = dict(zip(rows["benchmark"], rows["mean"]))
        refs = {b: reference[(curve, b)] for b in acc if (curve, b) in reference}
        points.loc[rows.index, "retained_mean_of_ratios"], \
            points.loc[rows.index, "retained_ratio_of_means"] = retained_averages(acc, refs)
    return points
