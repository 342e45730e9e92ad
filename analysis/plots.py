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

from analysis.aggregate import point_interval, reference_accuracies
from analysis.checks import as_columns, check_comparable, curve_keys, ok_runs
from analysis.stats import pareto_front

AXIS_LABELS = {
    "train_flops": "training FLOPs",
    "total_flops": "total FLOPs (training + generation)",
    "generation_flops": "generation FLOPs (on-policy rollouts)",
    "sequence_generation_flops": "generation FLOPs (teacher sequences)",
    "train_time_s": "training time (s)",
    "peak_memory_bytes": "peak memory (bytes)",
    "tokens_trained": "tokens trained",
    "tokens_supervised": "supervised tokens",
    "accuracy": "accuracy (%)",
}
MAX_LISTED_IDS = 12  # keeps the footnote to a line or two
LEVEL = 0.95  # confidence level of every error bar drawn (stats.interval)


def cost_column(df: pd.DataFrame) -> str:
    """The x of a tradeoff: ``total_flops`` where the runs differ in distill.mode, so each mode is
    drawn at its full cost (training + the student's rollouts or the teacher's sequences: generation
    is what on-policy and sequence-level KD pay for), else ``train_flops``."""
    from analysis.checks import varies_distill

    return "total_flops" if varies_distill(df) else "train_flops"


def is_accuracy(column: str) -> bool:
    """Whether column is a share in [0, 1] drawn in % (the overall or a benchmark's accuracy)."""
    return column == "accuracy" or column.startswith("acc_")


def axis_label(column: str) -> str:
    if column in AXIS_LABELS:
        return AXIS_LABELS[column]
    if column.startswith("acc_"):
        return f"accuracy on {column[len('acc_'):]} (%)"
    return column


def stderr_column(y: str) -> str:
    """Column holding the standard error of metric y."""
    if y == "accuracy":
        return "accuracy_stderr"
    if y.startswith("acc_"):
        return "stderr_" + y[len("acc_"):]
    return f"{y}_stderr"


def _points(ok: pd.DataFrame, x: str, y: str, group_by=None) -> pd.DataFrame:
    """One point per (curve, trunc): mean x, mean y and y's LEVEL interval (stats.interval via
    aggregate.point_interval: bootstrap over seeds, else over problems, else the normal interval
    from the run's stderr), the interval the tables give."""
    rows = []
    labels = curve_keys(ok, group_by)
    for (preset, trunc), group in ok.groupby([labels, ok["trunc"]], dropna=False, sort=True):
        stats = point_interval(group, y, LEVEL)
        rows.append({"sections": preset, "trunc": trunc,
                     x: float(group[x].astype(float).mean()), y: stats["mean"],
                     "ci_low": stats["ci_low"], "ci_high": stats["ci_high"],
                     "interval": stats["interval"], "runs": stats["runs"]})
    return pd.DataFrame(rows, columns=["sections", "trunc", x, y, "ci_low", "ci_high",
                                       "interval", "runs"])


def interval_errors(mean: pd.Series, low: pd.Series, high: pd.Series,
                    scale: float = 1.0) -> np.ndarray:
    """Asymmetric error bars (2, n) from interval bounds, times scale; 0 where there is none."""
    below = (mean.astype(float) - low.astype(float)).clip(lower=0).fillna(0)
    above = (high.astype(float) - mean.astype(float)).clip(lower=0).fillna(0)
    return scale * np.vstack([below.to_numpy(dtype=float), above.to_numpy(dtype=float)])


def _distinct_text(df: pd.DataFrame, column: str, plural: str) -> str | None:
    values = [str(v) for v in dict.fromkeys(df[column].dropna())] if column in df else []
    if not values:
        return None
    return values[0] if len(values) == 1 else f"{len(values)} {plural}"


def run_context(df: pd.DataFrame) -> str:
    """What the ok runs share, for a title: 'student ← teacher · data · benchmarks · N steps'
    (parts the runs do not record are left out; differing values are counted)."""
    from analysis.aggregate import benchmarks
    from analysis.checks import setting_values

    ok = ok_runs(df)
    student = _distinct_text(ok, "student", "students")
    teacher = _distinct_text(ok, "teacher", "teachers")
    parts = [f"{student or '?'} ← {teacher or '?'}"] if student or teacher else []
    data = _distinct_text(ok, "dataset", "datasets")
    if data:
        parts.append(f"data: {data}")
    names = benchmarks(ok)
    if names:
        parts.append("benchmark" + ("s" if len(names) > 1 else "") + ": " + ", ".join(names))
    steps = sorted({s for s in setting_values(ok, "train.max_steps").dropna()})
    if len(steps) == 1 and steps[0] != "null":
        parts.append(f"{steps[0]} steps")
    return " · ".join(parts)


def interval_caption(methods: Iterable[str], df: pd.DataFrame) -> str:
    """'error bars: 95 % intervals (normal, from eval stderr) over 200 problems per run' from
    the interval methods a figure used (stats.interval) and the runs' problem counts."""
    used = sorted({m for m in methods if isinstance(m, str) and m != "none"})
    ok = ok_runs(df)
    counts = sorted({int(v) for c in ok.columns if c.startswith("n_")
                     for v in pd.to_numeric(ok[c], errors="coerce").dropna()})
    problems = "" if not counts else f" over {counts[0]} problems per benchmark" \
        if len(counts) == 1 else f" over {counts[0]}-{counts[-1]} problems per benchmark"
    how = f" ({'; '.join(used)})" if used else " (none could be made)"
    return f"error bars: {LEVEL:.0%} intervals{how}{problems}"


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


FRONT_LABEL = "Pareto frontier"


def _draw_front(ax: Axes, points: pd.DataFrame, x: str, y: str, scale: float = 1.0) -> None:
    """The Pareto frontier over the curves: a thick black dashed step through its points, drawn
    above the curves (zorder) with rings on its points, in the legend."""
    front = pareto_front(points, x=x, y=y)
    if front.empty:
        return
    ax.plot(front[x], front[y] * scale, linestyle=(0, (5, 2)), color="black", linewidth=2,
            alpha=0.8, zorder=4, label=FRONT_LABEL)
    ax.scatter(front[x], front[y] * scale, s=140, facecolors="none", edgecolors="black",
               linewidths=1.2, zorder=5)


REFERENCE_STYLE = {"teacher": ("teacher", "black", "-."),
                   "base": ("base student before KD", "dimgrey", ":")}


def draw_references(ax: Axes, runs: pd.DataFrame, scale: float = 100.0) -> list[str]:
    """Horizontal lines at the teacher's and the base student's accuracy (where the runs know
    them), times scale (100: an axis in %), each labelled on the line and in the legend;
    returns the labels drawn."""
    references = reference_accuracies(runs)
    several = {role: sum(r["role"] == role for r in references) > 1 for role in REFERENCE_STYLE}
    labels = []
    for ref in references:
        name, color, style = REFERENCE_STYLE[ref["role"]]
        model = ref["models"].get("student" if ref["role"] == "base" else "teacher")
        label = f"{name}{f' ({model})' if several[ref['role']] and model else ''}: " \
                f"{100 * ref['accuracy']:.1f}%"
        level = scale * ref["accuracy"]
        ax.axhline(level, color=color, linestyle=style, linewidth=1, zorder=1, label=label)
        # On the line, at the right edge: readable without the legend.
        ax.annotate(label, xy=(1, level), xycoords=("axes fraction", "data"),
                    xytext=(-3, 2), textcoords="offset points", ha="right", va="bottom",
                    fontsize=7, color=color)
        labels.append(label)
    return labels


def plot_tradeoff(df: pd.DataFrame, ax: Axes | None = None, x: str = "train_flops",
                  y: str = "accuracy", group_by=None,
                  missing: Iterable[str | Mapping] = (), references: bool = True) -> Axes:
    """Metric y against cost x (log scale), one line per sections preset (and group_by value).

    Accuracies are drawn in %; error bars are LEVEL intervals (see _points) and the caption
    under the axes says how they were made. Only ok runs are drawn; failed runs and missing
    grid points are listed in a footnote. Runs of one curve that differ in model, data or loss
    are refused (see check_comparable). With ``references`` and an accuracy y, the teacher's
    and the base student's accuracy are drawn as labelled horizontal lines where the runs
    report them (the embedded models; pretrained ones are not evaluated before KD).
    """
    check_comparable(df, group_by)
    if ax is None:
        ax = Figure(figsize=(7, 4.5), layout="constrained").subplots()
    ok = ok_runs(df)
    usable = ok[(pd.to_numeric(ok[x], errors="coerce") > 0).fillna(False).to_numpy()
                & pd.to_numeric(ok[y], errors="coerce").notna().to_numpy()]
    points = _points(usable, x, y, group_by)
    scale = 100.0 if is_accuracy(y) else 1.0

    for preset, line in points.groupby("sections", sort=True):
        line = line.sort_values(x)
        ax.errorbar(line[x], line[y] * scale, capsize=3, marker="o", linewidth=1.5,
                    yerr=interval_errors(line[y], line["ci_low"], line["ci_high"], scale),
                    markersize=5, zorder=2, label=preset)
        for _, p in line.iterrows():
            ax.annotate(f"trunc={p['trunc']:g}", (p[x], p[y] * scale), xytext=(4, 4),
                        textcoords="offset points", fontsize=7)
    _draw_front(ax, points, x, y, scale)
    drawn = draw_references(ax, ok, scale) if references and is_accuracy(y) else []

    ax.set_xscale("log")
    ax.set_xlabel(axis_label(x))
    ax.set_ylabel(axis_label(y))
    ax.grid(True, which="major", alpha=0.3)
    if not points.empty or drawn:
        # Outside the axes, on the right: the reference lines span the whole width.
        ax.legend(title=legend_title(group_by), fontsize=8, title_fontsize=8, loc="upper left",
                  bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    notes = [interval_caption(points["interval"], usable)] if not points.empty else []
    notes += [footnote(df, missing, len(ok) - len(usable))]
    note = "\n".join(n for n in notes if n)
    if note:
        # Below the x label, in axes coordinates so it follows the axes size.
        ax.annotate(note, xy=(0, 0), xycoords="axes fraction", xytext=(0, -36),
                    textcoords="offset points", ha="left", va="top", fontsize=7,
                    color="dimgrey")
    context = run_context(ok)
    if context:
        ax.set_title(context, fontsize=9)
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
