"""Tests for the analysis package: stats, loaders, plot and tables."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

os.environ.setdefault("MPLBACKEND", "Agg")  # no screen

from analysis import stats  # noqa: E402
from analysis.load import COLUMNS, load, load_offline_wandb, load_results, runs_frame  # noqa: E402
from analysis.plots import plot_tradeoff, save_figure  # noqa: E402
from analysis.tables import (ACCURACY, FINISHED, GEN_TOKENS, OF_TEACHER, RETAINED,  # noqa: E402
                             summary_table, to_markdown, write_csv)
from tests.analysis_records import RECORDS, record  # noqa: E402


# ----------------------------------------------------------------------------- stats

def test_mean_stderr_by_hand():
    mean, err = stats.mean_stderr([1.0, 2.0, 3.0, 4.0])
    # sample variance = (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3; stderr = sqrt(5/3) / 2
    assert mean == 2.5 and err == pytest.approx(math.sqrt(5 / 3) / 2)
    assert stats.mean_stderr([1.0, None, float("nan"), 3.0]) == (2.0, 1.0)
    assert stats.mean_stderr([5.0])[0] == 5.0 and math.isnan(stats.mean_stderr([5.0])[1])
    assert all(math.isnan(v) for v in stats.mean_stderr([]))


def test_bootstrap_ci_is_seeded():
    values = [0.1, 0.4, 0.35, 0.8, 0.55, 0.6]
    a = stats.bootstrap_ci(values, n_boot=500, seed=3)
    assert a == stats.bootstrap_ci(values, n_boot=500, seed=3)
    assert a != stats.bootstrap_ci(values, n_boot=500, seed=4)
    assert a[0] < np.mean(values) < a[1]
    assert stats.bootstrap_ci([2.0, 2.0, 2.0], n_boot=50) == (2.0, 2.0)
    narrow = stats.bootstrap_ci(values, n_boot=500, level=0.5, seed=3)
    assert a[0] <= narrow[0] <= narrow[1] <= a[1]


def test_retained_by_hand():
    df = pd.DataFrame({
        "sections": ["cot", "cot", "cot", "cot", "ans", "ans", None, None],
        "seed": [1, 1, 2, 3, 1, 1, 1, 1],
        "trunc": [1.0, 0.5, 1.0, 0.5, 0.5, 0.25, 1.0, 0.5],
        "accuracy": [0.8, 0.6, 0.6, 0.35, 0.5, 0.4, 0.5, 0.25],
    })
    got = stats.retained(df)
    # cot seed 1 -> own reference 0.8; seed 3 has none -> mean over seeds (0.8 + 0.6) / 2;
    # ans has no trunc=1.0 run -> NaN; a missing key still matches the missing key.
    expected = [1.0, 0.75, 1.0, 0.5, math.nan, math.nan, 1.0, 0.5]
    np.testing.assert_allclose(got.to_numpy(), expected)
    assert got.index.equals(df.index)


def test_retained_ignores_missing_reference_metric():
    df = pd.DataFrame({"sections": ["cot"] * 2, "trunc": [1.0, 0.5],
                       "accuracy": [float("nan"), 0.4]})
    assert stats.retained(df).isna().all()


def test_pareto_front_by_hand():
    df = pd.DataFrame({"name": list("abcdefg"),
                       "train_flops": [1, 2, 2, 3, 4, 4, np.nan],
                       "accuracy": [0.3, 0.5, 0.4, 0.5, 0.7, 0.7, 0.9]})
    front = stats.pareto_front(df)
    # c is beaten by b (same cost, better); d by b (cheaper, same accuracy);
    # e and f tie and neither dominates; g has no cost.
    assert list(front["name"]) == ["a", "b", "e", "f"]


# ----------------------------------------------------------------------------- loading

def test_runs_frame_types_and_benchmarks():
    df = runs_frame(RECORDS)
    assert list(df.columns[: len(COLUMNS)]) == list(COLUMNS)
    assert {c: str(df[c].dtype) for c in COLUMNS} == COLUMNS
    assert list(df.columns[len(COLUMNS):]) == [
        "acc_aime24", "stderr_aime24", "n_aime24", "gen_tokens_aime24",
        "acc_math500", "stderr_math500", "n_math500", "gen_tokens_math500",
        "acc_synthetic", "stderr_synthetic", "n_synthetic", "gen_tokens_synthetic"]
    assert list(df["run_id"]) == sorted(r["run_id"] for r in RECORDS)
    row = df.set_index("run_id").loc["r_cot_100"]
    assert (row["sections"], row["sections_include"], row["trunc"]) == ("cot", "CoT", 1.0)
    assert (row["truncation_mode"], row["cut_after_think"], row["loss"]) == ("lead", False,
                                                                           "forward_kl")
    assert (row["teacher"], row["student"], row["dataset"]) == ("embedded-teacher",
                                                               "embedded-base", "synthetic")
    assert row["seed"] == 42 and row["n_math500"] == 200
    assert row["acc_math500"] == pytest.approx(0.51)
    assert pd.isna(row["acc_synthetic"])
    failed = df.set_index("run_id").loc["r_fail"]
    assert failed["status"] == "failed" and failed["error"] == "CUDA out of memory"
    assert failed["sections_include"] == "P+CoT+A"
    assert pd.isna(failed["accuracy"]) and pd.isna(failed["tokens_trained"])


def test_runs_frame_survives_missing_and_odd_fields():
    df = runs_frame([{}, {"run_id": "x", "config": None, "summary": None},
                     {"run_id": "y", "config": {"trunc": "0.5", "sections": "cot", "seed": 1.5},
                      "summary": {"eval": {"gsm8k": {"accuracy": 0.3}}, "tokens_trained": "n/a"}}])
    assert len(df) == 3 and list(df.columns[: len(COLUMNS)]) == list(COLUMNS)
    y = df.set_index("run_id").loc["y"]
    assert y["trunc"] == 0.5 and y["sections"] == "cot" and pd.isna(y["seed"])
    assert y["acc_gsm8k"] == 0.3 and pd.isna(y["tokens_trained"])
    empty = runs_frame([])
    assert empty.empty and list(empty.columns) == list(COLUMNS)


def write_sweep(root: Path, records) -> Path:
    sweep = root / "sweep"
    for i, rec in enumerate(records):
        job = sweep / "demo" / str(i)
        job.mkdir(parents=True)
        (job / "result.json").write_text(json.dumps(rec))
    # Hydra bookkeeping and a job that crashed before writing anything are ignored.
    (sweep / "demo" / "multirun.yaml").write_text("hydra: {}\n")
    (sweep / "demo" / "99" / ".hydra").mkdir(parents=True)
    return sweep


def test_load_results(tmp_path):
    sweep = write_sweep(tmp_path, RECORDS)
    (sweep / "demo" / "98").mkdir()
    (sweep / "demo" / "98" / "result.json").write_text("{not json")  # skipped, logged
    df = load_results(sweep)
    pd.testing.assert_frame_equal(df, runs_frame(RECORDS))
    pd.testing.assert_frame_equal(load(sweep), df)


# Runs in a child interpreter so wandb's global state stays out of the test session.
WANDB_WRITER = textwrap.dedent(
    """
    import json, sys
    import wandb

    root, records = sys.argv[1], json.loads(sys.argv[2])
    for rec in records:
        run = wandb.init(mode="offline", dir=root, id=rec["run_id"], group=rec["sweep"],
                         project="kd", config=rec["config"],
                         settings=wandb.Settings(console="off"))
        run.summary.update(rec["summary"])
        if rec["error"]:
            run.summary["error"] = rec["error"]
        run.finish(exit_code=0 if rec["status"] == "ok" else 1)
    """
)


@pytest.fixture(scope="module")
def wandb_root(tmp_path_factory) -> Path:
    pytest.importorskip("wandb")
    root = tmp_path_factory.mktemp("wandb_runs")
    home = tmp_path_factory.mktemp("wandb_home")
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true",
               WANDB_CONFIG_DIR=str(home / "config"), WANDB_CACHE_DIR=str(home / "cache"),
               WANDB_DATA_DIR=str(home / "data"))
    subprocess.run([sys.executable, "-c", WANDB_WRITER, str(root), json.dumps(RECORDS)],
                   env=env, check=True, timeout=120)
    return root


def test_offline_wandb_equals_result_json(wandb_root, tmp_path):
    from_wandb = load_offline_wandb(wandb_root)
    from_json = load_results(write_sweep(tmp_path, RECORDS))
    pd.testing.assert_frame_equal(from_wandb, from_json)
    assert list(from_wandb["status"]) == ["ok", "ok", "ok", "ok", "failed"]
    pd.testing.assert_frame_equal(load(wandb_root), from_wandb)  # no result.json there


def test_offline_wandb_skips_corrupt_log(wandb_root, tmp_path):
    copy = tmp_path / "runs"
    shutil.copytree(wandb_root, copy, symlinks=True)
    (bad,) = copy.glob("wandb/offline-run-*-r_fail/run-r_fail.wandb")
    bad.write_bytes(b"NOTWANDB" + bad.read_bytes()[8:])
    assert list(load_offline_wandb(copy)["run_id"]) == ["r_ca_050", "r_ca_100", "r_cot_050",
                                                         "r_cot_100"]


def test_load_dispatch_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "multirun").mkdir()
    # Looks like entity/project, but its first part is a local folder: a mistyped path.
    with pytest.raises(FileNotFoundError, match="no such directory"):
        load("multirun/typo")
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no result.json"):
        load(tmp_path / "empty")


# ----------------------------------------------------------------------------- plot, tables

def test_plot_tradeoff_and_save(tmp_path):
    df = runs_frame(RECORDS)
    ax = plot_tradeoff(df)
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert sorted(l for l in labels if l != "Pareto frontier") == ["cot", "cot_ans"]
    assert "Pareto frontier" in labels
    assert len(ax.containers) == 2  # one error-bar line per preset, failed preset absent
    assert ax.get_xscale() == "log" and ax.get_xlabel() == "training FLOPs"
    assert ax.get_ylabel() == "accuracy (%)"
    texts = [t.get_text() for t in ax.texts]
    assert sum(t.startswith("trunc=") for t in texts) == 4
    assert any("1 run failed" in t and "r_fail" in t for t in texts)
    line = ax.containers[0].lines[0]
    assert list(line.get_xdata()) == sorted(line.get_xdata())
    paths = save_figure(ax.figure, tmp_path / "figs", "tradeoff")
    assert [p.suffix for p in paths] == [".png", ".pdf"]
    assert all(p.exists() and p.stat().st_size > 0 for p in paths)


def test_summary_table_and_markdown(tmp_path):
    df = runs_frame(RECORDS)
    table = summary_table(df)
    assert list(table.columns) == [
        "trunc", "sections", "train FLOPs", "train time (s)", "peak memory (MiB)",
        "tokens trained", "tokens supervised", ACCURACY, RETAINED, OF_TEACHER, FINISHED,
        GEN_TOKENS]
    # Records from before finished rate, generated tokens and reference accuracies were logged:
    # no reference row, and the new columns are missing values, not errors.
    assert table[[OF_TEACHER, FINISHED, GEN_TOKENS]].isna().all().all()
    assert list(zip(table["sections"], table["trunc"])) == [
        ("cot", 0.5), ("cot", 1.0), ("cot_ans", 0.5), ("cot_ans", 1.0)]
    assert list(table[ACCURACY]) == ["55.0 ± 3.4", "61.0 ± 3.4", "50.0 ± 3.4", "64.0 ± 3.4"]
    np.testing.assert_allclose(table[RETAINED], [90.2, 100.0, 78.1, 100.0])
    assert table["peak memory (MiB)"].iloc[0] == 774.4

    md = to_markdown(table).splitlines()
    assert md[0].startswith("| trunc | sections |") and md[0].endswith(f"| {GEN_TOKENS} |")
    assert md[1].startswith("| ----: | -------- |")
    assert [c.strip() for c in md[2].strip("|").split("|")] == [
        "0.5", "cot", "5e+11", "20.0", "774.4", "300000", "75000", "55.0 ± 3.4", "90.2", "", "",
        ""]
    assert len(md) == 2 + len(table)
    back = pd.read_csv(write_csv(table, tmp_path / "summary.csv"))
    assert list(back.columns) == list(table.columns) and len(back) == 4


def test_summary_table_shows_varying_settings():
    table = summary_table(runs_frame([record("a", seed=1), record("b", seed=2),
                                      record("c", trunc=0.5, seed=1, acc=0.3)]))
    assert "seed" in table.columns and list(table["seed"]) == [1, 1, 2]
    assert table[RETAINED].tolist() == [50.0, 100.0, 100.0]
    assert to_markdown(pd.DataFrame({"a|b": ["x|y", None]})).splitlines()[2] == "| x\\|y |"


def test_custom_presets_stay_apart():
    a, b = record("a", trunc=0.5), record("b", trunc=0.5, acc=0.4)
    for rec, include in ((a, ["P"]), (b, ["P", "A"])):
        rec["config"]["sections"] = {"name": "custom", "include": include}
    df = runs_frame([a, b])
    ax = plot_tradeoff(df)
    labels = sorted(t.get_text() for t in ax.get_legend().get_texts())
    assert [label for label in labels if label != "Pareto frontier"] == [
        "custom (P)", "custom (P+A)"]
    assert list(summary_table(df)["sections_include"]) == ["P", "P+A"]
