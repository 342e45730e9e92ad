"""The paper's figures from fixtures made in code, the example from a real tokenized
sequence, and the refusal to mix incomparable runs."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest

os.environ.setdefault("MPLBACKEND", "Agg")  # no screen

from analysis.checks import COMPARABLE, check_comparable  # noqa: E402
from analysis.figures import (figure_sections, figure_tradeoff, figure_truncation,  # noqa: E402
                              plot_sections, plot_vs_trunc)
from analysis.aggregate import grid_points  # noqa: E402
from analysis.load import runs_frame  # noqa: E402
from analysis.plots import plot_tradeoff, save_figure  # noqa: E402
from tests.analysis_records import TRUNCS, paper_records, record  # noqa: E402

MISSING = ["job 7: trunc=0.25 sections=ans"]


@pytest.fixture(scope="module")
def df() -> pd.DataFrame:
    return runs_frame(paper_records())


def _footnotes(fig) -> str:
    return "\n".join(t.get_text() for t in fig.texts)


def test_figure_tradeoff(df):
    fig = figure_tradeoff(df, missing=MISSING)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and len(ax.containers) == 3
    notes = "\n".join(t.get_text() for t in ax.texts)
    assert "1 run failed, not shown: broken" in notes
    assert ("1 grid point of the sweep without a finished run: job 7: trunc=0.25 sections=ans"
            in notes)


def test_figure_sections(df):
    fig = figure_sections(df, missing=MISSING)
    assert [ax.get_title() for ax in fig.axes] == ["math500", "synthetic"]
    ax = fig.axes[1]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["all", "cot", "cot_ans"]  # paper order
    heights = [bar.get_height() for bar in ax.patches]
    # At trunc=1.0 preset p scores 0.6 + 0.1 p + 0.03 (mean of seeds 1, 2).
    np.testing.assert_allclose(heights, [73, 83, 63])  # in %
    assert "without a finished run" in _footnotes(fig) and "broken" in _footnotes(fig)
    half = figure_sections(df, trunc=0.5)
    np.testing.assert_allclose([b.get_height() for b in half.axes[1].patches],
                               [58, 68, 48])
    with pytest.raises(ValueError, match="no finished run at trunc=0.75"):
        figure_sections(df, trunc=0.75)


def test_figure_truncation(df):
    fig = figure_truncation(df, missing=MISSING)
    acc, kept, time_ax, memory, flops, legend_ax = fig.axes
    assert len(acc.lines) >= 3 and acc.get_legend() is None
    assert [t.get_text() for t in legend_ax.get_legend().get_texts()] == ["all", "cot", "cot_ans"]
    for line in kept.lines[:3]:  # one per preset; 100 % at trunc=1.0 by definition
        assert list(line.get_xdata()) == list(TRUNCS) and line.get_ydata()[-1] == pytest.approx(100)
    # all (p=1) at 0.25: synthetic 0.505 / 0.73, math500 0.405 / 0.63; ratio of means:
    assert kept.lines[0].get_ydata()[0] == pytest.approx(100 * 0.91 / 1.36)
    assert memory.lines[0].get_ydata() == pytest.approx([2e8 * 1.25 / 2**20, 2e8 * 1.5 / 2**20,
                                                         2e8 * 2 / 2**20])
    assert "MiB" in memory.get_ylabel() and "FLOPs" in flops.get_ylabel()
    assert "time" in time_ax.get_ylabel() and "without a finished run" in _footnotes(fig)
    other = figure_truncation(df, retained_average="mean_of_ratios")
    assert other.axes[1].lines[0].get_ydata()[0] == pytest.approx(
        100 * (0.505 / 0.73 + 0.405 / 0.63) / 2)
    with pytest.raises(ValueError, match="retained_average"):
        figure_truncation(df, retained_average="median")


def test_plotters_take_and_return_axes(df):
    from matplotlib.figure import Figure

    points = grid_points(df)
    axes = Figure().subplots(1, 3)
    assert plot_sections(points[points["trunc"] == 1.0], "synthetic", ax=axes[0]) is axes[0]
    assert plot_vs_trunc(points, "train_flops", ax=axes[1]) is axes[1]
    assert plot_tradeoff(df, ax=axes[2]) is axes[2]
    assert plot_vs_trunc(points, "mean").figure is not axes[0].figure  # ax=None: a new one


def test_save_every_figure(df, tmp_path):
    paths = []
    for name, fig in (("tradeoff", figure_tradeoff(df)), ("sections", figure_sections(df)),
                      ("truncation", figure_truncation(df))):
        paths += save_figure(fig, tmp_path, name)
    assert sorted(p.name for p in paths) == sorted(
        f"{n}.{e}" for n in ("tradeoff", "sections", "truncation") for e in ("png", "pdf"))
    assert all(p.stat().st_size > 1000 for p in paths)


# ----------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("column", COMPARABLE)
def test_refuses_runs_that_differ_within_a_curve(df, column):
    mixed = df.copy()
    other = {"kd_ratio": 0.9, "temperature": 2.0, "cut_after_think": True}.get(column, "other")
    mixed.loc[mixed["run_id"] == "cot-0.5-2", column] = other
    with pytest.raises(ValueError, match=f"differ in {column} within one curve") as err:
        check_comparable(mixed)
    message = str(err.value)
    assert "curve 'cot'" in message and repr(str(other)) in message
    assert f"--group-by {column}" in message
    check_comparable(mixed, group_by=column)  # grouped: each value is its own curve
    ax = plot_tradeoff(mixed, group_by=[column])
    assert len(ax.containers) == 4  # cot split in two


def test_refusal_names_every_differing_column(df):
    mixed = df.copy()
    mixed.loc[mixed["sections"] == "cot", "teacher"] = "qwen3-8b"
    mixed.loc[mixed["run_id"] == "all-1.0-1", ["student", "dataset"]] = ["x", "y"]
    with pytest.raises(ValueError, match="differ in student, dataset within one curve"):
        check_comparable(mixed)  # teacher differs between curves only: allowed


def test_every_figure_refuses(df):
    mixed = df.copy()
    mixed.loc[mixed["run_id"] == "cot-1.0-1", "loss"] = "reverse_kl"
    for draw in (plot_tradeoff, figure_tradeoff, figure_sections, figure_truncation):
        with pytest.raises(ValueError, match="differ in loss"):
            draw(mixed)


def test_refusal_ignores_failed_runs_and_unknown_group_by(df):
    mixed = df.copy()
    mixed.loc[mixed["run_id"] == "broken", "teacher"] = "other"
    check_comparable(mixed)  # the failed run is not drawn
    with pytest.raises(ValueError, match="group_by column 'nope'"):
        check_comparable(df, group_by="nope")


# ----------------------------------------------------------------------------- example

def test_example_from_a_real_tokenized_sequence(tmp_path):
    from analysis.example import example_from_config, example_from_run, figure_of
    from kd_sweeps.data import encode
    from kd_sweeps.synthetic import make_split
    from kd_sweeps.tokenizer import build_tokenizer

    example = example_from_config(seed=7, trunc=0.5, sections=("CoT", "A"))
    tokenizer = build_tokenizer()
    (encoded,), _ = encode(make_split(1, 7), tokenizer, 4096)
    assert example.tokens == tokenizer.convert_ids_to_tokens(encoded.input_ids)
    assert example.spans == encoded.spans
    assert example.window == (0, len(example.tokens) // 2)
    prompt_end = example.spans.prompt[1]
    assert not any(example.supervised[:prompt_end]) and all(example.supervised[prompt_end:])

    fig = figure_of(example)
    ax = fig.axes[0]
    boxes = [p for p in ax.patches if p.get_height() == 0.8]
    assert len(boxes) == len(example.tokens)
    faded = [p for p in boxes if p.get_alpha() < 1]
    assert len(faded) == len(example.tokens) - example.window[1]  # after the cut
    assert any(line.get_color() == "red" for line in ax.lines)  # the cut
    assert [t.get_text() for t in ax.get_legend().get_texts()][:3] == ["P", "CoT", "A"]
    assert save_figure(fig, tmp_path, "example")[0].stat().st_size > 1000

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = record("r", "cot_ans", 0.25)["config"]
    config["data"] = {"source": "synthetic", "seed": 7, "min_steps": 2, "max_steps": 12,
                      "max_tokens": 4096}
    (run_dir / "result.json").write_text(json.dumps({"run_id": "r", "config": config}))
    tokenizer.save_pretrained(run_dir / "checkpoint")  # the run's own tokenizer is used
    from_run = example_from_run(run_dir)
    assert from_run.tokens == example.tokens and from_run.window[1] == len(example.tokens) // 4
    assert from_run.origin.startswith("run r: first training problem") and "seed 7" in \
        from_run.origin
    config["data"]["source"] = "json"
    (run_dir / "result.json").write_text(json.dumps({"config": config}))
    with pytest.raises(ValueError, match="synthetic"):
        example_from_run(run_dir)


def test_example_refuses_a_task_its_tokenizer_does_not_know(monkeypatch):
    """A run's saved tokenizer that meets unknown words: the task changed since the run."""
    import kd_sweeps.synthetic
    from analysis.example import example_from_config

    record = dict(kd_sweeps.synthetic.make_split(1, 0)[0])
    record["problem"] = "Zyzzyva " + record["problem"]
    monkeypatch.setattr(kd_sweeps.synthetic, "make_split", lambda *args: [record])
    with pytest.raises(ValueError, match="1 tokens .* unknown .* task changed"):
        example_from_config(seed=0)


def test_first_record_is_the_runs_first_training_example():
    """example_from_config regenerates one problem; the run draws the same one first."""
    from omegaconf import OmegaConf

    from kd_sweeps.data import load_records
    from kd_sweeps.synthetic import make_split

    data = OmegaConf.create({"source": "synthetic", "n_train": 50, "n_test": 5, "seed": 3,
                             "min_steps": 2, "max_steps": 12})
    assert load_records(data, "train")[0] == make_split(1, 3)[0]
