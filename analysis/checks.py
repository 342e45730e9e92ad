"""Which runs form a curve, and the refusal to draw one through runs that are not comparable.

A curve (one sections preset, or one preset per value of the group_by columns)
stands for one setting varied along trunc; runs that also differ in the
teacher, the student, the data or the loss would be averaged into the same
points and the curve would describe none of them.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import pandas as pd

# What must be equal within a curve. The first four change what the student
# learns from; the rest change the objective or which tokens it sees, so a
# point averaging over them is as meaningless.
COMPARABLE = ("teacher", "student", "dataset", "loss", "kd_ratio", "temperature",
              "truncation_mode", "cut_after_think")


def ok_runs(df: pd.DataFrame) -> pd.DataFrame:
    """The runs that finished (status ok); the only ones figures and tables draw on."""
    status = df["status"] if "status" in df else pd.Series("ok", index=df.index)
    return df[(status == "ok").fillna(False).to_numpy()]


def as_columns(group_by: str | Iterable[str] | None) -> list[str]:
    """group_by as a list of column names (None -> [], 'a' -> ['a'])."""
    if group_by is None:
        return []
    if isinstance(group_by, str):
        return [group_by]
    return list(group_by)


def preset_labels(df: pd.DataFrame) -> pd.Series:
    """Sections preset name per row, with the included sections appended where one
    name covers several combinations (the 'custom' preset), so lines stay apart."""
    names = df["sections"].astype(object).where(df["sections"].notna(), "unknown") \
        if "sections" in df else pd.Series("unknown", index=df.index, dtype=object)
    if "sections_include" not in df:
        return names
    include = df["sections_include"].astype(object)
    ambiguous = include.groupby(names).transform(lambda s: s.nunique(dropna=False) > 1)
    return names.where(~ambiguous.astype(bool), names + " (" + include.fillna("?") + ")")


def curve_keys(df: pd.DataFrame, group_by: str | Iterable[str] | None = None) -> pd.Series:
    """The curve each row belongs to: its sections preset, then each group_by value."""
    labels = preset_labels(df).astype(str)
    for col in as_columns(group_by):
        if col not in df.columns:
            raise ValueError(f"group_by column {col!r} is not in the runs frame; "
                             f"columns: {', '.join(map(str, df.columns))}")
        values = df[col].astype(object).where(df[col].notna(), "?").astype(str)
        labels = labels + f" · {col}=" + values
    return labels


def _distinct(values: pd.Series) -> list[str]:
    # Missing counts as a value of its own: we cannot tell it equals the others.
    shown = values.astype(object).where(values.notna(), None)
    return sorted({"<missing>" if v is None else str(v) for v in shown})


def check_comparable(df: pd.DataFrame, group_by: str | Iterable[str] | None = None,
                     columns: Sequence[str] = COMPARABLE) -> None:
    """Raise ValueError if the runs of one curve differ in any of ``columns``.

    Only ok runs are checked (failed ones are not drawn). A column named in
    ``group_by`` splits the curves, so it can never differ within one. The
    message names every offending column with its distinct values.
    """
    grouped = as_columns(group_by)
    ok = ok_runs(df)
    if ok.empty:
        return
    checked = [c for c in columns if c in ok.columns and c not in grouped]
    problems = []  # (curve, column, distinct values)
    for curve, runs in ok.groupby(curve_keys(ok, grouped), sort=True):
        for col in checked:
            values = _distinct(runs[col])
            if len(values) > 1:
                problems.append((curve, col, values))
    if problems:
        differing = sorted({col for _, col, _ in problems}, key=list(columns).index)
        lines = [f"  curve {curve!r}: {col} takes {len(values)} values: "
                 + ", ".join(repr(v) for v in values) for curve, col, values in problems]
        raise ValueError(
            "refusing to draw runs that differ in " + ", ".join(differing)
            + " within one curve:\n" + "\n".join(lines)
            + "\nfilter the runs to one setting, or group by the column(s) so each value "
            f"gets its own curve (group_by={differing!r}, CLI: --group-by "
            + " ".join(differing) + ")")
