"""A sweep's full grid from multirun.yaml, and the points without a result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from analysis.grid import (describe, expand, expected_grid, grid_status, missing_points,
                           parse_point, sweep_dirs, varying_keys)
from analysis.load import load_results, runs_frame
from tests.analysis_records import record

# A tiny Hydra app run as a real multirun: Hydra itself writes multirun.yaml and
# hands each job its overrides. Each job writes a result.json like the trainer,
# except that one point never runs and one fails before its run is opened.
APP = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    @hydra.main(version_base="1.3", config_path=sys.argv.pop(1), config_name="config")
    def main(cfg):
        hc = HydraConfig.get()
        out = Path(hc.runtime.output_dir)
        overrides = list(hc.overrides.task)
        point = (cfg.trunc, cfg.sections.name)
        if point == (0.25, "cot"):
            return  # killed before writing anything
        record = {"run_id": f"r{hc.job.num}", "sweep": cfg.sweep, "status": "ok",
                  "error": None, "overrides": overrides,
                  "config": OmegaConf.to_container(cfg, resolve=True),
                  "summary": {"accuracy": 0.5, "train_flops": 1e12 * cfg.trunc}}
        if point == (0.5, "cot_ans"):
            record.update(run_id=None, status="failed", error="OOM", config=None, summary={})
        (out / "result.json").write_text(json.dumps(record))

    main()
    """
)


@pytest.fixture(scope="module")
def hydra_sweep(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hydra_sweep")
    conf = root / "conf"
    (conf / "sections").mkdir(parents=True)
    (conf / "config.yaml").write_text(
        "defaults:\n  - sections: all\n  - _self_\ntrunc: 1.0\nseed: 42\nsweep: demo\n")
    for name, include in (("all", "[P, CoT, A]"), ("cot", "[CoT]"), ("cot_ans", "[CoT, A]")):
        (conf / "sections" / f"{name}.yaml").write_text(f"name: {name}\ninclude: {include}\n")
    (root / "app.py").write_text(APP)
    sweep_dir = root / "sweep"
    subprocess.run([sys.executable, str(root / "app.py"), str(conf), "-m",
                    "trunc=0.25,0.5,1", "sections=glob(cot*)", f"hydra.sweep.dir={sweep_dir}",
                    "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"],
                   cwd=root, check=True, timeout=120, capture_output=True,
                   env=dict(os.environ, HYDRA_FULL_ERROR="1"))
    return sweep_dir


def test_grid_from_hydra_multirun(hydra_sweep):
    grid = expected_grid(hydra_sweep)
    assert [(p["trunc"], p["sections"]) for p in grid] == [
        (0.25, "cot"), (0.25, "cot_ans"), (0.5, "cot"), (0.5, "cot_ans"), (1, "cot"),
        (1, "cot_ans")]  # Hydra's job order: the product, last override fastest
    assert all(p["sweep"] == "demo" for p in grid)  # from the config, as no override sets it
    # Each job's recorded overrides are exactly its grid point.
    for job, point in enumerate(grid):
        result = hydra_sweep / str(job) / "result.json"
        if result.exists():
            overrides = json.loads(result.read_text())["overrides"]
            assert {**parse_point(overrides), "sweep": "demo"} == point


def test_missing_and_failed_points(hydra_sweep):
    df = load_results(hydra_sweep)
    assert len(df) == 5  # 4 ok, 1 failed without a run id
    missing = missing_points(df, hydra_sweep)
    assert missing == [{"trunc": 0.25, "sections": "cot", "sweep": "demo"}]
    status = grid_status(df, hydra_sweep)
    assert list(status["status"]) == ["missing", "ok", "ok", "failed", "ok", "ok"]
    failed = status.iloc[3]
    assert failed["point"] == "trunc=0.5 sections=cot_ans" and failed["error"] == "OOM"
    assert status.iloc[1]["run_id"] == "r1"


def test_runs_known_only_by_frame_columns(hydra_sweep, tmp_path):
    """W&B runs carry no override list: they are placed by their config values."""
    (tmp_path / "multirun.yaml").write_text((hydra_sweep / "multirun.yaml").read_text())
    df = runs_frame([record("w1", "cot", 1.0), record("w2", "cot_ans", 0.25),
                     record("w3", "cot_ans", 0.5, status="failed", error="OOM")])
    assert [describe(p, ["trunc", "sections"]) for p in missing_points(df, tmp_path)] == [
        "trunc=0.25 sections=cot", "trunc=0.5 sections=cot", "trunc=1 sections=cot_ans"]
    status = grid_status(df, tmp_path).set_index("point")["status"]
    assert status["trunc=0.5 sections=cot_ans"] == "failed"
    assert status["trunc=1 sections=cot"] == "ok"  # trunc=1 in the grid is 1.0 in the run
    other = runs_frame([dict(record("z", "cot", 1.0), sweep="another-sweep")])
    assert len(missing_points(other, tmp_path)) == 6  # another sweep's run fills no point


def _multirun(path: Path, task: list[str], params: dict | None = None, sweep="s") -> Path:
    hydra = {"sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
                         "max_batch_size": None, "params": params},
             "overrides": {"hydra": ["hydra.mode=MULTIRUN"], "task": task}}
    path.mkdir(parents=True, exist_ok=True)
    # JSON is valid YAML.
    (path / "multirun.yaml").write_text(json.dumps({"hydra": hydra, "sweep": sweep}))
    return path


def test_sweeper_params_come_first_and_the_command_line_wins(tmp_path):
    sweep = _multirun(tmp_path, task=["seed=1,2", "trunc=0.5"],
                      params={"trunc": "0.25,1.0", "loss": "jsd,tvd"})
    grid = expected_grid(sweep)
    assert [(p["trunc"], p["loss"], p["seed"]) for p in grid] == [
        (0.5, "jsd", 1), (0.5, "jsd", 2), (0.5, "tvd", 1), (0.5, "tvd", 2)]
    assert varying_keys(grid) == ["loss", "seed"]


def test_override_syntax_is_hydras(tmp_path):
    jobs = expand(["seed=range(0,3)", "sections.include=[P],[P,A]", "+tag='a b',c",
                   "trunc=choice(0.5,1.0)", "hydra.job.chdir=false"])
    assert len(jobs) == 3 * 2 * 2 * 2 and jobs[0] == [
        "seed=0", "sections.include=[P]", "+tag='a b'", "trunc=0.5"]
    assert parse_point(jobs[-1]) == {"seed": 2, "sections.include": ["P", "A"], "tag": "c",
                                     "trunc": 1.0}
    with pytest.raises(ValueError, match="no finite grid"):
        expand(["trunc=interval(0.1,1.0)"])
    with pytest.raises(FileNotFoundError, match="multirun.yaml"):
        expected_grid(tmp_path / "nowhere")


def test_glob_needs_the_config_sources(tmp_path):
    with pytest.raises(ValueError, match="glob"):
        expand(["sections=glob(*)"])
    (tmp_path / "sections").mkdir()
    for name in ("all", "cot", "ans"):
        (tmp_path / "sections" / f"{name}.yaml").write_text("name: x\n")
    source = [{"provider": "main", "schema": "file", "path": str(tmp_path)}]
    assert expand(["sections=glob(*,exclude=ans)"], source) == [["sections=all"],
                                                                ["sections=cot"]]


def test_sweep_dirs(tmp_path, hydra_sweep):
    _multirun(tmp_path / "a" / "2026-01-01", ["trunc=1"])
    _multirun(tmp_path / "b" / "2026-01-02", ["trunc=1"])
    assert [p.parent.name for p in sweep_dirs(tmp_path)] == ["a", "b"]
    assert sweep_dirs(hydra_sweep) == [hydra_sweep]


def test_another_launch_of_the_sweep_fills_no_point(hydra_sweep):
    """A run of the same sweep from another dir (same values) does not stand for a point
    of this one, whose result.json files say which runs are its own."""
    own = [json.loads(p.read_text()) for p in hydra_sweep.glob("*/result.json")]
    elsewhere = record("later", "cot", 0.25)  # the very point missing here
    assert missing_points(runs_frame(own + [elsewhere]), hydra_sweep) == [
        {"trunc": 0.25, "sections": "cot", "sweep": "demo"}]
