"""The one owner of a grid point's ``result.json``: every status a point can take is written here.

    running      a job opened the record (``opened``; a reopened evaluation: ``reopened``)
    ok           training and evaluation finished (``closed``)
    evaluating   training finished, a separate evaluation job will finish the record (``closed`` /
                 ``evaluating``)
    failed       with the error (``closed`` on an exception, ``failed`` on a record, ``failure`` for
                 a point that failed before its record was opened)
    preempted    stopped by the scheduler's signal after saving its state: the requeue resumes it
    interrupted  stopped by Ctrl-C
    ``last_action`` says what this launch did to the point (ran / skipped / failed / preempted /
    interrupted); ``job_id`` and ``host`` say who wrote the record (the claim's holder). Records are
    written atomically and without secrets (kd_sweeps/redact.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

from kd_sweeps.record_files import now_iso, write_json_atomic
from kd_sweeps.redact import redact

RESULT_FILE = "result.json"
STATUSES = ("running", "ok", "evaluating", "failed", "preempted", "interrupted")


def write_result(output_dir: Path, result: dict) -> None:
    """A point's result.json, atomically and without secrets."""
    write_json_atomic(Path(output_dir) / RESULT_FILE, redact(result))


def read_result(output_dir: Path) -> Optional[dict]:
    """The point's result.json, or None if there is none (or it cannot be parsed)."""
    try:
        return json.loads((Path(output_dir) / RESULT_FILE).read_text())
    except (OSError, ValueError):
        return None


def writer() -> dict:
    """Which job and host write the record (the claim's holder, kd_sweeps/claim.py)."""
    from kd_sweeps.claim import holder

    who = holder()
    return {"job_id": who["job_id"], "host": who["host"]}


class PointRecord:
    """``result.json`` of the point in ``folder``: the fresh records and every transition."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def read(self) -> Optional[dict]:
        return read_result(self.folder)

    def write(self, record: dict) -> dict:
        if record.get("status") not in STATUSES:
            raise ValueError(f"a point's status is one of {', '.join(STATUSES)}, not {record.get('status')!r}")
        write_result(self.folder, record)
        return record

    # --------------------------------------------------------------------------- fresh records

    @staticmethod
    def opened(run_id: str, sweep: str, overrides: Sequence[str], config: dict) -> dict:
        """A job starts the point (not written yet: the tracker writes it when it opens)."""
        return {"run_id": run_id, "sweep": sweep, "status": "running", "error": None,
                "overrides": redact(list(overrides)), "config": config, "summary": {},
                "started_at": now_iso(), "finished_at": None, "launched_at": now_iso(),
                "last_action": "ran", **writer()}

    def failure(self, sweep: str, overrides: Sequence[str], error: str) -> dict:
        """A point that failed before its record was opened (bad config, unwritable cache, ...)."""
        return self.write({"run_id": None, "sweep": sweep, "status": "failed", "error": error,
                           "overrides": list(overrides), "config": None, "summary": {}, "started_at": now_iso(),
                           "finished_at": now_iso(), "launched_at": now_iso(), "last_action": "failed",
                           **writer()})

    def lost(self, overrides: Sequence[str], sweep: str, reason: str) -> dict:
        """A point whose process was lost (killed, out of time or memory): failed, keeping what its
        run recorded (config, id, start); a record that says ok is left as it is."""
        record = self.read() or {}
        if record.get("status") == "ok":
            return record
        return self.write({"run_id": None, "config": None, "summary": {}, "started_at": None, **record,
                           "sweep": record.get("sweep", sweep), "overrides": list(overrides), "status": "failed",
                           "error": reason, "finished_at": now_iso(), "launched_at": now_iso(),
                           "last_action": "failed"})

    # --------------------------------------------------------------------------- transitions

    @staticmethod
    def reopened(record: dict) -> dict:
        """A later job continues the record (the evaluation job): running again, by this writer."""
        return {**record, "status": "running", "error": None, "finished_at": None, **writer()}

    def closed(self, record: dict, status: str, error: Optional[str] = None) -> dict:
        """The job's end: ``status`` (ok / evaluating, or failed / preempted / interrupted with the
        error, which is then also this launch's last action)."""
        record["status"] = status
        if error is not None:
            record["error"] = error
        if status in ("failed", "preempted", "interrupted"):
            record["last_action"] = status
        record["finished_at"] = now_iso()
        return self.write(record)

    def failed(self, record: dict, error: str) -> dict:
        """An open record fails (an evaluation job not submitted, dead, or never recorded)."""
        record.update(status="failed", error=error, last_action="failed")
        return self.write(record)

    def skipped(self, record: dict) -> dict:
        """This launch found the point done, so the sweep summary can count it."""
        return self.write({**record, "last_action": "skipped", "launched_at": now_iso()})

    def evaluating(self, record: dict) -> dict:
        """Training is done; (another) evaluation job takes the record over."""
        record.update(status="evaluating", error=None, last_action="ran", launched_at=now_iso(), finished_at=None)
        return self.write(record)
