"""Summary table of a sweep, as a DataFrame, Markdown or CSV."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from analysis.aggregate import (benchmarks, grid_points, numeric_column, point_interval,
                                reference_accuracies)
from analysis.checks import as_columns, ok_runs
from analysis.stats import retained

MIB = 2**20
ACCURACY = "accuracy ± stderr (%)"
RETAINED = "% of trunc=1.0 accuracy retained"
OF_TEACHER = "% of teacher accuracy"
FINISHED = "finished (%)"  # completions that ended with a stop token before eval.max_new_tokens
GEN_TOKENS = "gen tokens (mean)"  # generated tokens per completion, over benchmarks
GEN_FLOPS = "gen FLOPs"  # generating the training sequences: on-policy rollouts, teacher sequences
# Below this share of completions ending with a stop token, a point mostly ran to eval.max_new_tokens
# (a student that did not learn to stop): unfinished_note names it under the table.
UNFINISHED_NOTE_BELOW = 0.5
REFERENCE_ROWS = {"teacher": "teacher (reference)", "base": "base student before KD (reference)"}
LATEST = "latest launch"  # Markdown column marking the points of the sweep's latest launch
LEVEL = 0.95  # confidence level of the CSV intervals, the same the figures draw
# The CSV's `role` per row: a grid point's run, or a reference accuracy (see add_reference_rows).
ROLES = {"teacher": "teacher", "base": "base_student"}
# Config columns every CSV row carries (identifiers and settings), in this order.
CSV_SETTINGS = ("sweep", "run_id", "seed", "sections", "sections_include", "trunc",
                "truncation_mode", "cut_after_think", "loss", "kd_ratio", "temperature",
                "teacher", "student", "dataset", "distill_mode")
# Settings that, when they differ between runs, must be shown or rows would look identical.
_VARYING = ("teacher", "student", "dataset", "distill_mode", "truncation_mode", "cut_after_think",
            "loss", "kd_ratio", "temperature", "seed")


def _accuracy_text(acc: Any, err: Any) -> str | None:
    if pd.isna(acc):
        return None
    if pd.isna(err):
        return f"{100 * acc:.1f}"
    return f"{100 * acc:.1f} ± {100 * err:.1f}"


def generation_flops(runs: pd.DataFrame) -> pd.Series:
    """FLOPs each run spent generating what it trained on: the student's on-policy rollouts plus the
    teacher's sequences (their full cost, kd_sweeps/distill.py); 0 for a run that records its
    total_flops but neither (offline), NaN for runs that predate them."""
    rollouts = numeric_column(runs, "generation_flops").astype(float)
    sequences = numeric_column(runs, "sequence_generation_flops").astype(float)
    known = rollouts.notna() | sequences.notna() | numeric_column(runs, "total_flops").notna()
    return (rollouts.fillna(0) + sequences.fillna(0)).where(known)


def summary_table(df: pd.DataFrame, latest: pd.Series | None = None) -> pd.DataFrame:
    """One row per ok run (grid point), sorted by (sections, trunc), then one reference row
    each for the teacher's and the base student's accuracy where the runs know them.

    For reading: numbers are rounded for display and the accuracy column is text, because it
    pairs value and error (summary_frame is the same rows for machines, what summary.csv holds). Runs that
    predate a column (finished rate, generated tokens, references) get NaN. With ``latest`` (a
    boolean per row of df), a first column marks the runs of the sweep's latest launch with ✓.
    """
    ok = ok_runs(df).copy()
    has_metric = {"accuracy", "trunc"} <= set(ok.columns)
    ok["_retained"] = retained(ok) if has_metric else math.nan
    keys = [c for c in ("sections", "trunc", "seed", "run_id") if c in ok]
    ok = ok.sort_values(keys, na_position="last", kind="stable")

    table = pd.DataFrame(index=ok.index)
    if latest is not None:
        table[LATEST] = pd.Series(latest.reindex(ok.index).eq(True), index=ok.index).map(
            {True: "✓", False: ""})
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
    generated = generation_flops(ok)
    if (generated > 0).any():  # a sweep with on-policy or sequence-level KD in it
        table[GEN_FLOPS] = generated
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
    # the other keys the runs differ in (a mode, a loss) tell apart points of the same trunc and sections
    varying = [c for c in ("distill_mode", "truncation_mode", "loss") if c in ok and ok[c].nunique() > 1]
    points = [f"trunc={t:g} sections={s}{''.join(f' {c}={row[c]}' for c in varying)} "
              f"({100 * r:.0f}% finished, {n:.0f} tokens per completion)"
              for (_, row), t, s, r, n in zip(low.iterrows(), low["trunc"], low["sections"], rate[low.index], tokens)]
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


def _pct(values) -> pd.Series:
    """Shares as percent, rounded to 4 decimals (float noise such as 55.00000000000001 out)."""
    return (100 * pd.to_numeric(pd.Series(values), errors="coerce").astype(float)).round(4)


def _csv_settings(runs: pd.DataFrame) -> pd.DataFrame:
    out = pd.DataFrame(index=runs.index)
    for col in CSV_SETTINGS:
        out[col] = runs[col] if col in runs else pd.Series(None, index=runs.index, dtype=object)
    return out


def summary_frame(df: pd.DataFrame, latest: pd.Series | None = None) -> pd.DataFrame:
    """The summary as a machine-readable frame (what summary.csv holds): one row per ok run in
    summary_table's order, then the reference rows; snake_case headers with their unit in the
    name, every value numeric but identifiers and ``accuracy_interval`` (how the 95 % interval
    was made: stats.interval, as the figures draw it). ``role`` is grid_point, teacher or
    base_student; ``latest_launch`` (with ``latest``) marks the runs of the sweep's last launch.
    """
    ok = ok_runs(df).copy()
    ok["_retained"] = retained(ok) if {"accuracy", "trunc"} <= set(ok.columns) else math.nan
    keys = [c for c in ("sections", "trunc", "seed", "run_id") if c in ok]
    ok = ok.sort_values(keys, na_position="last", kind="stable")
    out = _csv_settings(ok)
    out.insert(0, "role", "grid_point")
    out["train_flops"] = numeric_column(ok, "train_flops").astype(float)
    # Generation (distill.mode on_policy: the student's rollouts; sequence: the teacher's sequences,
    # their full cost) and the point's total (training + both); 0 where a run generated nothing.
    known = numeric_column(ok, "total_flops").notna()
    for col in ("generation_flops", "sequence_generation_flops"):
        values = numeric_column(ok, col).astype(float)
        out[col] = values.where(values.notna() | ~known, 0.0)
    out["total_flops"] = numeric_column(ok, "total_flops").astype(float)
    out["train_time_s"] = numeric_column(ok, "train_time_s").astype(float)
    out["peak_memory_mib"] = (numeric_column(ok, "peak_memory_bytes").astype(float) / MIB).round(3)
    for col in ("tokens_trained", "tokens_supervised"):
        out[col] = numeric_column(ok, col)
    intervals = [point_interval(ok.loc[[i]], "accuracy", LEVEL) for i in ok.index]
    acc = numeric_column(ok, "accuracy").astype(float)
    out["accuracy_pct"] = _pct(acc).to_numpy()
    out["accuracy_stderr_pct"] = _pct(numeric_column(ok, "accuracy_stderr")).to_numpy()
    out["accuracy_ci_low_pct"] = _pct([i["ci_low"] for i in intervals]).to_numpy()
    out["accuracy_ci_high_pct"] = _pct([i["ci_high"] for i in intervals]).to_numpy()
    out["accuracy_interval"] = [None if i["interval"] == "none" else i["interval"]
                                for i in intervals]
    for bench in benchmarks(ok):
        out[f"acc_{bench}_pct"] = _pct(numeric_column(ok, f"acc_{bench}")).to_numpy()
        out[f"n_{bench}"] = numeric_column(ok, f"n_{bench}")
    out["retained_pct"] = _pct(ok["_retained"]).to_numpy()
    teacher = numeric_column(ok, "teacher_accuracy").astype(float)
    out["pct_of_teacher"] = (100 * acc / teacher.where(teacher > 0)).round(4)
    out["teacher_accuracy_pct"] = _pct(teacher).to_numpy()
    out["base_accuracy_pct"] = _pct(numeric_column(ok, "base_accuracy")).to_numpy()
    out["finished_pct"] = _pct(numeric_column(ok, "finished_rate")).to_numpy()
    out["gen_tokens_mean"] = numeric_column(ok, "gen_tokens_mean").astype(float)
    if latest is not None:
        out["latest_launch"] = pd.Series(latest.reindex(ok.index).eq(True), dtype="boolean")
    return _with_reference_frame_rows(out.reset_index(drop=True), ok)


def _with_reference_frame_rows(frame: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """frame with one row per reference accuracy: role, models, accuracy and % of teacher; the
    rest empty (dtypes kept)."""
    references = reference_accuracies(runs)
    first = len(frame)
    frame = frame.reindex(range(first + len(references)))
    for row, ref in enumerate(references, start=first):
        frame.at[row, "role"] = ROLES[ref["role"]]
        for col, model in ref["models"].items():
            if col in frame:
                frame.at[row, col] = model
        frame.at[row, "accuracy_pct"] = round(100 * ref["accuracy"], 4)
        teacher = ref["teacher_accuracy"]
        if "pct_of_teacher" in frame and teacher is not None and teacher > 0:
            frame.at[row, "pct_of_teacher"] = round(100 * ref["accuracy"] / teacher, 4)
    return frame


def paper_frame(df: pd.DataFrame, group_by=None, level: float = LEVEL,
                seed: int = 0) -> pd.DataFrame:
    """paper_table as a machine-readable frame (what accuracy.csv holds): one row per (curve,
    trunc, benchmark) with snake_case headers, units in the names, numbers unrounded but for
    float noise; ``run_ids`` and ``seeds`` list a point's runs ('a;b'); then reference rows
    (``role`` teacher / base_student) as in summary_frame."""
    points = grid_points(df, group_by, level=level, seed=seed)
    out = pd.DataFrame({"role": "grid_point", "sections": points["sections"].astype(object)})
    for col in as_columns(group_by):
        out[col] = points[col]
    out["trunc"] = pd.to_numeric(points["trunc"], errors="coerce").astype(float)
    out["benchmark"] = points["benchmark"].astype(object)
    for col in ("teacher", "student", "dataset", "run_ids", "seeds"):
        if col not in out:
            out[col] = points[col].astype(object)
    out["runs"] = points["runs"].astype("Int64")
    out["accuracy_pct"] = _pct(points["mean"])
    out["accuracy_stderr_pct"] = _pct(points["stderr"])
    out["accuracy_ci_low_pct"] = _pct(points["ci_low"])
    out["accuracy_ci_high_pct"] = _pct(points["ci_high"])
    out["accuracy_interval"] = points["interval"].astype(object)
    for col in ("retained", "retained_mean_of_ratios", "retained_ratio_of_means"):
        out[f"{col}_pct"] = _pct(points[col])
    out["train_flops"] = points["train_flops"].astype(float)
    out["train_time_s"] = points["train_time_s"].astype(float)
    out["peak_memory_mib"] = (points["peak_memory_bytes"].astype(float) / MIB).round(3)
    for col in ("tokens_trained", "tokens_supervised"):  # means over seeds
        out[col] = points[col].astype(float)
    out["finished_pct"] = _pct(points["finished_rate"])
    out["gen_tokens_mean"] = points["gen_tokens_mean"].astype(float)
    return _with_reference_frame_rows(out.reset_index(drop=True), ok_runs(df))


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
