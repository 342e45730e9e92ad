"""Resumable evaluation: every finished completion on disk at once, never generated twice.

A benchmark's results live in one JSON-lines file in the point's folder (``eval/<benchmark>.jsonl``).
Each completion is one line, ``{"key", "prompt", "problem", "sample", "completion", "tokens",
"finished", "correct"}``, written with one ``write`` and fsync'd before generation goes on, so a
killed job loses at most the line it was writing; that torn last line is cut off when the file is
opened again. ``key`` hashes everything that decides a completion other than its prompt: the
checkpoint's files (their bytes), the sampling settings, the stop ids, the seed and the engine;
``prompt`` hashes the problem's prompt tokens and gold answer. Only lines matching both are
reused, so results of another checkpoint or other settings are never taken for this one (they stay
in the file, ignored). Samples of a problem are seeded per (problem, sample), so a resumed
evaluation draws what an uninterrupted one would have.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

log = logging.getLogger(__name__)
_DIGESTS: dict = {}  # (folder, file stats) -> digest: a checkpoint is hashed once per process


def checkpoint_digest(folder) -> str:
    """sha256 over the names and bytes of every file of a checkpoint folder (weights, config,
    generation config, tokenizer). At 4B parameters in bf16 (8 GB) this reads for ~5-10 s, once."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    stats = (str(folder.resolve()), tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files))
    if stats not in _DIGESTS:
        digest = hashlib.sha256()
        for path in files:
            digest.update(path.name.encode() + b"\0")
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 24), b""):  # 16 MiB at a time
                    digest.update(block)
        _DIGESTS[stats] = digest.hexdigest()
    return _DIGESTS[stats]


def results_key(checkpoint, sampling, stop_ids: Sequence[int], seed: int, engine: str) -> str:
    """The identity of an evaluation's settings and weights (prompts are keyed per line)."""
    fields = {"checkpoint": checkpoint_digest(checkpoint), "temperature": sampling.temperature,
              "top_p": sampling.top_p, "top_k": sampling.top_k, "max_new_tokens": sampling.max_new_tokens,
              "stop_ids": list(stop_ids), "seed": seed, "engine": engine}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def prompt_key(prompt_ids: Sequence[int], answer) -> str:
    return hashlib.sha256(json.dumps([list(map(int, prompt_ids)), str(answer)]).encode()).hexdigest()[:16]


class ResultStore:
    """The results file of one benchmark: ``load`` what matches, ``append`` as completions end."""

    def __init__(self, path, key: str, prompts: Sequence[Sequence[int]], answers: Sequence):
        self.path, self.key = Path(path), key
        self.prompt_keys = [prompt_key(p, a) for p, a in zip(prompts, answers)]

    def _drop_torn_tail(self) -> None:
        """Cut a last line that a kill left without its newline (a later append would glue onto it)."""
        size = self.path.stat().st_size
        if size == 0:
            return
        with open(self.path, "rb+") as handle:
            handle.seek(-1, os.SEEK_END)
            if handle.read(1) == b"\n":
                return
            handle.seek(0)
            keep = handle.read().rfind(b"\n") + 1  # 0 when the only line is torn
            log.warning("%s: dropping a torn last line (%d bytes) left by an interrupted write",
                        self.path, size - keep)
            handle.truncate(keep)
            handle.flush()
            os.fsync(handle.fileno())

    def load(self) -> dict:
        """{(problem, sample): row} of the lines written for this key and these prompts."""
        if not self.path.exists():
            return {}
        self._drop_torn_tail()
        rows, ignored = {}, 0
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # cannot happen after the cut above, but never trust a file
                ignored += 1
                continue
            problem = row.get("problem")
            if row.get("key") == self.key and isinstance(problem, int) and 0 <= problem < len(self.prompt_keys) \
                    and row.get("prompt") == self.prompt_keys[problem]:
                rows[(problem, row["sample"])] = row
            else:
                ignored += 1
        if ignored:
            log.info("%s: %d line(s) of other checkpoints, settings or prompts ignored", self.path, ignored)
        return rows

    def append(self, rows: Sequence[dict]) -> None:
        """Append rows (one line each) in one write, then fsync: on disk before generation goes on."""
        if not rows:
            return
        lines = "".join(json.dumps({"key": self.key, "prompt": self.prompt_keys[r["problem"]], **r}) + "\n"
                        for r in rows)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            data = lines.encode()
            while data:  # a regular file takes it all at once; the loop only guards a short write
                data = data[os.write(fd, data):]
            os.fsync(fd)
        finally:
            os.close(fd)


@contextmanager
def preemption_check() -> Iterator:
    """A ``check()`` that raises ``Preempted`` once a preemption signal (SIGUSR2 before a Slurm time
    limit or preemption, SIGTERM) has arrived; generation calls it between steps. What finished is
    on disk already, so the job can stop at once; ``Preempted`` hands the signal on (submitit
    requeues the job, which resumes from the results files). Outside the main thread signals cannot
    be caught here: ``check`` then never raises."""
    from kd_sweeps.checkpoint import Preempted, PreemptionGuard

    if threading.current_thread() is not threading.main_thread():
        yield lambda: None
        return
    with PreemptionGuard() as guard:
        def check() -> None:
            if guard.requested is None:
                return
            try:
                guard.stop(0)
            except Preempted as stop:
                raise Preempted("evaluation stopped by a preemption signal; its finished completions are "
                                "saved: run the same point again to resume", stop.signum, stop.handler) from None

        yield check
