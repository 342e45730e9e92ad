"""The paper's figures: tradeoff, accuracy per section preset, accuracy and cost vs trunc, and
generation (tokens per completion, finished rate) vs trunc.

Each ``figure_*`` composes plotters into a Figure (not saved; see
plots.save_figure). Plotters take ``ax=None`` and return the axes. Every
figure refuses incomparable runs (checks.check_comparable) and lists failed
runs and missing grid points in a footnote.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from analysis.aggregate import grid_points, preset_rank
from analysis.checks import check_comparable, ok_runs
from analysis.plots import (LEVEL, add_footnote, axis_label, draw_references, footnote,
                            interval_caption, interval_errors, legend_title, plot_tradeoff,
                            run_context)
from analysis.stats import FULL_TRUNC
from analysis.tables import MIB
RETAINED_LABELS = {
    "ratio_of_means": "% of trunc=1.0 accuracy retained\n(ratio of means over benchmarks)",
    "mean_of_ratios": "% of trunc=1.0 accuracy retained\n(mean of ratios over benchmarks)",
}
# Cost panels of the truncation figure: column, axis label, scale to the label's unit.
COST_PANELS = (("train_time_s", "training time (s)", 1.0),
               ("peak_memory_bytes", "peak memory (MiB)", 1 / MIB),
               ("train_flops", "training FLOPs", 1.0))


def figure_tradeoff(df: pd.DataFrame, missing: Iterable = (), group_by=None,
                    x: str = "train_flops", y: str = "accuracy") -> Figure:
    """Training FLOPs (log) vs accuracy, one curve per preset, Pareto frontier marked."""
    fig = Figure(figsize=(8.5, 4.5), layout="constrained")  # the legend sits right of the axes
    ax = plot_tradeoff(df, fig.subplots(), x=x, y=y, group_by=group_by, missing=missing)
    context = ax.get_title()  # the models, data, benchmarks and steps the runs share
    ax.set_title(f"{axis_label(y)} vs {axis_label(x)}" + (f"\n{context}" if context else ""),
                 fontsize=9)
    return fig


def _errors(points: pd.DataFrame, scale: float = 1.0) -> np.ndarray:
    """Asymmetric error bars (2, n) from the intervals, times scale; 0 where there is none."""
    return interval_errors(points["mean"], points["ci_low"], points["ci_high"], scale)


def figure_title(what: str, df: pd.DataFrame) -> str:
    """A figure's title: what it shows, then what its runs share (plots.run_context)."""
    context = run_context(df)
    return what + (f"\n{context}" if context else "")


def figure_notes(df: pd.DataFrame, missing: Iterable, methods: Iterable) -> str:
    """The footnote of a figure with error bars: the interval caption, then what is not shown."""
    return "\n".join(n for n in (interval_caption(methods, df), footnote(df, missing)) if n)


def plot_sections(points: pd.DataFrame, benchmark: str, ax: Axes | None = None) -> Axes:
    """Bars of accuracy per curve (preset) for one benchmark, with interval error bars.

    ``points`` are aggregate.grid_points rows of one trunc value.
    """
    if ax is None:
        ax = Figure(figsize=(4, 3.5), layout="constrained").subplots()
    rows = points[points["benchmark"] == benchmark]
    rows = rows.iloc[sorted(range(len(rows)), key=lambda i: (
        preset_rank(rows["sections"].iloc[i]), str(rows["curve"].iloc[i])))]
    positions = np.arange(len(rows))
    ax.bar(positions, 100 * rows["mean"].astype(float), yerr=_errors(rows, 100), capsize=3,
           color=[f"C{i % 10}" for i in positions], edgecolor="black", linewidth=0.5)
    for pos, (mean, runs) in enumerate(zip(rows["mean"], rows["runs"])):
        ax.annotate(f"{100 * mean:.1f}\nn={runs}", (pos, 100 * mean), xytext=(0, 3),
                    textcoords="offset points", ha="center", va="bottom", fontsize=6)
    ax.set_xticks(positions, [str(c) for c in rows["curve"]], rotation=30, ha="right",
                  fontsize=8)
    ax.set_title(benchmark, fontsize=9)
    ax.set_ylabel("accuracy (%)")
    ax.margins(y=0.15)  # room for the value labels above the bars
    ax.grid(True, axis="y", alpha=0.3)
    return ax


def figure_sections(df: pd.DataFrame, trunc: float = FULL_TRUNC, missing: Iterable = (),
                    group_by=None, benchmarks: Iterable[str] | None = None) -> Figure:
    """Accuracy per section preset at one trunc, one panel per benchmark."""
    check_comparable(df, group_by)
    points = grid_points(df, group_by, level=LEVEL)
    points = points[np.isclose(points["trunc"].astype(float), trunc)]
    names = list(benchmarks) if benchmarks is not None \
        else list(dict.fromkeys(points["benchmark"]))
    if not names:
        raise ValueError(f"no finished run at trunc={trunc:g} to draw; truncs with runs: "
                         f"{sorted(set(ok_runs(df)['trunc'].dropna()))}")
    fig = Figure(figsize=(1.2 + 3.2 * len(names), 3.8), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(names), sharey=True, squeeze=False)[0])
    for ax, bench in zip(axes, names):
        plot_sections(points, bench, ax)
    if len(names) == 1:  # the references are overall accuracies: one panel is their benchmark
        draw_references(axes[0], ok_runs(df))
    fig.suptitle(figure_title(f"accuracy per section preset at trunc={trunc:g} (n = runs)", df),
                 fontsize=10)
    add_footnote(fig, figure_notes(df, missing, points["interval"]))
    return fig


def plot_vs_trunc(points: pd.DataFrame, column: str, ax: Axes | None = None,
                  scale: float = 1.0, error: bool = False, label: str | None = None) -> Axes:
    """One line per curve of ``column`` against trunc, from grid_points rows.

    Rows are per benchmark; the cost and retained-average columns repeat over
    a point's benchmarks, so the first row of each (curve, trunc) is used.
    """
    if ax is None:
        ax = Figure(figsize=(4, 3.5), layout="constrained").subplots()
    for curve, rows in points.groupby("curve", sort=False):
        rows = rows.drop_duplicates(["trunc"]).sort_values("trunc")
        yerr = _errors(rows, scale) if error else None
        ax.errorbar(rows["trunc"].astype(float), rows[column].astype(float) * scale,
                    yerr=yerr, marker="o", markersize=4, capsize=3, label=str(curve))
    ticks = sorted(set(points["trunc"].dropna().astype(float)))
    if ticks:
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks], fontsize=8)
    ax.set_xlabel("trunc (fraction of each sequence kept)")
    ax.set_ylabel(label or axis_label(column))
    ax.grid(True, alpha=0.3)
    return ax


def figure_truncation(df: pd.DataFrame, missing: Iterable = (), group_by=None,
                      retained_average: str = "ratio_of_means") -> Figure:
    """Accuracy and % of trunc=1.0 accuracy retained vs trunc, beside training time,
    peak memory and FLOPs vs trunc; one line per section preset."""
    if retained_average not in RETAINED_LABELS:
        raise ValueError(f"retained_average={retained_average!r}; allowed: "
                         f"{sorted(RETAINED_LABELS)}")
    check_comparable(df, group_by)
    points = grid_points(df, group_by, level=LEVEL)
    # One accuracy per point: the benchmarks' mean, as the runs report it.
    overall = grid_points(df.drop(columns=[c for c in df if c.startswith("acc_")]), group_by,
                          level=LEVEL)
    fig = Figure(figsize=(12, 6.5), layout="constrained")
    axes = fig.subplots(2, 3).ravel()
    plot_vs_trunc(overall, "mean", axes[0], error=True, scale=100,
                  label="accuracy (%, mean over benchmarks)")
    references = draw_references(axes[0], ok_runs(df))
    plot_vs_trunc(points, f"retained_{retained_average}", axes[1], scale=100,
                  label=RETAINED_LABELS[retained_average])
    axes[1].axhline(100, color="grey", linewidth=0.8, linestyle=":")
    for ax, (column, label, scale) in zip(axes[2:5], COST_PANELS):
        plot_vs_trunc(points, column, ax, scale=scale, label=label)
    handles, labels = axes[0].get_legend_handles_labels()
    curves = [(h, lab) for h, lab in zip(handles, labels) if lab not in references]
    axes[5].axis("off")
    if curves:
        axes[5].legend(*zip(*curves), title=legend_title(group_by), loc="center")
    fig.suptitle(figure_title("truncation: accuracy and cost vs trunc", df), fontsize=10)
    add_footnote(fig, figure_notes(df, missing, overall["interval"]))
    return fig


def plot_tokens_vs_trunc(points: pd.DataFrame, ax: Axes | None = None,
                         limit: float | None = None) -> Axes:
    """Mean generated tokens per completion against trunc, one line per curve, from
    grid_points rows; ``limit`` (eval.max_new_tokens) as a dashed line: a student that never
    learns to stop sits on it."""
    ax = plot_vs_trunc(points, "gen_tokens_mean", ax, label="generated tokens per completion "
                                                             "(mean over benchmarks)")
    if limit is not None:
        ax.axhline(limit, color="red", linestyle="--", linewidth=1,
                   label=f"eval.max_new_tokens = {limit:g}")
        # Right end, under the line: short completions (high trunc) usually sit there, far below.
        ax.annotate(f"max_new_tokens = {limit:g}", xy=(1, limit), xycoords=("axes fraction", "data"),
                    xytext=(-3, -3), textcoords="offset points", ha="right", va="top", fontsize=7,
                    color="red")
    ax.set_ylim(bottom=0)  # lengths from zero: the distance to the limit reads as a share
    if points["gen_tokens_mean"].isna().all():
        ax.text(0.5, 0.5, "no run recorded generation lengths\n(result.json before "
                "gen_tokens_mean)", transform=ax.transAxes, ha="center", va="center",
                fontsize=8, color="dimgrey")
    return ax


def figure_generation(df: pd.DataFrame, missing: Iterable = (), group_by=None) -> Figure:
    """Generated tokens per completion and % of completions finished (stopped by a stop
    token before eval.max_new_tokens) vs trunc, one line per section preset."""
    check_comparable(df, group_by)
    # One value per point: the run summaries' means over benchmarks.
    points = grid_points(df.drop(columns=[c for c in df if c.startswith("acc_")]), group_by,
                         level=LEVEL)
    limits = sorted(set(ok_runs(df)["max_new_tokens"].dropna().astype(int))) \
        if "max_new_tokens" in df else []
    fig = Figure(figsize=(11, 4), layout="constrained")
    tokens_ax, finished_ax, legend_ax = fig.subplots(1, 3, width_ratios=[3, 3, 1.4])
    plot_tokens_vs_trunc(points, tokens_ax, limit=limits[-1] if len(limits) == 1 else None)
    plot_vs_trunc(points, "finished_rate", finished_ax, scale=100,
                  label="completions finished before the limit (%)")
    finished_ax.set_ylim(-5, 105)
    handles, labels = tokens_ax.get_legend_handles_labels()
    legend_ax.axis("off")
    if handles:
        legend_ax.legend(handles, labels, title=legend_title(group_by), loc="center", fontsize=8)
    fig.suptitle(figure_title("generation vs trunc: tokens per completion and finished rate "
                              "(means over benchmarks and seeds)", df), fontsize=10)
    add_footnote(fig, footnote(df, missing))
    return fig
