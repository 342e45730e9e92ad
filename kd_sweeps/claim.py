"""One writer per grid point: a claim taken before anything of the point is written.

Two launches of the same sweep (the same command run twice, a relaunch while the first still runs)
reach the same point folders, since a folder is named by the point's id. Without a claim both train
the point, and the second one's end (even a Ctrl-C) rewrites a record the first one finished. The
claim is a ``flock(2)`` lock on ``<point>/.claim`` (the kernel releases it when its holder dies, so
a killed job never blocks a rerun); while held, the file names its holder (job id, host, pid, start
time). A launch that finds the point claimed skips it (it does not wait: the holder may run for
hours, and its result is there when it finishes) and never writes the point's record.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Optional

CLAIM_FILE = ".claim"
# The evaluation job (eval.separate_job) writes the record while the point's claim holder only waits
# for it (or has ended): it is that holder's delegate, and its own claim keeps a second evaluation
# job of the same point (a resubmission racing a requeued job) from writing beside it.
EVAL_CLAIM_FILE = ".claim-eval"


class PointClaimed(RuntimeError):
    """Raised on every rank of a multi-process point whose rank 0 found the point claimed by another
    launch: the ranks learn it together, right after joining the process group, and write nothing."""


def job_id() -> Optional[str]:
    """The scheduler's id of this job (submitit / Slurm), or None for a process of its own."""
    try:
        import submitit

        return str(submitit.JobEnvironment().job_id)
    except Exception:  # noqa: BLE001 - not a submitit job
        return os.environ.get("SLURM_JOB_ID")


def holder() -> dict:
    """Who this process is, as a claim records it."""
    from kd_sweeps.record_files import now_iso

    return {"job_id": job_id(), "host": socket.gethostname(), "pid": os.getpid(), "since": now_iso()}


class PointClaim:
    """``with PointClaim(folder) as claim:`` — ``claim.owned`` says whether this process holds the
    point; if not, ``claim.holder`` names who does (as far as its file says)."""

    def __init__(self, point_dir: Path, name: str = CLAIM_FILE):
        from filelock import FileLock

        self.path = Path(point_dir) / name
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(str(self.path), timeout=0)  # never waits: a held point is skipped
        self.owned = False
        self.holder: dict = {}

    def __enter__(self) -> "PointClaim":
        from filelock import Timeout

        try:
            self._lock.acquire()
        except Timeout:
            self.holder = read_holder(self.path.parent, self.path.name)
            return self
        self.owned = True
        self.holder = holder()
        # Rewritten in place (not renamed): the flock is on this file's inode.
        with open(self.path, "w") as handle:
            json.dump(self.holder, handle)
        return self

    def __exit__(self, *exc) -> bool:
        if self.owned:
            self._lock.release()
            self.owned = False
        return False

    def describe(self) -> str:
        h = self.holder
        return (f"job {h.get('job_id') or '-'} on host {h.get('host', '?')}, pid {h.get('pid', '?')}, "
                f"since {h.get('since', '?')}")


def read_holder(point_dir: Path, name: str = CLAIM_FILE) -> dict:
    """What the claim file ``name`` of ``point_dir`` says about its holder ({} when unreadable)."""
    try:
        value = json.loads((Path(point_dir) / name).read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}
