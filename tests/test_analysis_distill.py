"""Distillation modes in the analysis: the generation costs as typed columns, one curve per
``distill.mode`` at its total FLOPs (training + generation) at the end of a sweep and in the CLI,
the generation columns of the tables, and the comparability check over the distill.* keys."""

from __future__ import annotations

import logging
import os

import pandas as pd
import pytest

os.environ.setdefault("MPLBACKEND", "Agg")  # no screen

from analysis.checks import check_comparable, sweep_curves, varying_keys  # noqa: E402
from tests.helpers import point_folders  # noqa: E402
from analysis.load import COLUMNS, runs_frame  # noqa: E402
from analysis.plots import cost_column, plot_tradeoff  # noqa: E402
from analysis.tables import GEN_FLOPS, RETAINED, summary_frame, summary_table  # noqa: E402
from tests.analysis_records import record  # noqa: E402

# conf/distill/*.yaml over the schema's defaults: what a run's resolved config records.
PRESETS = {
    "offline": {"lmbda": 0.0, "temperature": 1.0},
    "on_policy": {"lmbda": 0.5, "temperature": 1.0},
    "sequence": {"lmbda": 0.0, "temperature": 0.0},
}
TRUNCS = (0.5, 1.0)


def distill_record(mode: str, trunc: float, acc: float = 0.6, run_id: str | None = None,
                   **distill) -> dict:
    """A record as the trainer writes it with distill.mode: the costs of kd_sweeps.recipe.distill_cost."""
    train = 1e12 * trunc
    rec = record(run_id or f"{mode}-{trunc}", "all", trunc, acc, flops=train)
    rec["config"]["distill"] = {"mode": mode, **PRESETS[mode], "top_p": 1.0, "top_k": 0,
                                "max_new_tokens": None, "batch_size": 64, **distill}
    summary = rec["summary"]
    summary["distill_mode"] = mode
    if mode == "on_policy":  # rollouts: half the steps, as long as trunc x the reference completion
        summary.update(generation_flops=4e11 * trunc, generated_tokens=int(50_000 * trunc), rollout_steps=50,
                       rollouts=800, generation_time_s=12.0, rollouts_without_target=0)
    if mode == "sequence":  # the teacher's sequences: one build, the same cost on every point
        summary.update(sequence_generation_flops=3e12, sequences_built_here=trunc == TRUNCS[0])
    summary["total_flops"] = train + summary.get("generation_flops", 0) + summary.get("sequence_generation_flops", 0)
    return rec


def three_modes() -> list[dict]:
    return [distill_record(mode, trunc, acc=0.4 + 0.1 * i + 0.2 * trunc)
            for i, mode in enumerate(PRESETS) for trunc in TRUNCS]


def test_generation_costs_are_typed_columns():
    df = runs_frame(three_modes())
    for col in ("distill_mode", "generation_flops", "generated_tokens", "sequence_generation_flops",
                "total_flops"):
        assert col in COLUMNS and str(df[col].dtype) == COLUMNS[col], col
    rows = df.set_index("run_id")
    assert rows.loc["on_policy-0.5", "generation_flops"] == 2e11
    assert rows.loc["on_policy-0.5", "generated_tokens"] == 25_000
    assert rows.loc["on_policy-0.5", "total_flops"] == 5e11 + 2e11
    assert rows.loc["sequence-1.0", "total_flops"] == 1e12 + 3e12
    assert pd.isna(rows.loc["offline-1.0", "generation_flops"]) and rows.loc["offline-1.0", "distill_mode"] == "offline"
    # A run that predates distill.mode: NaN, not an error; the summary's key stands in for a config without it.
    old = record("old")
    assert runs_frame([old])[["distill_mode", "total_flops"]].isna().all().all()
    del old["config"]["loss"]
    old["summary"]["distill_mode"] = "offline"
    assert runs_frame([old])["distill_mode"].iloc[0] == "offline"


def test_a_negative_or_malformed_generation_cost_is_a_warning(caplog):
    bad = distill_record("on_policy", 0.5, run_id="bad")
    bad["summary"].update(generation_flops=-1.0, total_flops="lots")
    with caplog.at_level(logging.WARNING, logger="analysis.load"):
        row = runs_frame([bad]).iloc[0]
    assert pd.isna(row["generation_flops"]) and pd.isna(row["total_flops"])
    assert "summary generation_flops=-1.0 is negative; left out" in caplog.text
    assert "summary total_flops='lots' is not a number; left out" in caplog.text


def test_three_modes_are_three_curves_at_their_total_flops():
    df = runs_frame(three_modes())
    # The presets set lmbda and temperature with the mode: they split no further.
    assert {"distill.mode", "distill.lmbda", "distill.temperature"} <= set(varying_keys(df))
    assert sweep_curves(df) == ["distill_mode"]
    assert cost_column(df) == "total_flops" and cost_column(runs_frame([record("a")])) == "train_flops"
    ax = plot_tradeoff(df, x=cost_column(df), group_by=sweep_curves(df))
    assert len(ax.containers) == 3
    assert sorted(ax.get_legend_handles_labels()[1]) == [
        "Pareto frontier", "all · distill_mode=offline", "all · distill_mode=on_policy", "all · distill_mode=sequence"]
    assert ax.get_xlabel() == "total FLOPs (training + generation)"
    drawn = sorted(x for c in ax.containers for x in c.lines[0].get_xdata())
    assert drawn == sorted(df["total_flops"])  # one run per point: its own total
    # Mixing modes in one curve is refused, naming the key.
    with pytest.raises(ValueError, match="distill.mode"):
        check_comparable(df)


def test_distill_keys_are_compared_within_a_mode():
    runs = three_modes() + [distill_record("on_policy", 0.5, run_id="lmbda1", lmbda=1.0)]
    df = runs_frame(runs)
    assert "distill.lmbda" in sweep_curves(df)  # a sweep over lmbda: a curve per value
    with pytest.raises(ValueError, match="distill.lmbda takes 2 values"):
        check_comparable(df, ["distill_mode"])
    check_comparable(df, sweep_curves(df))


def test_tables_show_generation_only_where_some_run_has_it():
    df = runs_frame(three_modes())
    table = summary_table(df)
    assert list(table.columns[:5]) == ["trunc", "sections", "distill_mode", "train FLOPs", GEN_FLOPS]
    gen = dict(zip(table["distill_mode"] + "-" + table["trunc"].astype(str), table[GEN_FLOPS]))
    assert gen == {"offline-0.5": 0.0, "offline-1.0": 0.0, "on_policy-0.5": 2e11, "on_policy-1.0": 4e11,
                   "sequence-0.5": 3e12, "sequence-1.0": 3e12}
    # % retained is over the trunc=1.0 run of the same mode: on_policy 0.6 / 0.7.
    retained = dict(zip(table["distill_mode"] + "-" + table["trunc"].astype(str), table[RETAINED]))
    assert retained["on_policy-0.5"] == round(100 * 0.6 / 0.7, 1) and retained["sequence-0.5"] == round(100 * 0.7 / 0.8, 1)
    offline = runs_frame([distill_record("offline", t) for t in TRUNCS])
    assert GEN_FLOPS not in summary_table(offline) and GEN_FLOPS not in summary_table(runs_frame([record("a")]))
    frame = summary_frame(df).set_index("run_id")
    assert frame.loc["on_policy-1.0", ["generation_flops", "sequence_generation_flops", "total_flops"]].tolist() \
        == [4e11, 0.0, 1.4e12]
    assert frame.loc["sequence-0.5", ["generation_flops", "sequence_generation_flops"]].tolist() == [0.0, 3e12]
    assert frame.loc["offline-0.5", "distill_mode"] == "offline"
    old = summary_frame(runs_frame([record("a")]))
    assert old[["generation_flops", "total_flops"]].iloc[:1].isna().all().all()  # predates them: unknown


def test_end_of_sweep_draws_one_curve_per_mode_at_total_flops(tmp_path, monkeypatch):
    import analysis.plots
    from kd_sweeps.callbacks import summarize_sweep

    drawn = []
    real = analysis.plots.plot_tradeoff

    def spy(*args, **kwargs):
        drawn.append(real(*args, **kwargs))
        return drawn[-1]

    monkeypatch.setattr(analysis.plots, "plot_tradeoff", spy)
    markdown, png = summarize_sweep(tmp_path, point_folders(tmp_path, three_modes()), title="modes")
    assert png is not None and png.exists()
    ax = drawn[0]
    assert len(ax.containers) == 3 and ax.get_xlabel() == "total FLOPs (training + generation)"
    assert f"| {GEN_FLOPS} |" in markdown.splitlines()[0]  # the header
    csv = pd.read_csv(tmp_path / "summary.csv")
    assert {"generation_flops", "total_flops", "distill_mode"} <= set(csv.columns)


def test_the_cli_draws_total_flops(tmp_path, capsys):
    from analysis.cli import main

    sweep = tmp_path / "sweep"
    sweep.mkdir()
    point_folders(sweep, three_modes())
    assert main(["tradeoff", str(sweep), "--out", str(tmp_path / "a"), "--x", "total_flops"]) == 0
    out = capsys.readouterr().out
    assert "one curve per mode (--group-by distill_mode)" in out and (tmp_path / "a" / "tradeoff.png").exists()
    assert GEN_FLOPS in out
