"""Accuracy / cost trade-off plot of a sweep.

Figures are built with ``matplotlib.figure.Figure`` rather than pyplot, so no
GUI backend is needed and nothing touches pyplot's global figure list.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from analysis.aggregate import reference_accuracies
from analysis.checks import as_columns, check_comparable, curve_keys, ok_runs
from analysis.stats import mean_stderr, pareto_front

AXIS_LABELS = {
    "train_flops": "training FLOPs",
    "train_time_s": "training time (s)",
    "peak_memory_bytes": "peak memory (bytes)",
    "tokens_trained": "tokens trained",
    "tokens_supervised": "supervised tokens",
    "accuracy": "accuracy",
}
MAX_LISTED_IDS = 12  # keeps the footnote to a line or two


def axis_label(column: str) -> str:
    if column in AXIS_LABELS:
        return AXIS_LABELS[column]
    if column.startswith("acc_"):
        return f"accuracy on {column[len('acc_'):]}"
    return column


def stderr_column(y: str) -> str:
    """Column holding the standard error of metric y."""
    if y == "accuracy":
        return "accuracy_stderr"
    if y.startswith("acc_"):
        return "stderr_" + y[len("acc_"):]
    return f"{y}_stderr"


def _points(ok: pd.DataFrame, x: str, y: str, group_by=None) -> pd.DataFrame:
    """One point per (sections, trunc).

    Several seeds of a grid point are averaged and their spread gives the error
    bar; a single run keeps the stderr its evaluation reported.
    """
    err = stderr_column(y)
    rows = []
    labels = curve_keys(ok, group_by)
    for (preset, trunc), group in ok.groupby([labels, ok["trunc"]], dropna=False, sort=True):
        ys = group[y].astype(float)
        if len(group) > 1:
            mean, yerr = mean_stderr(ys)
        else:
            mean = float(ys.iloc[0])
            yerr = float(group[err].iloc[0]) if err in group and pd.notna(group[err].iloc[0]) \
                else np.nan
        rows.append({"sections": preset,
                     "trunc": trunc, x: float(group[x].astype(float).mean()), y: mean,
                     "yerr": yerr})
    return pd.DataFrame(rows, columns=["sections", "trunc", x, y, "yerr"])


def _runs(n: int) -> str:
    return f"{n} run" if n == 1 else f"{n} runs"


def _listed(items: list[str], sep: str = ", ") -> str:
    more = len(items) - MAX_LISTED_IDS
    return sep.join(items[:MAX_LISTED_IDS]) + (f"{sep}... ({more} more)" if more > 0 else "")


def _point_text(point: str | Mapping[str, Any]) -> str:
    if isinstance(point, str):
        return point
    from analysis.grid import describe

    return describe(point)


def footnote(df: pd.DataFrame, missing: Iterable[str | Mapping] = (), dropped: int = 0) -> str:
    """Which runs and grid points are not in a figure, and why (empty if none)."""
    status = df["status"].astype(object) if "status" in df else pd.Series(["ok"] * len(df))
    failed = df[~status.isin(["ok", "running"]).to_numpy()]
    lines = []
    running = int((status == "running").sum())
    if running:
        lines.append(f"{_runs(running)} still running, not shown")
    if len(failed):
        run_ids = failed["run_id"] if "run_id" in failed else pd.Series([None] * len(failed))
        ids = [str(i) for i in run_ids.astype(object).fillna("?")]
        lines.append(f"{_runs(len(failed))} failed, not shown: {_listed(ids)}")
    if dropped:
        lines.append(f"{_runs(dropped)} ok but without x/y values, not shown")
    points = [_point_text(p) for p in missing]
    if points:
        noun = "grid point" if len(points) == 1 else "grid points"
        lines.append(f"{len(points)} {noun} of the sweep without a finished run: "
                     + _listed(points, "; "))
    return "\n".join(lines)


def add_footnote(fig: Figure, text: str) -> None:
    """Text below everything in fig; save_figure's tight box keeps it in the file."""
    if text:
        fig.text(0.0, 0.0, text, ha="left", va="top", fontsize=7, color="dimgrey",
                 transform=fig.transFigure)


def _draw_front(ax: Axes, points: pd.DataFrame, x: str, y: str) -> None:
    front = pareto_front(points, x=x, y=y)
    if front.empty:
        return
    ax.plot(front[x], front[y], linestyle="--", color="grey", linewidth=1, zorder=1,
            label="Pareto frontier")
    ax.scatter(front[x], front[y], s=140, facecolors="none", edgecolors="black",
               linewidths=1, zorder=3)


REFERENCE_STYLE = {"teacher": ("teacher", "black", "-."),
                   "base": ("base student before KD", "dimgrey", ":")}


def draw_references(ax: Axes, runs: pd.DataFrame) -> list[str]:
    """Horizontal lines at the teacher's and the base student's accuracy (where the runs know
    them), each labelled on the line and in the legend; returns the labels drawn."""
    references = reference_accuracies(runs)
    several = {role: sum(r["role"] == role for r in references) > 1 for role in REFERENCE_STYLE}
    labels = []
    for ref in references:
        name, color, style = REFERENCE_STYLE[ref["role"]]
        model = ref["models"].get("student" if ref["role"] == "base" else "teacher")
        label = f"{name}{f' ({model})' if several[ref['role']] and model else ''}: " \
                f"{100 * ref['accuracy']:.1f}%"
        ax.axhline(ref["accuracy"], color=color, linestyle=style, linewidth=1, zorder=1,
                   label=label)
        # On the line, at the right edge: readable without the legend.
        ax.annotate(label, xy=(1, ref["accuracy"]), xycoords=("axes fraction", "data"),
                    xytext=(-3, 2), textcoords="offset points", ha="right", va="bottom",
                    fontsize=7, color=color)
        labels.append(label)
    return labels


def plot_tradeoff(df: pd.DataFrame, ax: Axes | None = None, x: str = "train_flops",
                  y: str = "accuracy", group_by=None,
                  missing: Iterable[str | Mapping] = (), references: bool = True) -> Axes:
    """Metric y against cost x (log scale), one line per sections preset (and group_by value).

    Only ok runs are drawn; failed runs and missing grid points are listed in
    a footnote. Runs of one curve that differ in model, data or loss are
    refused (see check_comparable). With ``references`` and y = accuracy, the
    teacher's and the base student's accuracy are drawn as labelled horizontal
    lines where the runs report them (the embedded models; pretrained ones are
    not evaluated before KD).
    """
    check_comparable(df, group_by)
    if ax is None:
        ax = Figure(figsize=(7, 4.5), layout="constrained").subplots()
    ok = ok_runs(df)
    usable = ok[(pd.to_numeric(ok[x], errors="coerce") > 0).fillna(False).to_numpy()
                & pd.to_numeric(ok[y], errors="coerce").notna().to_numpy()]
    points = _points(usable, x, y, group_by)

    for preset, line in points.groupby("sections", sort=True):
        line = line.sort_values(x)
        ax.errorbar(line[x], line[y], yerr=line["yerr"].fillna(0), marker="o", capsize=3,
                    linewidth=1.5, markersize=5, zorder=2, label=preset)
        for _, p in line.iterrows():
            ax.annotate(f"trunc={p['trunc']:g}", (p[x], p[y]), xytext=(4, 4),
                        textcoords="offset points", fontsize=7)
    _draw_front(ax, points, x, y)
    drawn = draw_references(ax, ok) if references and y == "accuracy" else []

    ax.set_xscale("log")
    ax.set_xlabel(axis_label(x))
    ax.set_ylabel(axis_label(y))
    ax.grid(True, which="major", alpha=0.3)
    if not points.empty or drawn:
        ax.legend(title=legend_title(group_by), fontsize=8, title_fontsize=8)
    note = footnote(df, missing, len(ok) - len(usable))
    if note:
        # Below the x label, in axes coordinates so it follows the axes size.
        ax.annotate(note, xy=(0, 0), xycoords="axes fraction", xytext=(0, -36),
                    textcoords="offset points", ha="left", va="top", fontsize=7,
                    color="dimgrey")
    return ax


def legend_title(group_by=None) -> str:
    return " · ".join(["sections"] + as_columns(group_by))


def save_figure(fig: Figure, out_dir, name: str,
                formats: Sequence[str] = ("png", "pdf")) -> list[Path]:
    """Write fig as out_dir/name.<fmt> for each format (PNG and PDF by default)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        path = out / f"{name}.{fmt}"
        # bbox "tight" keeps the footnote, which lies outside the axes.
        fig.savefig(path, format=fmt, dpi=150, bbox_inches="tight")
        paths.append(path)
    return paths
