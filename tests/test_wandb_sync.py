"""The documented `wandb sync` form finds every offline run of a sweep folder, resumed attempts included.

Offline, `wandb sync --dry-run` lists what it would upload without an account or network; the upload
itself is not tested here (no network).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from kd_sweeps.point_record import RESULT_FILE
from kd_sweeps.tracking import Tracker
from tests.helpers import LoggerCfg

# The command of docs/launching.md ("Uploading offline runs"), with the sweep folder as {sweep_dir}.
SYNC = "wandb sync --dry-run {sweep_dir}/*/wandb/offline-run-*"



def test_documented_sync_command_finds_every_run_of_a_sweep(tmp_path):
    sweep_dir = tmp_path / "multirun" / "s"
    for point in ("p0001", "p0002"):
        with Tracker(sweep_dir / point, point, "s", {"trunc": 0.5}, LoggerCfg(), ["trunc=0.5"]):
            pass
    record = json.loads((sweep_dir / "p0001" / RESULT_FILE).read_text())
    with Tracker.reopen(sweep_dir / "p0001", record, LoggerCfg()):  # a resumed attempt: a second log
        pass
    env = {**os.environ, "WANDB_API_KEY": ""}
    wandb_cli = str(Path(sys.executable).with_name("wandb"))
    proc = subprocess.run(SYNC.replace("wandb", wandb_cli, 1).format(sweep_dir=sweep_dir), shell=True,
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    listed = re.findall(r"(\S+/run-[\w.-]+\.wandb)", proc.stdout + proc.stderr)
    assert sorted(Path(p).name for p in listed) == ["run-p0001-s.wandb", "run-p0001-s.wandb", "run-p0002-s.wandb"]
    assert len(set(listed)) == 3  # both attempts of the resumed point, each once
    # The sweep folder alone is not a form that works: wandb finds no run in it.
    bare = subprocess.run([wandb_cli, "sync", "--dry-run", str(sweep_dir)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert "No runs to sync" in bare.stdout + bare.stderr
