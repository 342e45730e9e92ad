"""Tests for analysis.wandb_offline against runs written by the real wandb."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytest.importorskip("wandb")

from analysis.wandb_offline import find_runs, iter_records, read_run, read_runs  # noqa: E402

# Written in a child interpreter so wandb's global state (service process,
# hooks, wandb.run) never leaks into the test session.
WRITER = textwrap.dedent(
    """
    import sys
    import time
    from pathlib import Path
    import wandb

    root = Path(sys.argv[1])
    settings = wandb.Settings(console="off")

    (root / "ok").mkdir()
    run = wandb.init(
        mode="offline", dir=root / "ok", project="p", group="g", job_type="train",
        tags=["a"], id="abc123", settings=settings,
        config={"trunc": 0.5, "model": {"student": "x"}, "sections": ["CoT"]},
    )
    for step in range(3):
        run.log({"loss": 1.0 / (step + 1), "eval": {"acc": step / 10}})
    run.summary["accuracy"] = 0.75
    run.summary["final"] = {"math": {"acc": 0.5}}
    run.summary["best"] = 1
    run.summary["best"] = 2
    run.summary["best"] = 3
    run.finish()

    # A failed run whose config spans several 32 KiB blocks.
    (root / "failed").mkdir()
    run = wandb.init(mode="offline", dir=root / "failed", project="p", id="fail01",
                     name="bad-run", settings=settings)
    run.config.update({"prompt": "x" * 70_000})
    run.log({"loss": 9.0})
    run.finish(exit_code=1)

    # A preempted run (steps 0-4, state saved after step 3) resumed by its requeued job.
    (root / "resumed").mkdir()
    run = wandb.init(mode="offline", dir=root / "resumed", project="p", id="res001",
                     resume="allow", settings=settings, config={"trunc": 0.5})
    for step in range(5):
        run.log({"loss": float(step)}, step=step)
    run.summary["error"] = "Preempted: stopped by signal SIGUSR2 after step 3"
    run.mark_preempting()
    run.finish(exit_code=1)
    time.sleep(1.1)  # offline folders are named by the second they start in
    run = wandb.init(mode="offline", dir=root / "resumed", project="p", id="res001",
                     resume="allow", settings=settings, config={"trunc": 0.5})
    for step in range(3, 7):
        run.log({"loss": 10.0 + step}, step=step)
    run.summary["error"] = None
    run.summary["accuracy"] = 0.5
    run.finish()
    """
)


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("wandb_runs")
    home = tmp_path_factory.mktemp("wandb_home")
    env = dict(
        os.environ, WANDB_MODE="offline", WANDB_SILENT="true",
        WANDB_CONFIG_DIR=str(home / "config"), WANDB_CACHE_DIR=str(home / "cache"),
        WANDB_DATA_DIR=str(home / "data"),
    )
    subprocess.run([sys.executable, "-c", WRITER, str(root)], env=env, check=True, timeout=120)
    return root


def _log_file(root: Path, name: str) -> Path:
    (path,) = (root / name / "wandb").glob("offline-run-*/run-*.wandb")
    return path


def _copy_run(src: Path, dest_root: Path) -> Path:
    """Copy the run directory of log file src below dest_root; return the new log."""
    dest = dest_root / "wandb" / src.parent.name
    shutil.copytree(src.parent, dest)
    return dest / src.name


def test_finished_run(runs_root):
    run = read_run(_log_file(runs_root, "ok").parent)
    assert run.run_id == "abc123"
    assert (run.project, run.group, run.job_type, run.tags) == ("p", "g", "train", ["a"])
    assert run.config == {"trunc": 0.5, "model": {"student": "x"}, "sections": ["CoT"]}
    assert run.summary["accuracy"] == 0.75
    assert run.summary["best"] == 3  # last write wins
    assert run.summary["final"] == {"math": {"acc": 0.5}}
    assert run.summary["eval"] == {"acc": 0.2}  # nested key from the last logged step
    assert run.summary["_step"] == 2
    assert "_wandb" not in run.summary and "_wandb" not in run.config
    assert run.exit_code == 0 and run.state == "finished"
    assert run.history == []
    assert run.start_time is not None and run.start_time > 1e9


def test_history(runs_root):
    run = read_run(_log_file(runs_root, "ok"), read_history=True)
    assert [row["_step"] for row in run.history] == [0, 1, 2]
    assert [row["loss"] for row in run.history] == pytest.approx([1.0, 0.5, 1 / 3])
    assert run.history[2]["eval"] == {"acc": 0.2}


def test_failed_run_with_multi_block_record(runs_root):
    run = read_run(_log_file(runs_root, "failed"))
    assert run.run_id == "fail01" and run.name == "bad-run"
    assert run.exit_code == 1 and run.state == "failed"
    assert run.config["prompt"] == "x" * 70_000


def test_iter_records_types(runs_root):
    kinds = [r.WhichOneof("record_type") for r in iter_records(_log_file(runs_root, "ok"))]
    assert kinds[0] == "header"
    assert {"run", "history", "summary", "exit"} <= set(kinds)


def test_truncated_file_keeps_earlier_records(runs_root, tmp_path, caplog):
    src = _log_file(runs_root, "failed")
    full = [r.SerializeToString() for r in iter_records(src)]
    data = src.read_bytes()
    log_file = _copy_run(src, tmp_path)
    # Every possible cut must give a prefix of the full record list.
    for cut in range(0, len(data), 97):
        log_file.write_bytes(data[:cut])
        got = [r.SerializeToString() for r in iter_records(log_file)]
        assert got == full[: len(got)]

    log_file.write_bytes(data[: len(data) // 2])
    old = time.time() - 3600
    os.utime(log_file, (old, old))
    with caplog.at_level(logging.WARNING, logger="analysis.wandb_offline"):
        run = read_run(log_file.parent)
    assert "truncated" in caplog.text
    assert run.run_id == "fail01" and run.project == "p"
    assert run.exit_code is None and run.state == "crashed"

    log_file.write_bytes(data[:7])  # killed before the first flush
    run = read_run(log_file)
    assert run.run_id == "fail01" and run.config == {} and run.state == "running"


def test_bad_header_names_file(runs_root, tmp_path):
    log_file = _copy_run(_log_file(runs_root, "ok"), tmp_path)
    log_file.write_bytes(b"NOTWANDB" + log_file.read_bytes()[8:])
    with pytest.raises(ValueError, match=log_file.name):
        read_run(log_file)


def test_corrupt_chunk_names_file(runs_root, tmp_path):
    log_file = _copy_run(_log_file(runs_root, "ok"), tmp_path)
    data = bytearray(log_file.read_bytes())
    data[40] ^= 0xFF  # inside the first record's data
    log_file.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{log_file.name}.*checksum"):
        list(iter_records(log_file))


def test_find_and_read_runs(runs_root):
    found = find_runs(runs_root)
    assert [p.parent.parent.parent.name for p in found] == ["failed", "ok", "resumed", "resumed"]
    assert all(p.parent.name.startswith("offline-run-") for p in found)
    assert sorted(r.run_id for r in read_runs(runs_root)) == ["abc123", "fail01", "res001"]


def test_a_resumed_run_is_one_run_with_the_redone_steps_replaced(runs_root):
    (run,) = read_runs(runs_root / "resumed", read_history=True)
    assert run.segments == 2 and run.state == "finished" and run.summary["accuracy"] == 0.5
    assert [(row["_step"], row["loss"]) for row in run.history] == \
        [(0, 0.0), (1, 1.0), (2, 2.0), (3, 13.0), (4, 14.0), (5, 15.0), (6, 16.0)]
    assert run.summary["error"] is None


def test_reading_many_runs_is_fast(runs_root, tmp_path):
    src = _log_file(runs_root, "ok")
    for i in range(300):  # the same run id in 300 folders: 300 runs, not one resumed run
        _copy_run(src, tmp_path / f"sweep{i}")
    start = time.perf_counter()
    runs = read_runs(tmp_path)
    elapsed = time.perf_counter() - start
    assert len(runs) == 300 and all(r.summary["best"] == 3 for r in runs)
    assert elapsed < 5, f"read 300 runs in {elapsed:.2f}s"
