"""Files that other processes and users read while they are written: result.json, the evaluation
and reference summaries, the training state, Hydra's saved configs, claims.

Each is written atomically (readers see the old file or the new one, never half), with the mode an
ordinary new file gets (a colleague's analysis of a shared sweep folder can read it), and stamped
with UTC times. ``kd_sweeps.tracking`` writes the records with these; the modules it builds on
(``claim``, ``checkpoint``, ``redact``) use them from here.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _json_safe(value: Any) -> Any:
    """NaN/inf are not JSON: store them as null so every reader can parse the file."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def file_mode() -> int:
    """The mode an ordinary new file gets here (0o666 less the umask). mkstemp makes 0600 files,
    which a colleague's analysis of a shared sweep folder cannot read."""
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return 0o666 & ~mask


@contextmanager
def atomic_file(path: Path, mode: str = "w"):
    """A handle on a temp file in ``path``'s folder (mode of the umask); on success it is fsynced and
    renamed over ``path``, so readers see the old file or the new one, never half; on failure removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """``text`` to ``path`` atomically (``atomic_file``)."""
    with atomic_file(path) as handle:
        handle.write(text)


def write_json_atomic(path: Path, payload: dict) -> None:
    """``payload`` as JSON, atomically (see write_text_atomic); NaN/inf become null."""
    write_text_atomic(path, json.dumps(_json_safe(payload), indent=2, sort_keys=True, allow_nan=False))
