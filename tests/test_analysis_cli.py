"""``python -m analysis tradeoff|paper SOURCE --out DIR`` on sweeps written in the test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")

from analysis.cli import main  # noqa: E402
from tests.analysis_records import FakeApi, FakeRun, paper_records  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GRID = ["trunc=0.25,0.5,1.0", "sections=all,cot,cot_ans,ans", "sweep=demo"]


def write_multirun(sweep: Path) -> None:
    multirun = {"hydra": {"sweeper": {"params": None},
                          "overrides": {"hydra": ["hydra.mode=MULTIRUN"], "task": GRID}},
                "sweep": "demo", "trunc": 1.0}
    (sweep / "multirun.yaml").write_text(json.dumps(multirun))  # JSON is valid YAML


@pytest.fixture
def sweep(tmp_path) -> Path:
    """A sweep dir as Hydra and the trainer leave it; sections=ans never ran."""
    sweep = tmp_path / "multirun" / "demo"
    for job, rec in enumerate(paper_records()):
        (sweep / str(job)).mkdir(parents=True)
        (sweep / str(job) / "result.json").write_text(json.dumps(rec))
    write_multirun(sweep)
    return sweep


def test_tradeoff_command(sweep, tmp_path):
    out = tmp_path / "figures"
    proc = subprocess.run([sys.executable, "-m", "analysis", "tradeoff", str(sweep), "--out",
                           str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, MPLBACKEND="Agg"))
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "19 runs from" in text and "| trunc | sections |" in text
    assert "failed or unfinished runs: 1" in text and "broken [failed]" in text and "OOM" in text
    assert "grid: 12 points, 9 ok, 3 without any result" in text
    assert "missing job 3: trunc=0.25 sections=ans" in text
    for name in ("summary.csv", "summary.md", "tradeoff.png", "tradeoff.pdf"):
        assert (out / name).stat().st_size > 0 and str(out / name) in text


def test_paper_command(sweep, tmp_path, capsys):
    out = tmp_path / "figures"
    assert main(["paper", str(sweep), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "% retained, ratio of means over benchmarks" in text
    assert "missing job 11: trunc=1.0 sections=ans" in text
    expected = [f"{name}.{ext}" for name in ("tradeoff", "sections", "truncation", "generation",
                                             "example")
                for ext in ("png", "pdf")] + ["accuracy.csv", "accuracy.md"]
    assert sorted(p.name for p in out.iterdir()) == sorted(expected)
    for name in expected:
        assert str(out / name) in text


def test_refusal_exits_before_writing(sweep, tmp_path, capsys):
    result = sweep / "0" / "result.json"
    rec = json.loads(result.read_text())
    rec["config"]["model"]["teacher"]["name_or_path"] = "another-teacher"
    result.write_text(json.dumps(rec))
    out = tmp_path / "figures"
    assert main(["tradeoff", str(sweep), "--out", str(out)]) == 2
    assert "differ in teacher" in capsys.readouterr().err and not out.exists()
    assert main(["tradeoff", str(sweep), "--out", str(out), "--group-by", "teacher"]) == 0


def test_online_source_with_grid_from_a_sweep_dir(tmp_path, monkeypatch, capsys):
    wandb = pytest.importorskip("wandb")
    api = FakeApi([FakeRun(rec) for rec in paper_records()])
    monkeypatch.setattr(wandb, "Api", lambda **kwargs: api)
    monkeypatch.chdir(tmp_path)  # no local 'team' folder
    grid_dir = tmp_path / "grid"
    grid_dir.mkdir()
    write_multirun(grid_dir)
    assert main(["tradeoff", "team/kd", "--group", "demo", "--state", "finished", "--out",
                 "figs", "--sweep-dir", str(grid_dir)]) == 0
    assert api.calls[0][:2] == ("team/kd", {"group": "demo", "state": "finished"})
    text = capsys.readouterr().out
    assert "19 runs from team/kd" in text and "3 without any result" in text
    assert (tmp_path / "figs" / "tradeoff.png").exists()


def test_footnote_names_points_the_frame_cannot(sweep):
    """A point that failed before its run had an id exists only in the sweep dir."""
    from analysis.cli import footnote_points, grid_report
    from analysis.load import runs_frame

    early = {"run_id": None, "sweep": "demo", "status": "failed", "error": "OOM",
             "overrides": ["trunc=0.25", "sections=ans", "sweep=demo"], "config": None,
             "summary": {}}
    (sweep / "99").mkdir()
    (sweep / "99" / "result.json").write_text(json.dumps(early))
    online = runs_frame(paper_records())  # what W&B knows: no run for that point
    lines = footnote_points(online, grid_report(online, str(sweep), None))
    assert lines[0] == "job 3: trunc=0.25 sections=ans (failed: OOM)"
    assert lines[1:] == ["job 7: trunc=0.5 sections=ans", "job 11: trunc=1.0 sections=ans"]


def test_bad_source(tmp_path, capsys):
    assert main(["tradeoff", str(tmp_path / "nowhere"), "--out", str(tmp_path)]) == 2
    assert "no such directory" in capsys.readouterr().err
