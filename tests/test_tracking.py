"""result.json is written atomically and always finished; the W&B run is real and readable."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest

from analysis.wandb_offline import read_runs
from kd_sweeps import identity
from kd_sweeps.tracking import RESULT_FILE, Tracker, write_json_atomic


@dataclass
class LoggerCfg:
    mode: str = "offline"
    project: str = "kd-sweeps-test"
    entity: str | None = None
    tags: list = field(default_factory=lambda: ["unit"])


def test_atomic_write_replaces_whole_file_and_stores_nan_as_null(tmp_path):
    path = tmp_path / "r.json"
    write_json_atomic(path, {"a": 1})
    write_json_atomic(path, {"a": float("nan"), "b": [float("inf"), 2]})
    assert json.loads(path.read_text()) == {"a": None, "b": [None, 2]}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temp file left behind


def test_ok_run_writes_result_and_offline_wandb(tmp_path):
    config = {"trunc": 0.5, "sections": {"name": "cot", "include": ["CoT"]}}
    with Tracker(tmp_path, "run0001", "unit", config, LoggerCfg(), ["trunc=0.5"]) as tracker:
        assert json.loads((tmp_path / RESULT_FILE).read_text())["status"] == "running"
        tracker.log_step(0, {"loss": 1.5})
        tracker.log_step(1, {"loss": 1.0})
        tracker.set_summary({"accuracy": 0.25, "train_flops": 1e12})
    result = json.loads((tmp_path / RESULT_FILE).read_text())
    assert result["status"] == "ok" and result["summary"]["accuracy"] == 0.25
    assert result["overrides"] == ["trunc=0.5"] and result["finished_at"]
    (run,) = read_runs(tmp_path, read_history=True)
    assert run.run_id == "run0001" and run.group == "unit" and run.state == "finished"
    assert run.config["sections"]["include"] == ["CoT"]
    assert run.summary["accuracy"] == 0.25
    assert [row["train/loss"] for row in run.history] == [1.5, 1.0]


def test_failed_run_records_the_error_and_reraises(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with Tracker(tmp_path, "run0002", "unit", {"trunc": 1.0}, LoggerCfg(), []):
            raise RuntimeError("boom")
    result = json.loads((tmp_path / RESULT_FILE).read_text())
    assert result["status"] == "failed" and result["error"] == "RuntimeError: boom"
    (run,) = read_runs(tmp_path)
    assert run.state == "failed" and run.summary["error"] == "RuntimeError: boom"


def test_disabled_logger_writes_only_result(tmp_path):
    with Tracker(tmp_path, "run0003", "unit", {}, LoggerCfg(mode="disabled"), []):
        pass
    assert [p.name for p in tmp_path.iterdir()] == [RESULT_FILE]


def test_run_id_ignores_where_and_how_a_point_runs():
    base = {"trunc": 0.5, "seed": 1, "logger": {"mode": "offline"}, "output_dir": "a", "sweep": "x"}
    moved = {**base, "logger": {"mode": "disabled"}, "output_dir": "b", "sweep": "y"}
    assert identity.run_id(base) == identity.run_id(moved)
    assert identity.run_id(base) != identity.run_id({**base, "trunc": 0.25})
