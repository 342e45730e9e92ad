"""Generation and references in the outputs: finished rate and generated tokens per point, the
teacher's and base student's accuracy as table rows and plot lines, the generation figure; runs
that predate these keys still load and draw."""

from __future__ import annotations

import math
import os

import numpy as np
import pandas as pd
import pytest

os.environ.setdefault("MPLBACKEND", "Agg")

from analysis.figures import figure_generation, plot_tokens_vs_trunc  # noqa: E402
from analysis.aggregate import grid_points  # noqa: E402
from analysis.load import runs_frame  # noqa: E402
from analysis.plots import plot_tradeoff, save_figure  # noqa: E402
from analysis.tables import (ACCURACY, FINISHED, GEN_TOKENS, OF_TEACHER, REFERENCE_ROWS,  # noqa: E402
                             RETAINED, paper_table, summary_table, unfinished_note, write_csv)
from tests.helpers import point_folders  # noqa: E402
from tests.analysis_records import (BASE, RECORDS, RUNS, TEACHER,  # noqa: E402
                                    generation_record)


def test_frame_has_generation_and_reference_columns():
    df = runs_frame(RUNS).set_index("run_id")
    row = df.loc["all-050"]
    assert (row["finished_rate"], row["gen_tokens_mean"]) == (0.60, 140.5)
    assert (row["teacher_accuracy"], row["base_accuracy"], row["max_new_tokens"]) == (TEACHER, BASE, 256)
    assert (row["finished_rate_synthetic"], row["gen_tokens_mean_synthetic"],
            row["gen_tokens_max_synthetic"]) == (0.60, 140.5, 256)
    assert str(df["gen_tokens_max_synthetic"].dtype) == "Int64"
    old = runs_frame(RECORDS)  # written before these keys: the per-benchmark columns do not appear
    assert not any(c.startswith(("finished_rate_", "gen_tokens_mean_")) for c in old.columns)
    assert old[["finished_rate", "gen_tokens_mean", "teacher_accuracy", "base_accuracy"]].isna().all().all()


def test_summary_table_with_generation_and_references(tmp_path):
    table = summary_table(runs_frame(RUNS))
    points, refs = table.iloc[:5], table.iloc[5:]
    assert list(points[FINISHED]) == [5.0, 60.0, 98.0, 90.0, 100.0]
    assert list(points[GEN_TOKENS]) == [250.0, 140.5, 61.0, 70.0, 58.0]
    # % of teacher = accuracy / 0.887: 0.30 / 0.887 = 33.8 %; 0.60 / 0.887 = 67.6 %.
    assert list(points[OF_TEACHER]) == [11.3, 33.8, 67.6, 39.5, 78.9]
    assert list(points[RETAINED]) == [16.7, 50.0, 100.0, 50.0, 100.0]
    assert list(refs["sections"]) == [REFERENCE_ROWS["teacher"], REFERENCE_ROWS["base"]]
    assert list(refs[ACCURACY]) == ["88.7", "25.4"]
    assert list(refs[OF_TEACHER]) == [100.0, 28.6]  # 0.254 / 0.887
    assert refs[["trunc", "train FLOPs", FINISHED, GEN_TOKENS]].isna().all().all()
    # The CSV stays numeric in the new columns.
    back = pd.read_csv(write_csv(table, tmp_path / "summary.csv"))
    for column in (OF_TEACHER, FINISHED, GEN_TOKENS, "trunc"):
        assert pd.api.types.is_float_dtype(back[column]), column
    assert str(table["tokens trained"].dtype) == "Int64"  # reference rows keep the integer column


def test_no_reference_rows_for_pretrained_models():
    runs = [generation_record(f"r{t}", "all", t, 0.5, 0.9, 60.0, teacher=None, base=None)
            for t in (0.5, 1.0)]
    table = summary_table(runs_frame(runs))
    assert len(table) == 2 and table[OF_TEACHER].isna().all()
    assert not table["sections"].isin(list(REFERENCE_ROWS.values())).any()
    # The base student alone known: its row, without % of teacher.
    runs[0]["summary"]["base_accuracy"] = 0.2
    table = summary_table(runs_frame(runs))
    assert list(table["sections"].iloc[2:]) == [REFERENCE_ROWS["base"]]
    assert math.isnan(table[OF_TEACHER].iloc[2])


def test_reference_rows_name_each_teacher_when_teachers_differ():
    other = generation_record("big", "all", 1.0, 0.8, 1.0, 50.0, teacher=0.95)
    other["config"]["model"]["teacher"]["name_or_path"] = "bigger-teacher"
    table = summary_table(runs_frame(RUNS[2:3] + [other]))
    refs = table[table["trunc"].isna()]
    teachers = refs[refs["sections"] == REFERENCE_ROWS["teacher"]]
    assert sorted(zip(teachers["teacher"], teachers[ACCURACY])) == [
        ("bigger-teacher", "95.0"), ("embedded-teacher", "88.7")]
    bases = refs[refs["sections"] == REFERENCE_ROWS["base"]]
    assert sorted(bases[OF_TEACHER]) == [26.7, 28.6]  # 0.254 / 0.95 and / 0.887


def _reference_lines(ax) -> dict[str, float]:
    return {line.get_label(): line.get_ydata()[0] for line in ax.get_lines()
            if line.get_label().startswith(("teacher", "base student"))}


def test_tradeoff_plot_draws_labelled_reference_lines():
    ax = plot_tradeoff(runs_frame(RUNS))
    assert _reference_lines(ax) == pytest.approx(  # drawn in %, as the accuracy axis
        {"teacher: 88.7%": 100 * TEACHER, "base student before KD: 25.4%": 100 * BASE})
    assert {"teacher: 88.7%", "base student before KD: 25.4%"} <= {t.get_text() for t in ax.texts}
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "teacher: 88.7%" in legend
    assert _reference_lines(plot_tradeoff(runs_frame(RECORDS))) == {}  # not known: none drawn
    assert _reference_lines(plot_tradeoff(runs_frame(RUNS), references=False)) == {}


def _curves(ax) -> dict:
    """Label -> (x, y) of each drawn curve (errorbar containers) and plain line, as floats
    (errorbar keeps its data as object arrays)."""
    lines = {line.get_label(): line for line in ax.get_lines()}
    lines.update({c.get_label(): c.lines[0] for c in ax.containers})
    return {label: (np.asarray(line.get_xdata(), dtype=float), np.asarray(line.get_ydata(), dtype=float))
            for label, line in lines.items()}


def test_generation_figure(tmp_path):
    df = runs_frame(RUNS)
    fig = figure_generation(df)
    tokens_ax, finished_ax = fig.axes[:2]
    lines = _curves(tokens_ax)
    np.testing.assert_allclose(lines["all"][0], [0.25, 0.5, 1.0])
    np.testing.assert_allclose(lines["all"][1], [250.0, 140.5, 61.0])
    np.testing.assert_allclose(lines["cot"][1], [70.0, 58.0])
    np.testing.assert_allclose(lines["eval.max_new_tokens = 256"][1], [256, 256])
    finished = _curves(finished_ax)
    np.testing.assert_allclose(finished["all"][1], [5.0, 60.0, 98.0])  # percent
    paths = save_figure(fig, tmp_path, "generation")
    assert [p.name for p in paths] == ["generation.png", "generation.pdf"]
    assert all(p.stat().st_size > 0 for p in paths)


def test_generation_figure_from_runs_without_generation_keys():
    fig = figure_generation(runs_frame(RECORDS))
    assert any("no run recorded generation lengths" in t.get_text() for t in fig.axes[0].texts)


def test_plot_tokens_vs_trunc_takes_and_returns_axes():
    points = grid_points(runs_frame(RUNS).drop(columns=["acc_synthetic"]))
    ax = plot_tokens_vs_trunc(points)
    assert ax is not None and ax.get_xlabel().startswith("trunc")
    assert plot_tokens_vs_trunc(points, ax, limit=100.0) is ax


def test_paper_table_has_generation_per_benchmark():
    table = paper_table(runs_frame(RUNS))
    row = table[(table["sections"] == "all") & (table["trunc"] == 0.25)].iloc[0]
    assert (row["benchmark"], row[FINISHED], row[GEN_TOKENS]) == ("synthetic", 5.0, 250.0)


def test_unfinished_note_names_only_points_below_half():
    note = unfinished_note(runs_frame(RUNS))
    assert "trunc=0.25 sections=all (5% finished, 250 tokens per completion)" in note
    assert "trunc=0.5" not in note  # 60 % finished
    assert unfinished_note(runs_frame(RECORDS)) == ""  # not recorded: nothing to say


def test_end_of_sweep_summary_files(tmp_path):
    from kd_sweeps.callbacks import summarize_sweep

    markdown, png = summarize_sweep(tmp_path, point_folders(tmp_path, RUNS), title="gen")
    assert png is not None and png.exists()
    assert f"| {FINISHED} | {GEN_TOKENS} |" in markdown and REFERENCE_ROWS["teacher"] in markdown
    # The point that mostly ran to the limit is named under the table.
    assert "fewer than 50% of completions stopped before eval.max_new_tokens at: trunc=0.25 " \
           "sections=all (5% finished, 250 tokens per completion)" in markdown
    assert "trunc=0.5 sections=all" not in markdown.split("fewer than")[1]
    assert (tmp_path / "summary.md").read_text() == f"# gen\n\n{markdown}\n"
    csv = pd.read_csv(tmp_path / "summary.csv")  # tables.summary_frame: numeric, snake_case
    assert list(csv["finished_pct"].iloc[:5]) == [5.0, 60.0, 98.0, 90.0, 100.0]
    assert list(csv["role"]) == ["grid_point"] * 5 + ["teacher", "base_student"]
    assert csv["sections"].iloc[5:].isna().all() and "latest_launch" not in csv  # no grid here
