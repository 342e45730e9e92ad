"""The window figure (experiment paper_windows): accuracy vs trunc, one line per
``truncation.mode``, i.e. which part of each sequence is kept (lead/left = its start, middle,
right = its end, random_labels = random supervised positions).

Like the other figures it composes load → stats → plot: the points are aggregate.grid_points
of the runs' overall accuracy, error bars their 95 % intervals, and the teacher's and base
student's accuracy are reference lines where the runs record them.
"""

from __future__ import annotations

from typing import Iterable

import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from analysis.aggregate import grid_points
from analysis.checks import as_columns, check_comparable, ok_runs
from analysis.figures import figure_notes, figure_title
from analysis.plots import LEVEL, draw_references, interval_errors

MODE = "truncation_mode"
# kd_sweeps.schema.TruncationConfig.mode's values, in the order of the sequence they keep;
# unknown modes follow alphabetically.
MODE_ORDER = ("lead", "left", "middle", "right", "random_labels")
MARKERS = ("o", "s", "^", "D", "v", "P", "X")
# Lines that share a trunc are spread by this share of the x range (at least of 1.0), so their
# error bars do not hide each other; the ticks stay at the true trunc values.
DODGE = 0.012


def varies_windows(df: pd.DataFrame) -> bool:
    """Whether the ok runs differ in truncation.mode (a window sweep)."""
    ok = ok_runs(df)
    return MODE in ok and ok[MODE].dropna().nunique() > 1


def _mode_rank(mode) -> tuple[int, str]:
    mode = str(mode)
    return (MODE_ORDER.index(mode) if mode in MODE_ORDER else len(MODE_ORDER), mode)


def plot_windows(points: pd.DataFrame, ax: Axes | None = None) -> Axes:
    """Accuracy (%) vs trunc, one line per curve of grid_points rows grouped by
    truncation_mode (labelled by the mode alone when that is all that tells curves apart)."""
    if ax is None:
        ax = Figure(figsize=(6.5, 4.2), layout="constrained").subplots()
    lines = sorted(points.groupby("curve", sort=False),
                   key=lambda item: (_mode_rank(item[1][MODE].iloc[0]), str(item[0])))
    by_mode_only = points["curve"].nunique() == points[MODE].nunique()
    truncs = sorted(set(points["trunc"].dropna().astype(float)))
    step = DODGE * max(1.0, (truncs[-1] - truncs[0]) if truncs else 1.0)
    for i, (curve, rows) in enumerate(lines):
        rows = rows.drop_duplicates(["trunc"]).sort_values("trunc")
        offset = (i - (len(lines) - 1) / 2) * step
        ax.errorbar(rows["trunc"].astype(float) + offset, 100 * rows["mean"].astype(float),
                    yerr=interval_errors(rows["mean"], rows["ci_low"], rows["ci_high"], 100),
                    marker=MARKERS[i % len(MARKERS)], markersize=5, capsize=3, linewidth=1.5,
                    label=str(rows[MODE].iloc[0]) if by_mode_only else str(curve))
    if truncs:
        ax.set_xticks(truncs, [f"{t:g}" for t in truncs], fontsize=8)
        ax.set_xlim(truncs[0] - 0.1, truncs[-1] + 0.1)
    ax.set_xlabel("trunc (fraction of each sequence kept)")
    ax.set_ylabel("accuracy (%, mean over benchmarks)")
    ax.grid(True, alpha=0.3)
    return ax


def figure_windows(df: pd.DataFrame, missing: Iterable = (), group_by=None) -> Figure:
    """Accuracy vs trunc, one line per truncation.mode (and group_by value), 95 % interval
    error bars, teacher and base-student reference lines where recorded."""
    by = as_columns(group_by) + ([MODE] if MODE not in as_columns(group_by) else [])
    check_comparable(df, by)
    if MODE not in df or ok_runs(df)[MODE].dropna().empty:
        raise ValueError("no finished run records truncation.mode (column truncation_mode); "
                         "the window figure needs runs of conf/experiment/paper_windows.yaml")
    # One accuracy per point: the benchmarks' mean, as the runs report it.
    points = grid_points(df.drop(columns=[c for c in df if c.startswith("acc_")]), by,
                         level=LEVEL)
    fig = Figure(figsize=(8.5, 4.5), layout="constrained")
    ax = plot_windows(points, fig.subplots())
    draw_references(ax, ok_runs(df))
    # Outside the axes, on the right: the reference lines span the whole width.
    ax.legend(title="truncation.mode" if len(by) == 1 else " · ".join(["sections", *by]),
              fontsize=8, title_fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0),
              borderaxespad=0)
    ax.set_title(figure_title("windows: accuracy vs trunc per truncation.mode", df), fontsize=9)
    note = figure_notes(df, missing, points["interval"])
    # Below the x label, in axes coordinates so it follows the axes size.
    ax.annotate(note, xy=(0, 0), xycoords="axes fraction", xytext=(0, -36),
                textcoords="offset points", ha="left", va="top", fontsize=7, color="dimgrey")
    return fig

