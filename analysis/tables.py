"""Summary table of a sweep, as a DataFrame, Markdown or CSV."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from analysis.aggregate import grid_points, numeric_column, reference_accuracies
from analysis.checks import as_columns, ok_runs
from analysis.stats import retained

MIB = 2**20
ACCURACY = "accuracy ± stderr (%)"
RETAINED = "% of trunc=1.0 accuracy retained"
OF_TEACHER = "% of teacher accuracy"
FINISHED = "finished (%)"  # completions that ended with a stop token before eval.max_new_tokens
GEN_TOKENS = "gen tokens (mean)"  # generated tokens per completion, over benchmarks
# Below this share of completions ending with a stop token, a point mostly ran to eval.max_new_tokens
# (a student that did not learn to stop): unfinished_note names it under the table.
UNFINISHED_NOTE_BELOW = 0.5
REFERENCE_ROWS = {"teacher": "teacher (reference)", "base": "base student before KD (reference)"}
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
    """One row per ok run (grid point), sorted by (sections, trunc), then one reference row
    each for the teacher's and the base student's accuracy where the runs know them.

    Numbers stay numeric (rounded for display) so the CSV stays usable; only
    the accuracy column is text, because it pairs value and error. Runs that
    predate a column (finished rate, generated tokens, references) get NaN.
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
    teacher = numeric_column(ok, "teacher_accuracy").astype(float)
    table[OF_TEACHER] = (100 * acc.astype(float) / teacher.where(teacher > 0)).round(1)
    table[FINISHED] = _percent(numeric_column(ok, "finished_rate"))
    table[GEN_TOKENS] = numeric_column(ok, "gen_tokens_mean").astype(float).round(1)
    return add_reference_rows(table.reset_index(drop=True), ok)


def add_reference_rows(table: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """table with a row per reference accuracy appended: accuracy and % of teacher filled, the
    models named where the table shows their column; every other cell empty (dtypes kept)."""
    references = reference_accuracies(runs)
    if not references:
        return table
    first = len(table)
    table = table.reindex(range(first + len(references)))  # new rows: NaN / <NA>
    for row, ref in enumerate(references, start=first):
        table.at[row, "sections"] = REFERENCE_ROWS[ref["role"]]
        for col, model in ref["models"].items():
            if col in table:
                table.at[row, col] = model
        table.at[row, ACCURACY] = _accuracy_text(ref["accuracy"], math.nan)
        if ref["teacher_accuracy"] is not None and ref["teacher_accuracy"] > 0:
            table.at[row, OF_TEACHER] = round(100 * ref["accuracy"] / ref["teacher_accuracy"], 1)
    return table


def unfinished_note(df: pd.DataFrame) -> str:
    """A line naming the ok runs most of whose completions hit eval.max_new_tokens ('' if none)."""
    ok = ok_runs(df)
    rate = numeric_column(ok, "finished_rate")
    low = ok[(rate < UNFINISHED_NOTE_BELOW).to_numpy()]
    if low.empty:
        return ""
    low = low.sort_values(["sections", "trunc"], na_position="last", kind="stable")  # table order
    tokens = numeric_column(low, "gen_tokens_mean")
    points = [f"trunc={t:g} sections={s} ({100 * r:.0f}% finished, {n:.0f} tokens per completion)"
              for t, s, r, n in zip(low["trunc"], low["sections"], rate[low.index], tokens)]
    return (f"\nfewer than {UNFINISHED_NOTE_BELOW:.0%} of completions stopped before "
            "eval.max_new_tokens at: " + "; ".join(points) + "\n")


def _percent(values: pd.Series) -> pd.Series:
    return (100 * pd.to_numeric(values, errors="coerce").astype(float)).round(1)


def paper_table(df: pd.DataFrame, group_by=None, level: float = 0.95,
                seed: int = 0) -> pd.DataFrame:
    """Accuracy per (sections, trunc, benchmark) over the seeds of each grid point.

    The interval is a seeded bootstrap over runs (or problems) where there are
    several, else the normal interval from the evaluation's stderr; the
    ``interval`` column says which. % retained is per benchmark, and averaged
    over benchmarks both ways (the column names say which). Costs are means
    over the point's runs and repeat on its benchmark rows; finished (%) and
    generated tokens are the benchmark's own.
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
    # This benchmark's generation (NaN for runs that predate it), means over seeds.
    table[FINISHED] = _percent(points["finished_rate"])
    table[GEN_TOKENS] = points["gen_tokens_mean"].astype(float).round(1)
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
