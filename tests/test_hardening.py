"""Issue 16, hardening round two: one writer per point (the claim), a summary and exit status that
count what happened in this launch, sweep names that stay names, records that respect the umask."""

from __future__ import annotations

import functools

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from kd_sweeps.claim import PointClaim, read_holder
from kd_sweeps.launcher import OUTCOMES, CountsEveryPoint, record_lost_point
from kd_sweeps.point_record import RESULT_FILE, read_result, write_result
from kd_sweeps.record_files import write_json_atomic
from kd_sweeps.tracking import Tracker
from kd_sweeps.validation import sweep_name_problem
from tests.conftest import ROOT
from tests.helpers import LoggerCfg

LoggerCfg = functools.partial(LoggerCfg, mode="disabled")  # this module's defaults



def test_a_claim_has_one_holder_who_is_named(tmp_path):
    with PointClaim(tmp_path) as first:
        assert first.owned
        with PointClaim(tmp_path) as second:
            assert not second.owned
            assert second.holder["pid"] == os.getpid() and second.holder["host"]
            assert f"pid {os.getpid()}" in second.describe()
    with PointClaim(tmp_path) as again:  # released: the next launch takes it
        assert again.owned
    assert read_holder(tmp_path)["pid"] == os.getpid()


def test_a_lost_point_held_by_another_launch_keeps_its_record(tmp_path):
    write_result(tmp_path, {"status": "running", "run_id": "a"})
    with PointClaim(tmp_path):  # another launch runs the point now
        record_lost_point(tmp_path, ["trunc=1.0"], "s", "killed")
    assert read_result(tmp_path) == {"status": "running", "run_id": "a"}
    record_lost_point(tmp_path, ["trunc=1.0"], "s", "killed")  # nobody holds it: recorded
    assert read_result(tmp_path)["status"] == "failed"


def test_ctrl_c_records_interrupted_with_the_signal_and_the_writer(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with Tracker(tmp_path, "run1", "unit", {}, LoggerCfg(), []):
            raise KeyboardInterrupt
    record = read_result(tmp_path)
    assert record["status"] == "interrupted" and record["last_action"] == "interrupted"
    assert "SIGINT" in record["error"]
    assert record["host"] and "job_id" in record


def test_records_and_train_states_respect_the_umask(tmp_path):
    import torch

    from kd_sweeps.checkpoint import TrainState

    old = os.umask(0o027)
    try:
        write_json_atomic(tmp_path / RESULT_FILE, {"a": 1})
        model = torch.nn.Linear(2, 2)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
        state = TrainState(tmp_path / "train_state")
        state.save(1, model, optimizer, schedule, {})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / RESULT_FILE).stat().st_mode) == 0o640
    assert stat.S_IMODE(state.path.stat().st_mode) == 0o640


@pytest.mark.parametrize("name, why", [("../../escape", "path separator"), ("", "is empty"),
                                       ("..", "'..'"), ("x" * 300, "300 characters"),
                                       ("a\tb", "non-printable"), ("a\\b", "path separator")])
def test_a_sweep_name_that_is_not_a_name_is_refused(name, why):
    problem = sweep_name_problem(name)
    assert problem and problem.startswith("sweep=") and why in problem
    assert sweep_name_problem("trunc_study-2,a=1.0") is None


def test_a_secret_shaped_sweep_name_is_refused_without_being_shown(monkeypatch):
    """A token pasted as a sweep name would become a folder, a W&B group and a table title."""
    token = "hf_" + "a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6"  # the shape of a Hugging Face token
    problem = sweep_name_problem(token)
    assert problem and "looks like a secret" in problem and token not in problem
    monkeypatch.setenv("MY_SERVICE_TOKEN", "plain-env-secret-value")
    problem = sweep_name_problem("plain-env-secret-value")
    assert problem and "plain-env-secret-value" not in problem


class _Jobs:
    """Stands in for Hydra's BasicLauncher: job 1 is set up wrong, job 2 gets Ctrl-C."""

    def launch(self, job_overrides, initial_job_idx):
        from hydra.core.utils import JobReturn, JobStatus

        if initial_job_idx == 1:
            raise PermissionError("cannot create the point folder")
        if initial_job_idx == 2:
            raise KeyboardInterrupt
        ret = JobReturn(overrides=list(job_overrides[0]), status=JobStatus.COMPLETED)
        ret.return_value = {"outcome": "ran", "point": "p0", "status": "ok", "error": None, "summary": {}}
        return [ret]


class _Launcher(CountsEveryPoint, _Jobs):
    pass


def test_every_point_is_counted_even_when_a_job_cannot_start_or_is_interrupted():
    OUTCOMES.clear()
    returns = _Launcher().launch([["a=0"], ["a=1"], ["a=2"], ["a=3"]], 0)
    assert len(returns) == 4 and all(r.return_value["outcome"] for r in returns)  # no exception escapes
    assert [o["outcome"] for o in OUTCOMES] == ["ran", "failed", "interrupted", "interrupted"]
    assert "PermissionError: cannot create the point folder" in OUTCOMES[1]["error"]
    OUTCOMES.clear()


def _launch(args, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "launch.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_a_bad_sweep_name_fails_before_any_folder_is_made(tmp_path):
    proc = _launch(["-m", "sweep=../../escape", "trunc=0.5,1.0"], tmp_path)
    assert proc.returncode != 0
    assert "sweep='../../escape': holds a path separator" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert list(tmp_path.rglob("*")) == []  # nothing created, here or above


@pytest.mark.slow
def test_a_point_failing_again_counts_failed_and_a_claimed_point_is_left_alone(tmp_path):
    """The issue's case: a point recorded failed that fails again before its record is opened
    counted as failed (exit ≠ 0); then a second launch that finds the point claimed skips it and
    leaves its record byte for byte."""
    (tmp_path / "plain").write_text("")
    args = ["-m", "sweep=again", f"hydra.sweep.dir={tmp_path / 'sweep'}", "logger=disabled",
            f"cache_dir={tmp_path / 'plain' / 'cache'}", "trunc=0.5"]
    first = _launch(args, tmp_path)
    (point,) = [p.parent for p in (tmp_path / "sweep").glob(f"*/{RESULT_FILE}")]
    assert first.returncode != 0 and read_result(point)["status"] == "failed"
    assert stat.S_IMODE((point / RESULT_FILE).stat().st_mode) == 0o666 & ~_umask()
    second = _launch(args, tmp_path)
    assert second.returncode != 0, second.stdout[-2000:]
    assert "1 grid point(s): 0 ran, 0 skipped (already done), 1 failed" in second.stdout
    before = (point / RESULT_FILE).read_bytes()
    saved = {name: (point / ".hydra" / name).read_bytes() for name in ("config.yaml", "overrides.yaml")}
    with PointClaim(point):
        third = _launch(args, tmp_path)
    # Hydra writes the point's .hydra/ before any code of ours runs; a point's folder is named by its
    # config, so what it writes there is what was there (hydra.yaml differs only in the job number).
    assert {name: (point / ".hydra" / name).read_bytes() for name in saved} == saved
    assert third.returncode == 0, third.stderr[-2000:]
    assert "1 failed" not in third.stdout and ", 1 claimed" in third.stdout
    assert f"pid {os.getpid()}" in third.stdout  # the holder is named
    assert (point / RESULT_FILE).read_bytes() == before
    assert json.loads(before)["host"]


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _record(run_id: str, trunc: float, max_steps: int, n_problems: int = 8, **summary) -> dict:
    config = {"trunc": trunc, "seed": 1, "sections": {"name": "all", "include": ["P", "CoT", "A"]},
              "train": {"max_steps": max_steps, "num_threads": 1}, "eval": {"n_problems": n_problems},
              "logger": {"mode": run_id}}  # logger differs between every run: never compared
    return {"run_id": run_id, "sweep": "s", "status": "ok", "config": config,
            "summary": {"accuracy": 0.5, "train_flops": 1e9, **summary}}


def test_runs_differing_in_any_result_key_are_refused_naming_the_keys():
    from analysis.checks import check_comparable, result_keys
    from analysis.load import runs_frame

    assert {"train.max_steps", "eval.n_problems", "train.lr"} <= set(result_keys())
    assert not {"logger.mode", "train.num_threads", "output_dir", "seed", "trunc"} & set(result_keys())
    mixed = runs_frame([_record("a", 1.0, 10, 8), _record("b", 1.0, 20, 16), _record("c", 0.5, 10, 8)])
    with pytest.raises(ValueError, match="differ in train.max_steps, eval.n_problems") as refused:
        check_comparable(mixed)
    assert "train.max_steps takes 2 values: '10', '20'" in str(refused.value)
    same = runs_frame([_record("a", 1.0, 10), _record("b", 0.5, 10)])
    check_comparable(same)  # only logger and trunc differ: comparable
    split = runs_frame([_record("a", 1.0, 10), _record("b", 1.0, 20)])
    check_comparable(split, group_by="train.max_steps")  # one curve per value


@pytest.mark.parametrize("summary, why", [({"accuracy": "abc"}, "'abc' is not a number"),
                                          ({"accuracy": float("nan")}, "nan is not finite"),
                                          ({"accuracy": 7.5}, "7.5 is outside [0, 1]"),
                                          ({"eval/aime24/accuracy": 1.5}, "1.5 is outside [0, 1]"),
                                          ({"train_flops": -1.0}, "-1.0 is negative")])
def test_an_invalid_summary_value_is_named_and_left_out(summary, why, caplog):
    from analysis.load import runs_frame

    frame = runs_frame([_record("bad1", 1.0, 10, **summary)])
    (key, _), = summary.items()
    assert f"run bad1 (sweep s): summary {key}={why}; left out" in caplog.text
    column = {"eval/aime24/accuracy": "acc_aime24"}.get(key, key)
    assert frame[column].isna().all()


def test_an_ok_run_without_a_summary_is_named(caplog):
    from analysis.load import runs_frame

    runs_frame([{**_record("empty1", 1.0, 10), "summary": {}}])
    assert "run empty1 (sweep s): status ok but no summary" in caplog.text


def test_a_json_object_file_and_a_folder_are_named_for_what_they_are(tmp_path):
    from kd_sweeps.prepare import load_reasoning_dataset
    from kd_sweeps.sources import SourceError

    one_object = tmp_path / "data.json"
    one_object.write_text(json.dumps({"data": [{"problem": "p"}], "version": 1}, indent=2))
    with pytest.raises(SourceError, match=r"holds one JSON object \(keys \['data', 'version'\]\), not records"
                                          r".*its list\(s\) \['data'\]"):
        load_reasoning_dataset(str(one_object), source="json", n_val=1)
    with pytest.raises(SourceError, match="is a folder; data.source=json reads one JSON/JSONL file"):
        load_reasoning_dataset(str(tmp_path), source="json", n_val=1)


def test_plan_csv_into_a_missing_folder_is_created_and_below_a_file_fails_first(tmp_path, capsys):
    from kd_sweeps.plan import main

    (tmp_path / "plain").write_text("")
    assert main(["--csv", str(tmp_path / "plain" / "plan.csv")]) == 2
    assert "cannot create its folder" in capsys.readouterr().err
    assert main(["--csv", str(tmp_path / "new" / "deeper" / "plan.csv")]) == 0
    assert (tmp_path / "new" / "deeper" / "plan.csv").read_text().startswith("index,")


def test_analysis_out_below_a_file_and_a_source_without_ok_runs_fail(tmp_path, capsys):
    from analysis.cli import main

    (tmp_path / "plain").write_text("")
    assert main(["tradeoff", str(tmp_path), "--out", str(tmp_path / "plain" / "figs")]) == 2
    assert "plain is a file, not a folder; choose another --out" in capsys.readouterr().err
    (tmp_path / "p1").mkdir()
    (tmp_path / "p1" / RESULT_FILE).write_text("[1, 2]")  # list-shaped: skipped with a warning
    assert main(["tradeoff", str(tmp_path), "--out", str(tmp_path / "figs")]) == 1
    assert "no finished (ok) run" in capsys.readouterr().err
    assert not (tmp_path / "figs").exists()


def test_a_copied_point_folder_is_counted_once(tmp_path, caplog):
    from analysis.load import load_results

    for folder in ("a", "copy_of_a"):
        write_result(tmp_path / folder, _record("r1", 1.0, 10))
    assert len(load_results(tmp_path)) == 1
    assert "skipped, the same run (s/r1)" in caplog.text


def test_home_unset_names_kd_sweeps_cache(monkeypatch):
    from kd_sweeps.validation import ConfigError, validate
    from tests.conftest import compose_config

    monkeypatch.delenv("HOME", raising=False)
    monkeypatch.delenv("KD_SWEEPS_CACHE", raising=False)
    with pytest.raises(ConfigError, match="neither KD_SWEEPS_CACHE nor HOME is set; set KD_SWEEPS_CACHE="):
        validate(compose_config([]))


def test_teacher_topk_above_the_vocabulary_is_named():
    from kd_sweeps.validation import ConfigError, check_topk
    from tests.conftest import compose_config

    cfg = compose_config(["train.teacher_cache=topk", "train.teacher_topk=100000"])
    with pytest.raises(ConfigError, match="train.teacher_topk=100000: more than the 64 tokens"):
        check_topk(cfg, 64)
    check_topk(compose_config(["train.teacher_cache=topk", "train.teacher_topk=8"]), 64)


def test_a_sweep_dir_below_a_file_fails_before_the_first_point(tmp_path):
    (tmp_path / "plain").write_text("")
    proc = _launch(["-m", f"hydra.sweep.dir={tmp_path / 'plain' / 'sweep'}", "trunc=0.5,1.0"], tmp_path)
    assert proc.returncode != 0
    assert f"hydra.sweep.dir='{tmp_path / 'plain' / 'sweep'}': {tmp_path / 'plain'} is a file, not a folder" \
        in proc.stderr
    assert "Traceback" not in proc.stderr and sorted(p.name for p in tmp_path.iterdir()) == ["plain"]


@pytest.mark.slow
def test_every_rank_of_a_claimed_multi_process_point_stops_without_writing(tmp_path):
    """``torchrun --nproc_per_node 2 launch.py`` on a point another launch holds: rank 0 finds the
    claim and tells rank 1 once both have joined the process group, so neither trains nor waits for
    the other; nothing of the point is written."""
    from tests.helpers import E2E, free_port

    point = tmp_path / "point"
    env = {**os.environ, "KD_SWEEPS_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(free_port())]
    with PointClaim(point):
        proc = subprocess.run([*torchrun, str(ROOT / "launch.py"), *E2E, "logger=disabled",
                               f"hydra.run.dir={point}"], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=180)
    assert proc.returncode != 0
    assert proc.stderr.count("is claimed by another launch") == 2, proc.stderr[-3000:]  # rank 0 and rank 1
    assert f"pid {os.getpid()}" in proc.stderr  # rank 0 names the holder
    assert not (point / RESULT_FILE).exists() and not (point / "train_state").exists()
    assert not (tmp_path / "cache").exists()  # no rank got as far as preparing a model


def test_a_link_that_loops_back_into_a_sweep_does_not_count_it_twice(tmp_path):
    from analysis.grid import expected_grid, sweep_dirs

    sweep = tmp_path / "sweep"
    (sweep / "p1").mkdir(parents=True)
    (sweep / "multirun.yaml").write_text("hydra:\n  overrides:\n    task:\n    - trunc=0.5,1.0\n")
    (sweep / "p1" / "up").symlink_to(sweep)  # a loop: sweep/p1/up/p1/up/...
    (tmp_path / "alias").symlink_to(sweep)
    assert sweep_dirs(tmp_path) == [sweep]
    assert len(expected_grid(sweep)) == 2
