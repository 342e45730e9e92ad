"""Checks against a real Slurm cluster (start one with `.ci/slurm/up.sh`).

Skipped unless `sinfo` is on PATH and reports an idle node.
"""

from __future__ import annotations

import os
import time

import pytest

from tests.helpers import slurm_skip_reason

submitit = pytest.importorskip("submitit")

pytestmark = pytest.mark.slurm

PARTITION = "debug"


@pytest.fixture(scope="module", autouse=True)
def _require_idle_cluster():
    reason = slurm_skip_reason()
    if reason:
        pytest.skip(reason)


def _square_plus(x: int, offset: int) -> int:
    return x * x + offset


def _die_without_result() -> None:
    os._exit(3)


def _executor(folder):
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    executor.update_parameters(
        slurm_partition=PARTITION,
        cpus_per_task=1,
        mem_gb=0.25,
        timeout_min=2,
        slurm_array_parallelism=3,
    )
    return executor


@pytest.mark.timeout(180)
def test_job_array_returns_results(tmp_path):
    executor = _executor(tmp_path)
    jobs = executor.map_array(_square_plus, [1, 2, 3], [10, 10, 10])
    assert len(jobs) == 3
    assert len({job.job_id.split("_")[0] for job in jobs}) == 1, "expected one array job"
    assert [job.result() for job in jobs] == [11, 14, 19]
    # Accounting knows about the finished tasks. slurmdbd records them a moment after the result
    # file appears, so poll sacct (through submitit) for up to 60 s before judging.
    deadline = time.monotonic() + 60
    while True:
        jobs[0].get_info(mode="force")
        if jobs[0].state == "COMPLETED" or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert jobs[0].state == "COMPLETED"


@pytest.mark.timeout(180)
def test_job_dying_without_result_raises(tmp_path):
    executor = _executor(tmp_path)
    job = executor.submit(_die_without_result)
    start = time.monotonic()
    with pytest.raises(submitit.core.utils.UncompletedJobError) as excinfo:
        job.result()
    elapsed = time.monotonic() - start
    assert elapsed < 90, f"job.result() took {elapsed:.0f}s to notice the failed job"
    assert "has not produced any output" in str(excinfo.value)
    assert job.state in {"FAILED", "OUT_OF_MEMORY", "CANCELLED", "NODE_FAIL"}, job.state
