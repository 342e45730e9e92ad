"""Summary table of a sweep, as a DataFrame, Markdown or CSV."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from analysis.aggregate import grid_points, numeric_column
from analysis.checks import as_columns, ok_runs
from analysis.stats import retained

MIB = 2**20
ACCURACY = "accuracy ± stderr (%)"
RETAINED = "% of trunc=1.0 accuracy retained"
# Settings that, when they differ between runs, must be shown or rows would look identical.
_VARYING = ("teacher", "student", "dataset", "truncation_mode", "cut_after_think", "loss",
            "kd_ratio", "temperature", "seed")


def _accuracy_text(acc: Any, err: Any) -> str | None:
    if pd.isna(acc):
        return None
    if pd.isna(err):
        return f"{100 * acc:.1f}"
    return f"{100 * acc:.1f} ± {100 * err:.1f}"


def summary_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per ok run (grid point), sorted by (sections, trunc).

    Numbers stay numeric (rounded for display) so the CSV stays usable; only
    the accuracy column is text, because it pairs value and error.
    """
    ok = ok_runs(df).copy()
    has_metric = {"accuracy", "trunc"} <= set(ok.columns)
    ok["_retained"] = retained(ok) if has_metric else math.nan
    keys = [c for c in ("sections", "trunc", "seed", "run_id") if c in ok]
    ok = ok.sort_values(keys, na_position="last", kind="stable")

    table = pd.DataFrame(index=ok.index)
    table["trunc"] = numeric_column(ok, "trunc")
    table["sections"] = ok["sections"] if "sections" in ok else None
    if "sections_include" in ok and "sections" in ok:
        # One preset name (e.g. 'custom') may stand for several section combinations.
        per_name = ok.groupby(ok["sections"].astype(object).fillna(""))["sections_include"]
        if (per_name.nunique(dropna=False) > 1).any():
            table["sections_include"] = ok["sections_include"]
    for col in _VARYING:
        if col in ok and ok[col].astype(object).nunique(dropna=False) > 1:
            table[col] = ok[col]
    table["train FLOPs"] = numeric_column(ok, "train_flops")
    table["train time (s)"] = numeric_column(ok, "train_time_s").round(1)
    memory = numeric_column(ok, "peak_memory_bytes").astype(float)
    table["peak memory (MiB)"] = (memory / MIB).round(1)
    table["tokens trained"] = numeric_column(ok, "tokens_trained")
    table["tokens supervised"] = numeric_column(ok, "tokens_supervised")
    acc, err = numeric_column(ok, "accuracy"), numeric_column(ok, "accuracy_stderr")
    table[ACCURACY] = pd.Series([_accuracy_text(a, e) for a, e in zip(acc, err)],
                                index=ok.index, dtype=object)
    table[RETAINED] = (100 * ok["_retained"]).round(1)
    return table.reset_index(drop=True)


def _percent(values: pd.Series) -> pd.Series:
    return (100 * pd.to_numeric(values, errors="coerce").astype(float)).round(1)


def paper_table(df: pd.DataFrame, group_by=None, level: float = 0.95,
                seed: int = 0) -> pd.DataFrame:
    """Accuracy per (sections, trunc, benchmark) over the seeds of each grid point.

    The interval is a seeded bootstrap over runs (or problems) where there are
    several, else the normal interval from the evaluation's stderr; the
    ``interval`` column says which. % retained is per benchmark, and averaged
    over benchmarks both ways (the column names say which). Costs are means
    over the point's runs and repeat on its benchmark rows.
    """
    points = grid_points(df, group_by, level=level, seed=seed)
    pct = f"{level:.0%}"
    table = pd.DataFrame({"sections": points["sections"].astype(object)})
    for col in as_columns(group_by):
        table[col] = points[col]
    table["trunc"] = pd.to_numeric(points["trunc"], errors="coerce").astype(float)
    table["benchmark"] = points["benchmark"].astype(object)
    table["runs"] = points["runs"].astype("Int64")
    table["accuracy (%)"] = _percent(points["mean"])
    table[f"{pct} CI low (%)"] = _percent(points["ci_low"])
    table[f"{pct} CI high (%)"] = _percent(points["ci_high"])
    table["interval"] = points["interval"].astype(object)
    table["% retained (this benchmark)"] = _percent(points["retained"])
    table["% retained, mean of ratios over benchmarks"] = _percent(
        points["retained_mean_of_ratios"])
    table["% retained, ratio of means over benchmarks"] = _percent(
        points["retained_ratio_of_means"])
    table["train FLOPs"] = points["train_flops"].astype(float)
    table["train time (s)"] = points["train_time_s"].astype(float).round(1)
    table["peak memory (MiB)"] = (points["peak_memory_bytes"].astype(float) / MIB).round(1)
    for col in ("tokens_trained", "tokens_supervised"):  # means over seeds, whole tokens
        table[col.replace("_", " ")] = points[col].astype(float).round().astype("Int64")
    return table.reset_index(drop=True)


def _cell(value: Any) -> str:
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        # Big counts such as FLOPs read better in scientific notation.
        if abs(value) >= 1e6:
            return f"{value:.3g}"
        text = f"{value:.6g}"
        return text if any(c in text for c in ".en") else text + ".0"  # 1.0 stays a float
    # A pipe would end the cell early.
    return str(value).replace("|", "\\|").replace("\n", " ")


def to_markdown(table: pd.DataFrame) -> str:
    """GitHub-style Markdown table; numbers right-aligned, text left-aligned."""
    headers = [_cell(str(c)) for c in table.columns]
    rows = [[_cell(v.item() if hasattr(v, "item") else v) for v in row]
            for row in table.itertuples(index=False, name=None)]
    numeric = [pd.api.types.is_numeric_dtype(table[c]) and not pd.api.types.is_bool_dtype(table[c])
               for c in table.columns]
    widths = [max([len(h), 3] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        padded = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(cells, widths, numeric)]
        return "| " + " | ".join(padded) + " |"

    rule = "| " + " | ".join("-" * (w - 1) + ":" if num else "-" * w
                             for w, num in zip(widths, numeric)) + " |"
    return "\n".join([line(headers), rule] + [line(r) for r in rows]) + "\n"


def write_csv(table: pd.DataFrame, path) -> Path:
    """Write table as CSV (no index); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(path, index=False)
    return path


def write_markdown(table: pd.DataFrame, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_markdown(table))
    return path
