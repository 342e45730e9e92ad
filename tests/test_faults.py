"""Faults: a SIGKILL mid-write leaves the previous complete record; a NaN loss stops the run and
names where; a grid point that hangs past its time limit is recorded as failed and the sweep goes on.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from kd_sweeps.launcher import lost_reason, record_lost_point
from kd_sweeps.schema import LossConfig, TrainConfig
from tests.conftest import ROOT, compose_config
from tests.helpers import FAST, launch, point_results

# A writer rewrites version after version of result.json and of a realistic train state (a 2-layer
# model's weights + AdamW moments, ~3 MB), each version filled with its own number. Writers are
# forked from one process that imported torch once, so each kill costs milliseconds, not an import.
WRITERS = textwrap.dedent("""
    import os, sys, torch
    from pathlib import Path
    from kd_sweeps.checkpoint import TrainState
    from kd_sweeps.record_files import write_json_atomic

    torch.set_num_threads(1)  # no thread pool to carry into the forked writers
    model = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.Linear(1024, 256))
    optimizer = torch.optim.AdamW(model.parameters())
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    model(torch.ones(1, 256)).sum().backward()
    optimizer.step()  # AdamW's moments exist: the state has its real size
    state = TrainState(Path(sys.argv[1]))

    def write_forever(folder):
        version = int(state.path.exists() and torch.load(state.path, weights_only=True)["step"])
        sys.stdout.write(f"ready {os.getpid()}\\n")  # one write: nothing else prints while a writer lives
        sys.stdout.flush()
        while True:
            version += 1
            with torch.no_grad():
                for p in model.parameters():
                    p.fill_(version)
            write_json_atomic(folder / "result.json", {"version": version, "summary": {"values": [version] * 2000}})
            state.save(version, model, optimizer, schedule, {"version": version})

    for line in sys.stdin:  # one writer per line; this process only forks and reaps
        pid = os.fork()
        if pid == 0:
            write_forever(Path(sys.argv[1]))
        os.waitpid(pid, 0)
        print("dead", flush=True)
""")


def _check_complete(folder: Path) -> tuple[int, int]:
    """(result version, state version): each file parses and is one whole version, or is absent."""
    result_version = state_version = 0
    if (folder / "result.json").exists():
        result = json.loads((folder / "result.json").read_text())
        assert result["summary"]["values"] == [result["version"]] * 2000
        result_version = result["version"]
    if (folder / "train_state.pt").exists():
        state = torch.load(folder / "train_state.pt", map_location="cpu", weights_only=True)
        assert state["extra"]["version"] == state["step"]
        assert all(bool((t == state["step"]).all()) for t in state["model"].values())
        state_version = state["step"]
    return result_version, state_version


@pytest.mark.slow  # writer subprocesses killed mid-write (about 7 s)
def test_sigkill_mid_write_leaves_a_complete_version(tmp_path):
    """20 SIGKILLs at random moments (seeded) of a process that rewrites result.json and the train
    state in a loop: after each, both files on disk are complete versions, never a torn write."""
    rng = random.Random(0)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    forker = subprocess.Popen([sys.executable, "-c", WRITERS, str(tmp_path)], env=env, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    seen = []
    try:
        for _ in range(20):
            forker.stdin.write("go\n")
            forker.stdin.flush()
            ready, pid = forker.stdout.readline().split()
            assert ready == "ready"
            time.sleep(rng.uniform(0.0, 0.3))
            os.kill(int(pid), signal.SIGKILL)
            assert forker.stdout.readline().strip() == "dead"
            seen.append(_check_complete(tmp_path))
            for path in tmp_path.glob(".*.tmp"):  # a killed writer's temp file: never read by anyone
                assert path.name.startswith((".result.json.", ".train_state."))
                path.unlink()
    finally:
        forker.kill()
        forker.wait()
    # The kills landed at different moments of the loop: many distinct versions were on disk.
    assert len(set(seen)) > 10 and all(v > 0 for pair in seen for v in pair), seen


def test_nan_loss_names_step_batch_and_loss():
    from kd_sweeps import data, models, train
    from kd_sweeps.synthetic import make_split
    from kd_sweeps.tokenizer import build_tokenizer
    from transformers import Qwen3ForCausalLM

    tokenizer = build_tokenizer()
    encoded, _ = data.encode(make_split(32, seed=0), tokenizer, 4096)
    examples, _ = data.training_examples(encoded, ("CoT", "A"), 1.0, "lead", False, 0)
    spec = {"layers": 1, "hidden": 32, "heads": 2}
    student = Qwen3ForCausalLM._from_config(models.qwen3_config(spec, tokenizer))
    teacher = Qwen3ForCausalLM._from_config(models.qwen3_config(spec, tokenizer)).requires_grad_(False)
    calls = []

    def poison_second_step(step, metrics, micro):  # the step after this one computes a NaN loss
        calls.append(step)
        with torch.no_grad():
            student.lm_head.weight.fill_(float("inf"))

    settings = TrainConfig(max_steps=4, batch_size=8, precision="fp32")
    with pytest.raises(FloatingPointError) as raised:
        train.train_loop(student, teacher, examples, tokenizer.pad_token_id, settings, LossConfig(),
                         torch.device("cpu"), on_step=poison_second_step, desc="trunc=1.0 all")
    message = str(raised.value)
    assert calls == [0]
    assert "trunc=1.0 all: loss is nan at step 1" in message
    assert "ce=nan" in message and "kd=nan" in message  # the loss and its parts
    assert "batch examples [" in message and "lengths [" in message  # which batch


@pytest.mark.slow
def test_nan_point_is_failed_and_its_summary_and_plot_hold_no_nan(tmp_path, cache_dir):
    """A sweep where one point diverges (a learning rate of 1e30): that point is failed with the step
    named, the other finishes; the summary table and the tradeoff plot show no NaN."""
    import pandas as pd

    sweep_dir = tmp_path / "sweep"
    proc = launch(["-m", "train.lr=1e-3,1e30", "sweep=nan", f"hydra.sweep.dir={sweep_dir}",
                   *FAST], tmp_path, cache_dir, check=False)
    assert proc.returncode != 0
    results = {r["config"]["train"]["lr"]: r for r in point_results(sweep_dir)}
    assert results[1e-3]["status"] == "ok"
    assert results[1e30]["status"] == "failed" and "loss is nan at step" in results[1e30]["error"]
    # Only an empty cell is missing: the sweep is named "nan", which pandas would read as NaN.
    summary = pd.read_csv(sweep_dir / "summary.csv", keep_default_na=False, na_values=[""])
    references = summary["role"] != "grid_point"  # teacher / base student rows
    assert references.sum() == 2
    summary = summary[~references]
    assert len(summary) == 1  # the diverged point is listed as failed, not as a row of NaNs
    # (The "% retained" and "% of teacher" columns are left out: with these 3-step models the
    # reference accuracies can be 0, and x / 0 is left empty.)
    measured = summary.drop(columns=[c for c in summary if "retained" in c or "of_teacher" in c])
    measured = measured.select_dtypes("number")
    assert not measured.isna().any().any()
    assert (sweep_dir / "tradeoff.png").stat().st_size > 0
    assert "1 failed" in proc.stdout


def test_lost_reason_names_the_time_limit():
    reason = lost_reason("TIMEOUT", 30, 5.0, "no output")
    assert reason == "killed: timed out after 30 min (hydra.launcher.timeout_min=30): no output"
    reason = lost_reason("OUT_OF_MEMORY", 30, 5.0, "no output")
    assert "job state OUT_OF_MEMORY" in reason and "hydra.launcher.timeout_min=30" in reason
    assert lost_reason("FINISHED", 1, 61.0, "x").startswith("killed: timed out after 1 min")


T0 = "2000-01-01T00:00:00+00:00"


def test_record_lost_point_keeps_the_run_and_leaves_ok_points(tmp_path):
    from kd_sweeps.point_record import read_result, write_result

    write_result(tmp_path / "a", {"run_id": "a", "status": "running", "config": {"trunc": 0.5},
                                  "started_at": T0, "launched_at": T0})
    record_lost_point(tmp_path / "a", ["trunc=0.5"], "s", "killed: timed out")
    record = read_result(tmp_path / "a")
    assert (record["status"], record["error"], record["config"], record["started_at"]) == \
        ("failed", "killed: timed out", {"trunc": 0.5}, T0)
    assert record["last_action"] == "failed" and record["launched_at"] > T0  # counted by this launch
    record_lost_point(tmp_path / "b", ["trunc=1.0"], "s", "killed")  # died before writing anything
    assert read_result(tmp_path / "b")["overrides"] == ["trunc=1.0"]
    write_result(tmp_path / "c", {"status": "ok", "summary": {"accuracy": 1.0}})
    assert record_lost_point(tmp_path / "c", [], "s", "killed")["status"] == "ok"


@pytest.mark.slow
def test_a_point_hanging_past_its_time_limit_is_failed_and_the_sweep_goes_on(tmp_path, cache_dir):
    """launcher=local (submitit) with hydra.launcher.timeout_min=1: one point waits forever for the
    lock on its teacher (held by this test, as by a stuck process elsewhere), the other runs.
    submitit signals the hung job 30 s before its time limit; with no requeue left
    (max_num_timeout=0) the job gives up; the point is failed, naming the limit, and the sweep
    summarizes both points."""
    from filelock import FileLock

    from kd_sweeps import models

    fast = [o for o in FAST if not o.startswith("model.teacher.prep_steps=")]
    hung_cfg = compose_config([*fast, "model.teacher.prep_steps=9"])
    hung_teacher = cache_dir / f"teacher-{models.embedded_key(models.spec_dict(hung_cfg.model.teacher), 'teacher')}"
    sweep_dir = tmp_path / "sweep"
    lock = FileLock(str(hung_teacher) + ".lock")
    with lock:
        started = time.monotonic()
        proc = launch(["-m", "model.teacher.prep_steps=8,9", "sweep=hang", f"hydra.sweep.dir={sweep_dir}",
                       "launcher=local", "hydra.launcher.timeout_min=1", "+hydra.launcher.max_num_timeout=0",
                       *fast], tmp_path, cache_dir, check=False)
        took = time.monotonic() - started
    assert proc.returncode != 0
    results = {r["config"]["model"]["teacher"]["prep_steps"]: r for r in point_results(sweep_dir)}
    assert results[8]["status"] == "ok"
    hung = results[9]
    assert hung["status"] == "failed" and hung["last_action"] == "failed"
    assert hung["error"].startswith("killed: timed out after 1 min (hydra.launcher.timeout_min=1)"), hung["error"]
    assert "2 grid point(s): 1 ran, 0 skipped (already done), 1 failed" in proc.stdout
    assert "| trunc |" in proc.stdout  # the summary table of the point that finished
    assert 30 <= took < 100, took


@pytest.mark.slow
def test_a_200_point_plan_lists_every_point(tmp_path):
    """Load: ``python -m kd_sweeps.plan`` over a 200-point grid composes, validates and lists every
    point (one CSV row each, every override combination once)."""
    import csv

    csv_path = tmp_path / "plan.csv"
    proc = subprocess.run([sys.executable, "-m", "kd_sweeps.plan", "-m", "seed=range(0,50)",
                           "trunc=0.25,0.5,0.75,1.0", "data.n_train=200", "--csv", str(csv_path)],
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "planned 200 point(s)" in proc.stdout and "total (200 points)" in proc.stdout
    rows = list(csv.DictReader(csv_path.open()))
    assert len(rows) == 200
    assert len({row["overrides"] for row in rows}) == 200
    assert [row["index"] for row in rows] == [str(i) for i in range(200)]
    assert all(row["problems"] == "" and float(row["train_flops"]) > 0 for row in rows)
