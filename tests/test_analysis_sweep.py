"""A researcher's loop over one sweep folder: the numeric summary CSV, one figure convention
(accuracy in %, 95 % intervals said in a caption, references, a visible Pareto frontier), the
window figure, summaries that cover every launch of a sweep, and the sweep's W&B summary run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

os.environ.setdefault("MPLBACKEND", "Agg")  # no screen

from analysis.grid import expected_grid, grid_status, latest_launch_runs  # noqa: E402
from analysis.load import runs_frame  # noqa: E402
from analysis.plots import FRONT_LABEL, plot_tradeoff  # noqa: E402
from analysis.stats import normal_ci  # noqa: E402
from analysis.tables import LATEST, paper_frame, summary_frame, summary_table  # noqa: E402
from analysis.windows import figure_windows, varies_windows  # noqa: E402
from tests.analysis_records import RUNS, TEACHER, FakeApi, FakeRun, record  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- numeric CSV

def test_summary_frame_is_numeric_with_units_in_the_names(tmp_path):
    frame = summary_frame(runs_frame(RUNS))
    assert list(frame["role"]) == ["grid_point"] * 5 + ["teacher", "base_student"]
    assert all(c == c.lower() and " " not in c for c in frame.columns)
    for col in ("accuracy_pct", "accuracy_stderr_pct", "accuracy_ci_low_pct",
                "accuracy_ci_high_pct", "train_flops", "train_time_s", "peak_memory_mib",
                "retained_pct", "pct_of_teacher", "finished_pct", "trunc", "seed"):
        assert pd.api.types.is_numeric_dtype(frame[col]), col
    points = frame[frame["role"] == "grid_point"].set_index("run_id")
    row = points.loc["all-050"]
    # One run, no per-problem scores: the normal 95 % interval from its eval stderr (3.4 %).
    low, high = normal_ci(0.30, 0.034)
    assert (row["accuracy_pct"], row["accuracy_stderr_pct"]) == (30.0, 3.4)
    assert row["accuracy_ci_low_pct"] == pytest.approx(100 * low, abs=1e-4)
    assert row["accuracy_ci_high_pct"] == pytest.approx(100 * high, abs=1e-4)
    assert row["accuracy_interval"] == "normal, from eval stderr"
    assert row["pct_of_teacher"] == pytest.approx(100 * 0.30 / TEACHER, abs=1e-4)
    assert row["seed"] == 42 and row["sections"] == "all" and row["acc_synthetic_pct"] == 30.0
    teacher = frame[frame["role"] == "teacher"].iloc[0]
    assert (teacher["accuracy_pct"], teacher["pct_of_teacher"]) == (88.7, 100.0)
    assert pd.isna(teacher["sections"]) and teacher["teacher"] == "embedded-teacher"
    frame.to_csv(tmp_path / "summary.csv", index=False)
    back = pd.read_csv(tmp_path / "summary.csv")
    assert back["accuracy_pct"].dtype == float and back["run_id"].iloc[0] == "all-025"


def test_paper_frame_is_numeric_and_has_reference_rows():
    frame = paper_frame(runs_frame(RUNS))
    assert list(frame["role"].unique()) == ["grid_point", "teacher", "base_student"]
    points = frame[frame["role"] == "grid_point"]
    assert points[["accuracy_pct", "accuracy_ci_low_pct", "accuracy_ci_high_pct",
                   "retained_pct", "peak_memory_mib"]].dtypes.map(
        pd.api.types.is_numeric_dtype).all()
    assert (points["accuracy_ci_low_pct"] < points["accuracy_pct"]).all()
    assert list(points["run_ids"]) == ["all-025", "all-050", "all-100", "cot-050", "cot-100"]


# ----------------------------------------------------------------------------- figures

def test_tradeoff_in_percent_with_caption_references_and_a_visible_front():
    ax = plot_tradeoff(runs_frame(RUNS))
    assert ax.get_ylabel() == "accuracy (%)"
    curve = ax.containers[0]
    assert np.asarray(curve.lines[0].get_ydata(), dtype=float).max() > 1  # in %, not a share
    # Error bars: the 95 % interval (±1.96 stderr), not ±1 stderr.
    segments = curve.lines[2][0].get_segments()
    assert segments[0][1][1] - segments[0][0][1] == pytest.approx(2 * 1.96 * 3.4, abs=0.01)
    front = next(line for line in ax.get_lines() if line.get_label() == FRONT_LABEL)
    assert front.get_zorder() > curve.lines[0].get_zorder()
    notes = "\n".join(t.get_text() for t in ax.texts)
    assert "error bars: 95% intervals (normal, from eval stderr) over 200 problems" in notes
    assert "embedded-base ← embedded-teacher" in ax.get_title() and "synthetic" in ax.get_title()
    assert {"teacher: 88.7%", "base student before KD: 25.4%"} <= {
        line.get_label() for line in ax.get_lines()}


def window_records() -> list[dict]:
    """paper_windows-shaped runs: lead / middle / right windows at three truncs, one seed."""
    records = []
    for m, mode in enumerate(("right", "lead", "middle")):  # not in the sequence's order
        for trunc in (0.25, 0.5, 1.0):
            rec = record(f"{mode}-{trunc}", "all", trunc, 0.2 + 0.5 * trunc - 0.05 * m)
            rec["config"]["truncation"]["mode"] = mode
            rec["summary"].update(teacher_accuracy=0.8, base_accuracy=0.1)
            rec["overrides"].append(f"truncation.mode={mode}")
            records.append(rec)
    return records


def test_window_figure():
    df = runs_frame(window_records())
    assert varies_windows(df) and not varies_windows(runs_frame(RUNS))
    fig = figure_windows(df)
    ax = fig.axes[0]
    curves = {c.get_label(): c.lines[0] for c in ax.containers}
    assert list(curves) == ["lead", "middle", "right"]  # the order of the sequence
    middle = np.asarray(curves["middle"].get_ydata(), dtype=float)
    np.testing.assert_allclose(middle, [100 * (0.2 + 0.5 * t - 0.1) for t in (0.25, 0.5, 1.0)])
    xs = np.asarray(curves["lead"].get_xdata(), dtype=float)
    assert np.abs(xs - [0.25, 0.5, 1.0]).max() < 0.02  # spread a little, ticks stay true
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0.25", "0.5", "1"]
    assert {"teacher: 80.0%", "base student before KD: 10.0%"} <= {
        line.get_label() for line in ax.get_lines()}
    assert "error bars: 95% intervals" in "\n".join(t.get_text() for t in ax.texts)
    assert "truncation.mode" in ax.get_title()
    with pytest.raises(ValueError, match="truncation.mode"):
        figure_windows(runs_frame(RUNS).assign(truncation_mode=pd.NA))


@pytest.mark.slow  # every paper figure as PNG and PDF, and the example: about 5 s on 2 cores
def test_paper_command_draws_the_windows_of_a_window_sweep(tmp_path, capsys):
    from analysis.cli import main

    sweep = tmp_path / "paper_windows"
    for rec in window_records():
        (sweep / rec["run_id"]).mkdir(parents=True)
        (sweep / rec["run_id"] / "result.json").write_text(json.dumps(rec))
    out = tmp_path / "figures"
    assert main(["paper", str(sweep), "--out", str(out)]) == 0
    assert "one curve per mode (--group-by truncation_mode)" in capsys.readouterr().out
    assert (out / "windows.png").stat().st_size > 0
    accuracy = pd.read_csv(out / "accuracy.csv")
    points = accuracy[accuracy["role"] == "grid_point"]
    assert sorted(set(points["truncation_mode"])) == ["lead", "middle", "right"]
    assert points["accuracy_ci_low_pct"].dtype == float and len(points) == 9


# ----------------------------------------------------------------------------- sweep folder

def _launch_file(grid: list[str]) -> str:
    multirun = {"hydra": {"sweeper": {"params": None},
                          "overrides": {"hydra": ["hydra.mode=MULTIRUN"], "task": grid}},
                "sweep": "demo"}
    return json.dumps(multirun)  # JSON is valid YAML


def sweep_folder(root: Path) -> Path:
    """Two launches of sweep demo: trunc=0.5,1.0 sections=cot first, then only trunc=0.25,0.5
    (the latest, also in multirun.yaml); three points ran, one per trunc."""
    sweep = root / "demo"
    (sweep / "launches").mkdir(parents=True)
    first = _launch_file(["trunc=0.5,1.0", "sections=cot", "sweep=demo"])
    latest = _launch_file(["trunc=0.25,0.5", "sections=cot", "sweep=demo"])
    (sweep / "launches" / "2026-12-01T100000.000000Z-multirun.yaml").write_text(first)
    (sweep / "launches" / "2026-12-02T100000.000000Z-multirun.yaml").write_text(latest)
    (sweep / "multirun.yaml").write_text(latest)
    for trunc, acc in ((0.25, 0.3), (0.5, 0.45), (1.0, 0.6)):
        rec = record(f"p{trunc:g}", "cot", trunc, acc, flops=1e12 * trunc)
        (sweep / rec["run_id"]).mkdir()
        (sweep / rec["run_id"] / "result.json").write_text(json.dumps(rec))
    return sweep


def test_expected_grid_is_the_union_of_the_launches(tmp_path):
    sweep = sweep_folder(tmp_path)
    grid = expected_grid(sweep)
    assert [(p["trunc"], p.latest) for p in grid] == [(0.25, True), (0.5, True), (1.0, False)]
    df = runs_frame([json.loads(p.read_text()) for p in sorted(sweep.glob("*/result.json"))])
    status = grid_status(df, sweep)
    assert list(status["latest_launch"]) == [True, True, False]
    assert list(status["status"]) == ["ok", "ok", "ok"]
    assert list(grid_status(df[df["run_id"] != "p1"], sweep)["status"]) == ["ok", "ok", "missing"]
    assert list(latest_launch_runs(df, sweep)) == [True, True, False]  # p0.25, p0.5, p1
    (sweep / "multirun.yaml").unlink()  # the newest kept launch is then the latest
    assert [p.latest for p in expected_grid(sweep)] == [True, True, False]


def test_sweep_summary_covers_every_point_and_marks_the_latest_launch(tmp_path):
    from kd_sweeps.callbacks import summarize_sweep

    sweep = sweep_folder(tmp_path)
    markdown, png = summarize_sweep(sweep, title="sweep demo")
    assert png is not None and png.stat().st_size > 0
    csv = pd.read_csv(sweep / "summary.csv")
    points = csv[csv["role"] == "grid_point"]
    assert list(points["trunc"]) == [0.25, 0.5, 1.0]  # every point folder, not one launch's
    assert list(points["latest_launch"]) == [True, True, False]
    assert "3 finished point(s) in the sweep folder; 2 of them (✓) in the latest launch" in markdown
    rows = [line for line in markdown.splitlines() if "| cot " in line]
    assert [line.startswith("| ✓") for line in rows] == [True, True, False]
    table = summary_table(runs_frame([record("x", "cot", 0.5)]))
    assert LATEST not in table  # outside a sweep folder: no mark column


def test_each_launch_keeps_its_grid(tmp_path):
    import datetime as dt

    from analysis.grid import launch_files
    from kd_sweeps.callbacks import keep_launch, keep_unkept_launch

    sweep = tmp_path / "s"
    sweep.mkdir()
    assert keep_launch(sweep) is None  # no multirun.yaml: nothing to keep
    (sweep / "multirun.yaml").write_text(_launch_file(["trunc=0.5"]))
    kept = keep_launch(sweep, dt.datetime(2026, 12, 1, 10, tzinfo=dt.timezone.utc))
    assert kept.name == "2026-12-01T100000.000000Z-multirun.yaml"
    assert kept.read_text() == (sweep / "multirun.yaml").read_text()
    assert keep_unkept_launch(sweep) is None  # already kept by its launch's end
    (sweep / "multirun.yaml").write_text(_launch_file(["trunc=1.0"]))  # an interrupted launch
    assert keep_unkept_launch(sweep) is not None and len(launch_files(sweep)) == 2


# ----------------------------------------------------------------------------- W&B summary run

def test_online_loader_leaves_summary_runs_out():
    from analysis.online import load_online

    runs = [FakeRun(rec) for rec in (record("a", "cot", 0.5), record("b", "cot", 1.0))]
    summary = FakeRun(dict(record("sumrun", "cot", 1.0), summary={}))
    summary.job_type = "summary"  # what the public API's Run gives for the sweep's summary run
    df = load_online("team/kd", api=FakeApi([runs[0], summary, runs[1]]))
    assert list(df["run_id"]) == ["a", "b"]


# In a child interpreter, so wandb's global state never leaks into the test session.
WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import wandb
    from kd_sweeps.callbacks import log_wandb_summary, summarize_sweep

    sweep = Path(sys.argv[1])
    point = sweep / "p0.5"  # one point's own run, as kd_sweeps.tracking writes it
    run = wandb.init(mode="offline", dir=point, project="p", group="demo", job_type="train",
                     id="p0.5-demo", config={"trunc": 0.5}, settings=wandb.Settings(console="off"))
    run.summary["accuracy"] = 0.45
    run.finish()
    markdown, png = summarize_sweep(sweep, title="sweep demo")
    logger = {"mode": "offline", "project": "p", "entity": None, "tags": []}
    print(log_wandb_summary(sweep, "demo", logger, png))
    print(log_wandb_summary(sweep, "demo", {"mode": "disabled"}, png))
    """
)


@pytest.mark.slow  # two real wandb runs in a child interpreter: about 3 s on 2 cores
def test_wandb_summary_run_holds_the_table_and_is_not_a_point(tmp_path):
    pytest.importorskip("wandb")
    from analysis.load import load_offline_wandb
    from analysis.wandb_offline import find_runs, read_run, read_runs

    sweep = sweep_folder(tmp_path)
    env = dict(os.environ, WANDB_SILENT="true", WANDB_MODE="offline", MPLBACKEND="Agg")
    proc = subprocess.run([sys.executable, "-c", WRITER, str(sweep)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir, disabled = proc.stdout.strip().splitlines()[-2:]
    assert disabled == "None"  # logger.mode=disabled: no summary run
    summary = read_run(run_dir)
    assert (summary.job_type, summary.group, summary.state) == ("summary", "demo", "finished")
    assert summary.summary["summary"]["_type"] == "table-file"
    assert summary.summary["tradeoff"]["_type"] == "image-file"
    table = json.loads((Path(run_dir) / "files" / summary.summary["summary"]["path"]).read_text())
    csv = pd.read_csv(sweep / "summary.csv")
    assert table["columns"] == list(csv.columns) and len(table["data"]) == len(csv)
    assert len(find_runs(sweep)) == 2  # the point's run and the summary run
    assert [r.run_id for r in read_runs(sweep)] == ["p0.5-demo"]
    assert len(read_runs(sweep, summaries=True)) == 2
    assert list(load_offline_wandb(sweep)["run_id"]) == ["p0.5"]  # not counted as a grid point


def _fake_point(cfg) -> dict:
    """A Hydra task standing in for kd_sweeps.run.main: it writes the result.json a point writes
    and returns its outcome as the project's launchers expect (no training)."""
    from hydra.core.hydra_config import HydraConfig

    from kd_sweeps.record_files import now_iso

    out = Path(HydraConfig.get().runtime.output_dir)
    rec = record(out.name, "cot", cfg.trunc, 0.3 + 0.3 * cfg.trunc, flops=1e12 * cfg.trunc)
    rec.update(overrides=list(HydraConfig.get().overrides.task), launched_at=now_iso(),
               last_action="ran")
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(rec))
    return {"outcome": "ran", "point": str(out), "status": "ok", "error": None, "summary": {}}


@pytest.mark.slow  # two real Hydra launches of the project's config: about 3 s on 2 cores
def test_relaunching_one_point_keeps_the_whole_sweep_in_its_summary(tmp_path, capsys):
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path
    from hydra.core.global_hydra import GlobalHydra

    from kd_sweeps.schema import register_configs

    sweep = tmp_path / "demo"
    register_configs()
    for grid in ("trunc=0.25,0.5,1.0", "trunc=0.5"):  # the sweep, then one of its points again
        GlobalHydra.instance().clear()
        try:
            hydra = Hydra.create_main_hydra2(
                task_name="launch", config_search_path=create_config_search_path(str(ROOT / "conf")))
            hydra.multirun(config_name="config", task_function=_fake_point,
                           with_log_configuration=False,
                           overrides=[grid, "sweep=demo", "logger=disabled", f"hydra.sweep.dir={sweep}"])
        finally:
            GlobalHydra.instance().clear()
    out = capsys.readouterr().out
    assert "1 grid point(s): 1 ran, 0 skipped" in out  # the counts are this launch's
    assert len(list((sweep / "launches").glob("*-multirun.yaml"))) == 2
    csv = pd.read_csv(sweep / "summary.csv")
    points = csv[csv["role"] == "grid_point"]
    assert list(points["trunc"]) == [0.25, 0.5, 1.0] and list(points["latest_launch"]) == [
        False, True, False]
    assert [p["trunc"] for p in expected_grid(sweep)] == [0.5, 0.25, 1.0]  # latest first
    assert not (sweep / "summary").exists()  # logger disabled: no W&B summary run
