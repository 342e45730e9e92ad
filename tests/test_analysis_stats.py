"""Intervals, % retained averages, grid-point aggregation and the paper table, by hand."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from analysis import stats
from analysis.aggregate import PRESET_ORDER, grid_points, point_interval
from analysis.load import runs_frame
from analysis.tables import paper_table, to_markdown, write_csv
from tests.analysis_records import record

Z95 = 1.959963984540054  # the 97.5 % quantile of the standard normal


def test_normal_ci_by_hand():
    low, high = stats.normal_ci(0.5, 0.1)
    assert (low, high) == pytest.approx((0.5 - Z95 * 0.1, 0.5 + Z95 * 0.1))
    assert stats.normal_ci(0.5, 0.1, level=0.5) == pytest.approx((0.5 - 0.0674490, 0.5 + 0.0674490))
    assert all(math.isnan(v) for v in stats.normal_ci(0.5, math.nan))
    with pytest.raises(ValueError, match="level"):
        stats.normal_ci(0.5, 0.1, level=1.0)


def test_interval_over_runs_by_hand():
    # Resampled means of two values are 0.2, 0.3 or 0.4, each extreme with probability
    # 1/4 > 2.5 %, so the 95 % percentile interval is exactly (0.2, 0.4).
    got = stats.interval([0.2, 0.4], stderrs=[0.01, 0.01], seed=1)
    assert got == {"mean": pytest.approx(0.3), "ci_low": pytest.approx(0.2),
                   "ci_high": pytest.approx(0.4), "runs": 2, "interval": "bootstrap over 2 runs"}
    assert got == stats.interval([0.2, 0.4], seed=1)  # the runs' own stderrs are not used


def test_interval_single_run():
    one = stats.interval([0.6], stderrs=[0.05])
    assert one["interval"] == "normal, from eval stderr" and one["runs"] == 1
    assert (one["ci_low"], one["ci_high"]) == pytest.approx((0.6 - Z95 * 0.05, 0.6 + Z95 * 0.05))
    problems = stats.interval([0.75], stderrs=[0.2], per_problem=[1, 0, 1, 1], seed=3)
    assert problems["interval"] == "bootstrap over 4 problems"
    assert (problems["ci_low"], problems["ci_high"]) == stats.bootstrap_ci([1, 0, 1, 1], seed=3)
    bare = stats.interval([0.6, None])
    assert bare["interval"] == "none" and bare["mean"] == 0.6 and math.isnan(bare["ci_low"])
    assert stats.interval([])["runs"] == 0


def test_retained_averages_by_hand():
    acc = {"hard": 0.05, "easy": 0.8, "only_here": 0.3, "zero_ref": 0.1}
    ref = {"hard": 0.1, "easy": 0.8, "zero_ref": 0.0, "only_there": 0.5}
    mean_of_ratios, ratio_of_means = stats.retained_averages(acc, ref)
    assert mean_of_ratios == pytest.approx((0.5 + 1.0) / 2)
    assert ratio_of_means == pytest.approx((0.05 + 0.8) / (0.1 + 0.8))
    assert all(math.isnan(v) for v in stats.retained_averages({"a": 0.2}, {"b": 0.4}))


def _seeded(run_id, sections, trunc, seed, synthetic, math500, flops=1e12):
    rec = record(run_id, sections, trunc, synthetic, seed=seed, flops=flops,
                 benchmarks=("synthetic", "math500"))
    rec["summary"]["eval/math500/accuracy"] = math500
    rec["summary"]["eval/synthetic/accuracy"] = synthetic
    return rec


def hand_frame() -> pd.DataFrame:
    return runs_frame([
        _seeded("a1", "cot", 1.0, 1, 0.6, 0.2), _seeded("a2", "cot", 1.0, 2, 0.8, 0.2),
        _seeded("b1", "cot", 0.5, 1, 0.35, 0.1, flops=4e11),
        _seeded("b2", "cot", 0.5, 2, 0.35, 0.2, flops=6e11),
        _seeded("c1", "all", 0.5, 1, 0.5, 0.3),  # no trunc=1.0 run: nothing to retain
        record("x", "cot", 0.25, None, status="failed", error="boom"),
    ])


def test_grid_points_by_hand():
    points = grid_points(hand_frame()).set_index(["sections", "trunc", "benchmark"])
    assert list(points.index.get_level_values(0).unique()) == ["all", "cot"]  # paper order
    cot_half = points.loc[("cot", 0.5, "synthetic")]
    assert cot_half["runs"] == 2 and cot_half["mean"] == pytest.approx(0.35)
    assert cot_half["stderr"] == 0.0 and cot_half["interval"] == "bootstrap over 2 runs"
    assert cot_half["train_flops"] == pytest.approx(5e11)  # mean cost over seeds
    math_half = points.loc[("cot", 0.5, "math500")]
    assert math_half["stderr"] == pytest.approx(0.05)  # std(0.1, 0.2) / sqrt 2
    # retained: seed means at 0.5 over seed means at 1.0, per benchmark:
    # synthetic 0.35 / 0.7 = 0.5, math500 0.15 / 0.2 = 0.75.
    assert cot_half["retained"] == pytest.approx(0.5)
    assert math_half["retained"] == pytest.approx(0.75)
    for row in (cot_half, math_half):
        assert row["retained_mean_of_ratios"] == pytest.approx(0.625)
        assert row["retained_ratio_of_means"] == pytest.approx((0.35 + 0.15) / (0.7 + 0.2))
    assert points.loc[("cot", 1.0, "synthetic")]["retained"] == 1.0
    assert points.loc[("all", 0.5, "synthetic")][["retained", "retained_ratio_of_means"]] \
        .isna().all()
    single = points.loc[("all", 0.5, "math500")]
    assert single["interval"] == "normal, from eval stderr" and single["stderr"] == 0.034


def test_grid_points_without_benchmarks_use_overall_accuracy():
    df = hand_frame()
    df = df.drop(columns=[c for c in df if c.startswith(("acc_", "stderr_", "n_", "gen_"))])
    points = grid_points(df)
    assert set(points["benchmark"]) == {"accuracy"}
    assert grid_points(df.iloc[:0]).empty


def test_paper_table_by_hand(tmp_path):
    table = paper_table(hand_frame(), seed=0)
    assert list(table.columns) == [
        "sections", "trunc", "benchmark", "runs", "accuracy (%)", "95% CI low (%)",
        "95% CI high (%)", "interval", "% retained (this benchmark)",
        "% retained, mean of ratios over benchmarks", "% retained, ratio of means over benchmarks",
        "train FLOPs", "train time (s)", "peak memory (MiB)", "tokens trained",
        "tokens supervised", "finished (%)", "gen tokens (mean)"]
    assert table[["finished (%)", "gen tokens (mean)"]].isna().all().all()  # runs predate them
    row = table[(table["sections"] == "cot") & (table["trunc"] == 0.5)
                & (table["benchmark"] == "math500")].iloc[0]
    assert (row["accuracy (%)"], row["95% CI low (%)"], row["95% CI high (%)"]) == (15.0, 10.0,
                                                                                    20.0)
    assert row["% retained (this benchmark)"] == 75.0
    assert row["% retained, mean of ratios over benchmarks"] == 62.5
    assert row["% retained, ratio of means over benchmarks"] == 55.6
    assert row["tokens supervised"] == 75000 and row["peak memory (MiB)"] == 774.4
    assert len(table) == 6  # 3 points x 2 benchmarks; the failed run is not a point
    assert table.equals(paper_table(hand_frame(), seed=0))  # seeded: same table twice
    md = to_markdown(table).splitlines()
    assert len(md) == 2 + len(table) and "ratio of means over benchmarks" in md[0]
    back = pd.read_csv(write_csv(table, tmp_path / "accuracy.csv"))
    assert list(back.columns) == list(table.columns)


def test_paper_table_grouped_columns():
    df = hand_frame()
    df.loc[df["run_id"] == "a2", "loss"] = "reverse_kl"
    table = paper_table(df, group_by="loss")
    assert list(table.columns[:3]) == ["sections", "loss", "trunc"]
    assert set(table["loss"]) == {"forward_kl", "reverse_kl"}


def test_preset_order_is_the_projects():
    from kd_sweeps.sections import SECTION_PRESETS

    assert PRESET_ORDER == tuple(SECTION_PRESETS)
    np.testing.assert_equal(len(PRESET_ORDER), 6)


def test_per_problem_scores_give_a_bootstrap_over_problems():
    rec = record("p", "cot", 1.0, 0.75)
    rec["summary"]["eval/synthetic/per_problem"] = [1, 0, 1, 1]
    df = runs_frame([rec, record("q", "cot", 0.5, 0.5)])
    assert list(df.columns[-5:]) == ["acc_synthetic", "stderr_synthetic", "n_synthetic",
                                     "gen_tokens_synthetic", "per_problem_synthetic"]
    assert df.set_index("run_id").at["p", "per_problem_synthetic"] == [1.0, 0.0, 1.0, 1.0]
    points = grid_points(df).set_index("trunc")
    assert points.at[1.0, "interval"] == "bootstrap over 4 problems"
    assert (points.at[1.0, "ci_low"], points.at[1.0, "ci_high"]) == stats.bootstrap_ci(
        [1, 0, 1, 1], seed=0)
    assert points.at[0.5, "interval"] == "normal, from eval stderr"  # recorded none


def test_the_normal_interval_of_an_accuracy_stays_inside_0_and_1():
    """An accuracy of 2 % with stderr 1.3 % (a few right answers of 132): the normal interval's low
    end would be below 0; clipped, the table and the error bar start at 0 %. Other metrics are not
    bounded."""
    low, high = stats.normal_ci(0.02, 0.013)
    assert low < 0
    clipped = stats.interval([0.02], [0.013], bounds=(0.0, 1.0))
    assert clipped["ci_low"] == 0.0 and clipped["ci_high"] == pytest.approx(high)
    near_one = stats.interval([0.99], [0.013], bounds=(0.0, 1.0))
    assert near_one["ci_high"] == 1.0 and near_one["ci_low"] == pytest.approx(0.99 - Z95 * 0.013)
    assert stats.interval([0.02], [0.013])["ci_low"] == pytest.approx(low)  # unbounded: as computed
    runs = pd.DataFrame({"accuracy": [0.02], "accuracy_stderr": [0.013]})
    assert point_interval(runs, "accuracy")["ci_low"] == 0.0
