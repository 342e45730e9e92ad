"""result.json is written atomically and always finished; the W&B run is real and readable."""

from __future__ import annotations

import functools

import json

import pytest

from analysis.wandb_offline import read_runs
from kd_sweeps import identity
from kd_sweeps.point_record import RESULT_FILE
from kd_sweeps.record_files import write_json_atomic
from kd_sweeps.tracking import Tracker
from kd_sweeps.wandb_naming import grid_keys, point_labels, point_of_wandb_id, run_name, wandb_run_id
from tests.helpers import LoggerCfg

LoggerCfg = functools.partial(LoggerCfg, tags=["unit"])  # this module's defaults



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
    assert run.run_id == "run0001-unit" and run.group == "unit" and run.state == "finished"
    assert run.name == "trunc=0.5" and run.job_type == "train" and run.tags == ["trunc=0.5", "unit"]
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


def test_wandb_name_and_tags_come_from_the_points_overrides():
    overrides = ["experiment=demo_tradeoff", "trunc=0.5", "sections=cot", "+loss=forward_kl", "sweep=s",
                 "logger.mode=offline", "launcher=local", "hydra.sweep.dir=/x", "+extra.note=hi", "force=true"]
    labels = point_labels(overrides)
    assert labels == ["trunc=0.5", "sections=cot", "loss=forward_kl"]
    assert point_labels(overrides, {"sections", "trunc"}) == ["trunc=0.5", "sections=cot"]  # the grid only
    assert point_labels(overrides, {"seed"}) == labels  # no grid key among them: every label
    assert run_name(labels, "abc123def456") == "trunc=0.5 sections=cot loss=forward_kl"
    assert run_name([], "abc123def456") == "abc123def456"  # the embedded default: no override
    assert len(run_name(["x=" + "9" * 300], "p")) == 128


def test_grid_keys_from_the_sweeps_multirun_yaml(tmp_path):
    assert grid_keys(tmp_path) is None  # not a multirun
    (tmp_path / "multirun.yaml").write_text(
        "hydra:\n  sweeper:\n    params:\n      sections: all,cot\n      +trunc: 0.25,0.5\n"
        "  overrides:\n    task:\n    - seed=1,2\n    - train.max_steps=3\n    - loss=glob(*kl)\n")
    assert grid_keys(tmp_path) == {"sections", "trunc", "seed", "loss"}


def test_wandb_id_holds_the_sweep_and_gives_the_point_back():
    assert wandb_run_id("abc123def456", "demo_tradeoff") == "abc123def456-demo_tradeoff"
    assert wandb_run_id("abc123def456", "a") != wandb_run_id("abc123def456", "b")
    odd = [wandb_run_id("abc123def456", name) for name in ("a b", "a:b", "x" * 40, "y" * 40 + "z")]
    assert len(set(odd)) == 4 and all(len(i) <= 12 + 1 + 32 + 9 for i in odd)
    assert not any(c in i for i in odd for c in ":;,#?/' ")  # characters W&B refuses in an id
    assert {point_of_wandb_id(i) for i in odd} == {"abc123def456"} and point_of_wandb_id("old001") == "old001"


@pytest.mark.slow
def test_same_point_two_sweeps_two_runs_and_eval_job_resumes_its_run(tmp_path):
    """The same point in two sweeps is two W&B runs; the evaluation job of one reopens the same run
    (same id, job type eval) and the reader folds both attempts into one."""
    cfg = {"trunc": 0.5}
    for sweep in ("first", "second"):
        with Tracker(tmp_path / sweep, "p0001", sweep, cfg, LoggerCfg(), ["trunc=0.5", "seed=1"]) as tracker:
            tracker.set_summary({"accuracy": 0.1})
    record = json.loads((tmp_path / "first" / RESULT_FILE).read_text())
    assert record["wandb"]["name"] == "trunc=0.5 seed=1" and record["wandb"]["id"] == "p0001-first"
    # A later launch rewrote the sweep's multirun.yaml: the evaluation job keeps the run's name.
    (tmp_path / "multirun.yaml").write_text("hydra:\n  sweeper:\n    params:\n      trunc: 0.5,1.0\n")
    with Tracker.reopen(tmp_path / "first", record, LoggerCfg()) as tracker:
        tracker.set_summary({"accuracy": 0.5})
    runs = {run.run_id: run for run in read_runs(tmp_path)}
    assert sorted(runs) == ["p0001-first", "p0001-second"]
    assert runs["p0001-first"].job_type == "eval" and runs["p0001-first"].summary["accuracy"] == 0.5
    assert runs["p0001-first"].name == "trunc=0.5 seed=1"
    assert runs["p0001-second"].job_type == "train" and runs["p0001-second"].summary["accuracy"] == 0.1


def test_every_record_change_goes_through_the_point_record(tmp_path):
    """The one owner of result.json: a status outside the list is refused, each transition sets what it
    says (status, last action, error, times, writer)."""
    from kd_sweeps.point_record import STATUSES, PointRecord

    record = PointRecord(tmp_path)
    with pytest.raises(ValueError, match="a point's status is one of running, ok, evaluating"):
        record.write({"status": "done"})
    opened = record.write(PointRecord.opened("r1", "s", ["trunc=1.0"], {"trunc": 1.0}))
    assert opened["status"] == "running" and opened["last_action"] == "ran" and opened["host"]
    closed = record.closed(dict(opened), "failed", "ValueError: x")
    assert (closed["status"], closed["last_action"], closed["error"]) == ("failed", "failed", "ValueError: x")
    assert record.read() == closed and closed["finished_at"]
    again = record.evaluating(dict(closed))
    assert (again["status"], again["error"], again["finished_at"]) == ("evaluating", None, None)
    assert record.skipped(dict(again))["last_action"] == "skipped"
    assert record.failed(record.read(), "job died")["status"] == "failed"
    assert record.lost(["trunc=1.0"], "s", "killed")["error"] == "killed"
    assert set(STATUSES) >= {"running", "ok", "evaluating", "failed", "preempted", "interrupted"}
