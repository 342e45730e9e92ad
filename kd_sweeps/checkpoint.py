"""Exact resume: the training state on disk, and preemption signals turned into a clean stop.

Slurm sends a warning signal before a preemption or a time limit (submitit asks for SIGUSR2, and
requeues the job when its handler runs). Saving inside a signal handler could catch the optimizer
half-way through an update, so the handler only sets a flag; the loop checks it after each step,
saves, and raises ``Preempted``. The run's record is closed as "preempted" while the job still owns
its processes (a requeue makes Slurm kill every process of the job step, the W&B service included),
and only then does ``Preempted.hand_over`` give the signal to whoever handled it before: submitit
requeues the job and exits; a local run stops (run the same command again to resume).

The state holds everything the next step depends on: model, optimizer, scheduler, every RNG, the
step (the batch order is a pure function of seed and step), and the caller's counters (cost, time).
"""

from __future__ import annotations

import os
import random
import signal
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch

STATE_FILE = "train_state.pt"
PREEMPTION_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)


class Preempted(RuntimeError):
    """Training stopped at a step boundary after a preemption signal; its state is on disk.

    ``handler`` is the signal's handler from before training (submitit's requeue, or None)."""

    def __init__(self, message: str, signum: int = signal.SIGTERM, handler: Any = None):
        super().__init__(message)
        self.signum, self.handler = signum, handler

    def hand_over(self) -> None:
        """Let the previous handler act (submitit: requeue and exit); if it returns, or there was
        none, re-raise: the process stops either way."""
        if callable(self.handler):
            self.handler(self.signum, None)
        raise self


class PreemptionGuard:
    """``with PreemptionGuard() as guard:`` … ``if guard.requested: save(); guard.stop(step)``."""

    def __init__(self, signals=PREEMPTION_SIGNALS):
        self.signals = signals
        self.requested: Optional[int] = None
        self._previous: dict[int, Any] = {}

    def _flag(self, signum, frame) -> None:
        self.requested = signum

    def __enter__(self) -> "PreemptionGuard":
        for sig in self.signals:
            try:
                self._previous[sig] = signal.signal(sig, self._flag)
            except ValueError:  # not the main thread: signals cannot be caught here
                pass
        return self

    def __exit__(self, *exc) -> bool:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False

    def stop(self, step: int) -> None:
        """Restore the previous handlers and raise Preempted carrying the one for this signal."""
        signum = self.requested
        previous = self._previous.get(signum)
        self.__exit__()
        raise Preempted(f"stopped by signal {signal.Signals(signum).name} after step {step}; "
                        "its state is saved: run the same point again to resume", signum, previous)


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class TrainState:
    """Save and load a run's training state in ``folder`` (atomically: temp file + rename)."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / STATE_FILE

    def exists(self) -> bool:
        return self.path.exists()

    def save(self, step: int, model, optimizer, schedule, extra: dict) -> None:
        payload = {"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                   "schedule": schedule.state_dict(), "rng": rng_state(), "extra": extra}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".train_state.", suffix=".tmp")
        os.close(fd)
        try:
            from kd_sweeps.record_files import file_mode

            os.chmod(tmp, file_mode())  # mkstemp's 0600 would hide the state from the sweep's other users
            torch.save(payload, tmp)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def load(self, model, optimizer, schedule) -> tuple[int, dict]:
        """Restore into the given objects; returns (completed steps, extra)."""
        # weights_only: tensors, numbers and containers only; no code runs while loading.
        payload = torch.load(self.path, map_location="cpu", weights_only=True)
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        schedule.load_state_dict(payload["schedule"])
        set_rng_state(payload["rng"])
        return payload["step"], payload["extra"]

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
