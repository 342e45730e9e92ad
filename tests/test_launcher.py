"""Launcher presets: each composes, exposes the site keys, and makes submitit write the sbatch file
committed under tests/golden/sbatch/.

The golden files come from hydra-submitit-launcher's own code path: ``launch.py -m`` runs for real
with a fake ``sbatch`` first on PATH. The fake records the file it is given and answers like Slurm
(``Submitted batch job 4242``); the launcher then waits for the jobs, and the test stops it (its own
process group, by PID) as soon as the file is recorded. Everything up to the submission is the real
thing: Hydra's composition, the launcher's parameter mapping, submitit's sbatch writer. Machine
specific parts are replaced by placeholders: the sweep dir by ``<sweep_dir>``, the Python executable
by ``<python>``. ``KD_UPDATE_GOLDEN=1 pytest tests/test_launcher.py`` rewrites the files.
"""

from __future__ import annotations

import difflib
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import CONF, ROOT

GOLDEN = ROOT / "tests" / "golden" / "sbatch"
PRESETS = sorted(p.stem for p in (CONF / "launcher").glob("*.yaml"))
SLURM_PRESETS = [p for p in PRESETS if p.startswith("slurm")]
GRID = ["trunc=0.25,0.5,1.0"]  # a job array of 3 points
# Site keys set from the command line, so that the golden files show where they land.
SITE = ["hydra.launcher.partition=batch", "hydra.launcher.account=kd-lab", "hydra.launcher.qos=normal"]
JOB_ID = "4242"

FAKE_SBATCH = f"""#!/bin/sh
# Record the submitted file (atomically: the test polls for it), answer as Slurm does.
cp "$1" "$KD_FAKE_SBATCH_DIR/.partial" && mv "$KD_FAKE_SBATCH_DIR/.partial" "$KD_FAKE_SBATCH_DIR/submitted.sh"
echo "Submitted batch job {JOB_ID}"
"""
FAKE_SACCT = "#!/bin/sh\n# No job ever shows up: the launcher keeps waiting until the test stops it.\nexit 0\n"
FAKE_SRUN = "#!/bin/sh\necho 'fake srun: not a cluster' >&2\nexit 1\n"  # submitit only checks it exists


def _hydra_config(overrides):
    from hydra import compose, initialize_config_dir

    from kd_sweeps.schema import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=True)


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_composes_with_the_matching_launcher(preset):
    launcher = _hydra_config([f"launcher={preset}"]).hydra.launcher
    expected = {"basic": "BasicLauncher", "local": "LocalLauncher"}.get(preset, "SlurmLauncher")
    assert launcher._target_.endswith(expected)
    if preset != "basic":
        assert launcher.timeout_min >= 30, "submitit's 60 min default is only ever raised, or cut on purpose"


@pytest.mark.parametrize("preset", SLURM_PRESETS)
def test_slurm_preset_site_keys_default_to_null_and_are_settable(preset):
    launcher = _hydra_config([f"launcher={preset}"]).hydra.launcher
    assert (launcher.partition, launcher.account, launcher.qos) == (None, None, None)
    assert launcher.signal_delay_s >= 60 and launcher.max_num_timeout >= 1
    assert launcher.additional_parameters.requeue is True
    assert launcher.signal_delay_s * 5 < launcher.timeout_min * 60, "the warning must come well before the end"
    site = _hydra_config([f"launcher={preset}", *SITE]).hydra.launcher
    assert (site.partition, site.account, site.qos) == ("batch", "kd-lab", "normal")


def test_gpu_presets_match_model_sizes():
    small = _hydra_config(["launcher=slurm_gpu_small"]).hydra.launcher
    big = _hydra_config(["launcher=slurm_gpu_4b_8b"]).hydra.launcher
    tiny = _hydra_config(["launcher=slurm_cpu_tiny"]).hydra.launcher
    assert tiny.gpus_per_node is None and tiny.cpus_per_task <= 2
    assert small.gpus_per_node == 1 and small.timeout_min == 6 * 60
    assert big.gpus_per_node == big.tasks_per_node == 4 and big.nodes == 1
    assert big.cpus_per_task * big.tasks_per_node == 32 and big.mem_gb == 256 and big.timeout_min == 24 * 60


def _fake_slurm_bin(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for name, text in (("sbatch", FAKE_SBATCH), ("sacct", FAKE_SACCT), ("srun", FAKE_SRUN)):
        (folder / name).write_text(text)
        (folder / name).chmod(0o755)
    return folder


def _start_submission(preset: str, work: Path, fake_bin: Path) -> subprocess.Popen:
    record = work / "record"
    record.mkdir(parents=True)
    env = {**os.environ, "PATH": f"{fake_bin}{os.pathsep}{os.environ.get('PATH', '')}",
           "KD_FAKE_SBATCH_DIR": str(record)}
    command = [sys.executable, str(ROOT / "launch.py"), "-m", *GRID, f"launcher={preset}",
               f"hydra.sweep.dir={work / 'sweep'}", *SITE]
    log = open(work / "launch.log", "wb")
    # A session of its own: the whole launch (and anything it started) stops with one killpg.
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _wait_for_record(proc: subprocess.Popen, work: Path, timeout_s: float = 90) -> str:
    recorded = work / "record" / "submitted.sh"
    deadline = time.monotonic() + timeout_s
    try:
        while not recorded.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                log = (work / "launch.log").read_text(errors="replace")[-3000:]
                raise AssertionError(f"launch.py never called sbatch (exit {proc.returncode}):\n{log}")
            time.sleep(0.05)
        return recorded.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def normalise(text: str, sweep_dir: Path) -> str:
    """Replace what differs between machines and runs with placeholders."""
    text = text.replace(str(sweep_dir), "<sweep_dir>")
    text = text.replace(shlex.quote(sys.executable), "<python>")
    return text.replace(str(ROOT), "<repo>")


@pytest.fixture(scope="module")
def submitted(tmp_path_factory) -> dict[str, str]:
    """The normalised sbatch file of every Slurm preset (all launched at once: ~2-5 s each)."""
    root = tmp_path_factory.mktemp("sbatch")
    fake_bin = _fake_slurm_bin(root / "bin")
    procs = {p: _start_submission(p, root / p, fake_bin) for p in SLURM_PRESETS}
    return {p: normalise(_wait_for_record(proc, root / p), root / p / "sweep") for p, proc in procs.items()}


@pytest.mark.parametrize("preset", SLURM_PRESETS)
def test_sbatch_matches_golden(preset, submitted):
    golden = GOLDEN / f"{preset}.sh"
    actual = submitted[preset]
    if os.environ.get("KD_UPDATE_GOLDEN") == "1":
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(actual)
    assert golden.exists(), f"no golden file {golden}; create it with KD_UPDATE_GOLDEN=1"
    expected = golden.read_text()
    if actual != expected:
        diff = "".join(difflib.unified_diff(expected.splitlines(True), actual.splitlines(True),
                                            f"golden/{preset}.sh", f"submitted by launcher={preset}"))
        pytest.fail(f"the sbatch file of launcher={preset} changed:\n{diff}\nIf the change is intended, "
                    f"rerun with KD_UPDATE_GOLDEN=1 and commit tests/golden/sbatch/{preset}.sh")


@pytest.mark.parametrize("preset", SLURM_PRESETS)
def test_sbatch_has_every_scheduling_line(preset, submitted):
    lines = {line.split("=")[0] for line in submitted[preset].splitlines() if line.startswith("#SBATCH")}
    for flag in ("partition", "account", "qos", "time", "cpus-per-task", "mem", "array", "signal",
                 "requeue", "output", "error", "nodes", "ntasks-per-node"):
        assert f"#SBATCH --{flag}" in lines, f"launcher={preset}: no --{flag} line"
    assert "#SBATCH --array=0-2%3" in submitted[preset]  # 3 points, all allowed to run at once
    assert "#SBATCH --signal=USR2@120" in submitted[preset]


def test_every_slurm_preset_has_a_golden_file_and_no_other():
    assert sorted(p.stem for p in GOLDEN.glob("*.sh")) == SLURM_PRESETS
