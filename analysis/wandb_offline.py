"""Read wandb offline runs (``offline-run-*/run-<id>.wandb``) without syncing.

Offline run directories hold no config.yaml or wandb-summary.json, and wandb no
longer ships a reader, so we parse the LevelDB-style log ourselves: a 7-byte
header ``<4sHB`` (b":W&B", 0xBEE1, version 0), then 32 KiB blocks (the header
counts towards the first) of chunks with a ``<IHB`` (crc, length, type) header,
type FULL/FIRST/MIDDLE/LAST = 1..4, crc = zlib CRC-32 (IEEE, unmasked) of the
type byte plus the data; block tails under 7 bytes are zero padding.  Each
assembled record is a serialized ``wandb_internal_pb2.Record``.  The writer
flushes every ~15 s, so a killed run loses its last records.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from google.protobuf.message import DecodeError
from wandb.proto import wandb_internal_pb2 as pb

log = logging.getLogger(__name__)

_FILE_HEADER = struct.pack("<4sHB", b":W&B", 0xBEE1, 0)
_CHUNK = struct.Struct("<IHB")
_BLOCK = 32 * 1024
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4
# CRC state after the type byte, so each chunk is checksummed without a copy.
_TYPE_CRC = [zlib.crc32(bytes([t])) for t in range(5)]
_REMOVED = object()  # marks a removed key path, see _note

# A run without an exit record whose log was written this recently is taken
# to be alive: the writer flushes at least every ~15 s while a run is open.
RUNNING_WINDOW_S = 300.0


def _tag_prefix(name: str) -> bytes:
    """Varint-encoded tag of a length-delimited Record field (< 2048)."""
    tag = pb.Record.DESCRIPTOR.fields_by_name[name].number << 3 | 2
    return bytes([tag]) if tag < 0x80 else bytes([tag & 0x7F | 0x80, tag >> 7])


# record_type is a oneof, so a record whose first tag is one of these fields
# is of that type and is dropped unparsed; anything else is parsed normally.
_SKIP = tuple(_tag_prefix(n) for n in (
    "output", "output_raw", "output_logger", "files", "stats", "artifact",
    "tbrecord", "alert", "telemetry", "metric", "environment", "use_artifact"))
_SKIP_HISTORY = _SKIP + (_tag_prefix("history"),)


@dataclass
class OfflineRun:
    path: Path
    run_id: str
    name: str | None = None
    project: str | None = None
    group: str | None = None
    job_type: str | None = None
    tags: list[str] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    exit_code: int | None = None
    state: str = "crashed"
    start_time: float | None = None  # epoch seconds, from the run record
    segments: int = 1  # offline logs folded into this run (a requeued job resumes the same run)


def _payloads(path: Path) -> Iterator[bytes]:
    """Yield the raw serialized records of one log file, in order."""
    data = path.read_bytes()
    n = len(data)
    if n < len(_FILE_HEADER) and _FILE_HEADER.startswith(data):
        # Created but never flushed (run just started or killed right away).
        log.warning("%s: no records yet (file is %d bytes)", path, n)
        return
    if data[: len(_FILE_HEADER)] != _FILE_HEADER:
        raise ValueError(f"{path}: not a wandb run log (header {data[:7]!r})")
    pos, parts = len(_FILE_HEADER), []
    while True:
        room = _BLOCK - pos % _BLOCK
        if room < _CHUNK.size:
            pos += room
            continue
        if pos + _CHUNK.size > n:
            if pos < n or parts:
                log.warning("%s: truncated at byte %d, ignoring the incomplete record", path, pos)
            return
        crc, length, kind = _CHUNK.unpack_from(data, pos)
        start, end = pos + _CHUNK.size, pos + _CHUNK.size + length
        if kind == 0 and not any(data[pos:]):  # size grew, data never landed
            log.warning("%s: zeroed tail from byte %d, ignoring it", path, pos)
            return
        if end > n:
            log.warning("%s: truncated inside the chunk at byte %d", path, pos)
            return
        if not _FULL <= kind <= _LAST or length > room - _CHUNK.size:
            raise ValueError(f"{path}: corrupt chunk header at byte {pos}")
        chunk = data[start:end]
        if zlib.crc32(chunk, _TYPE_CRC[kind]) != crc:
            raise ValueError(f"{path}: checksum mismatch in chunk at byte {pos}")
        if (kind in (_FULL, _FIRST)) == bool(parts):
            raise ValueError(f"{path}: chunk of type {kind} out of sequence at byte {pos}")
        pos = end
        parts.append(chunk)
        if kind in (_FULL, _LAST):
            yield b"".join(parts)  # returns the chunk itself when it is alone
            parts = []


def _parse(path: Path, payload: bytes) -> pb.Record:
    try:
        return pb.Record.FromString(payload)
    except DecodeError as exc:
        raise ValueError(f"{path}: undecodable record: {exc}") from exc


def iter_records(path) -> Iterator[pb.Record]:
    """Every record of a ``.wandb`` log; ValueError naming the file if corrupt."""
    path = Path(path)
    for payload in _payloads(path):
        yield _parse(path, payload)


def _keys(item) -> tuple[str, ...]:
    return tuple(item.nested_key) or (item.key,)


def _value(item):
    if item.value_json:
        return json.loads(item.value_json)  # also accepts NaN / Infinity
    # History items may carry a typed value instead of JSON.
    which = item.WhichOneof("value") if isinstance(item, pb.HistoryItem) else None
    value = None if which in (None, "none") else getattr(item, which)
    return json.loads(value) if which == "json" else value


def _set(target: dict, keys: tuple[str, ...], value) -> None:
    for key in keys[:-1]:
        child = target.get(key)
        if not isinstance(child, dict):
            child = target[key] = {}
        target = child
    target[keys[-1]] = value


def _remove(target, keys: tuple[str, ...]) -> None:
    for key in keys[:-1]:
        target = target.get(key) if isinstance(target, dict) else None
    if isinstance(target, dict):
        target.pop(keys[-1], None)


def _unwrap(value):
    # The log stores raw values; the config.yaml-style {"desc", "value"}
    # wrapper is accepted too, in case a writer ever emits it.
    wrapped = isinstance(value, dict) and value.keys() == {"desc", "value"}
    return value["value"] if wrapped else value


def _note(writes: dict, record) -> None:
    # Keep only the last write (update or removal) per key path, in order.
    # Each write replaces the whole subtree at its path, so replaying these
    # equals replaying all writes, without decoding JSON that is overwritten
    # later (the summary is rewritten at every step).
    for items, removal in ((record.update, False), (record.remove, True)):
        for item in items:
            keys = _keys(item)
            writes.pop(keys, None)
            writes[keys] = _REMOVED if removal else item


def _replay(writes: dict, unwrap=lambda v: v) -> dict:
    out: dict = {}
    for keys, item in writes.items():
        if item is _REMOVED:
            _remove(out, keys)
        else:
            _set(out, keys, unwrap(_value(item)))
    # wandb's own bookkeeping (versions, telemetry, runtime), not run data.
    out.pop("_wandb", None)
    return out


def read_run(run_dir_or_file, read_history: bool = False) -> OfflineRun:
    """Fold one run's log into an OfflineRun (history only if read_history)."""
    file = Path(run_dir_or_file)
    if file.is_dir():
        files = sorted(file.glob("run-*.wandb"))
        if len(files) != 1:
            raise FileNotFoundError(f"{file}: expected one run-*.wandb, found {len(files)}")
        file = files[0]
    run = OfflineRun(path=file.parent, run_id=file.stem.removeprefix("run-"))
    skip = _SKIP if read_history else _SKIP_HISTORY
    config: dict = {}  # key path -> last write, see _note
    summary: dict = {}
    for payload in _payloads(file):
        if payload.startswith(skip):
            continue
        record = _parse(file, payload)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            # Later run records are full snapshots (e.g. after tags change).
            r = record.run
            run.run_id = r.run_id or run.run_id
            run.name = r.display_name or run.name
            run.project = r.project or run.project
            run.group = r.run_group or run.group
            run.job_type = r.job_type or run.job_type
            run.tags = list(r.tags)
            if r.HasField("start_time"):
                run.start_time = r.start_time.seconds + r.start_time.nanos / 1e9
            _note(config, r.config)
        elif kind == "config":
            _note(config, record.config)
        elif kind == "summary":
            _note(summary, record.summary)
        elif kind == "history" and read_history:
            row: dict = {}
            for item in record.history.item:
                _set(row, _keys(item), _value(item))
            if "_step" not in row and record.history.HasField("step"):
                row["_step"] = record.history.step.num
            run.history.append(row)
        elif kind == "exit":
            run.exit_code = record.exit.exit_code
    run.config = _replay(config, _unwrap)
    run.summary = _replay(summary)
    if run.exit_code is not None:
        run.state = "finished" if run.exit_code == 0 else "failed"
    elif time.time() - file.stat().st_mtime < RUNNING_WINDOW_S:
        run.state = "running"
    return run


def find_runs(root) -> list[Path]:
    """All ``offline-run-*/run-*.wandb`` files below root, sorted."""
    # os.walk skips symlinked dirs, so wandb's latest-run link is not counted.
    return sorted(Path(d, f) for d, _, files in os.walk(root)
                  if Path(d).name.startswith("offline-run-")
                  for f in files if f.startswith("run-") and f.endswith(".wandb"))


def merge_resumed(runs: list[OfflineRun]) -> list[OfflineRun]:
    """One run per id and folder. A resumed run (a preempted job requeued with the same W&B id)
    leaves one offline log per attempt beside each other; fold them in start order: later config, summary keys and state win,
    and history rows of an earlier attempt from the step the next one restarted at are dropped
    (the resumed job redid the steps after its last saved state)."""
    by_id: dict[tuple, list[OfflineRun]] = {}
    for run in runs:  # the same point in another sweep folder has the same id: a separate run
        by_id.setdefault((run.run_id, Path(run.path).parent), []).append(run)
    merged = []
    for parts in by_id.values():
        parts.sort(key=lambda r: (r.start_time or 0.0, str(r.path)))
        run = parts[0]
        for later in parts[1:]:
            restart = min((row["_step"] for row in later.history if "_step" in row), default=None)
            kept = [row for row in run.history if restart is None or row.get("_step", -1) < restart]
            run = OfflineRun(path=later.path, run_id=later.run_id, name=later.name or run.name,
                             project=later.project or run.project, group=later.group or run.group,
                             job_type=later.job_type or run.job_type, tags=later.tags or run.tags,
                             config={**run.config, **later.config}, summary={**run.summary, **later.summary},
                             history=kept + later.history, exit_code=later.exit_code, state=later.state,
                             start_time=run.start_time, segments=run.segments + later.segments)
        merged.append(run)
    return merged


# job_type of the one run per sweep launch that holds its summary table and tradeoff figure
# (kd_sweeps.callbacks.log_wandb_summary): a record of the sweep, not a grid point.
SUMMARY_JOB_TYPE = "summary"


def is_summary(run) -> bool:
    """Whether a run (offline, or one of the public API) is a sweep's summary run."""
    return getattr(run, "job_type", None) == SUMMARY_JOB_TYPE


def read_runs(root, read_history: bool = False, summaries: bool = False) -> list[OfflineRun]:
    """Every offline run below root, resumed attempts folded; sweep summary runs only with
    ``summaries`` (they are not grid points)."""
    runs = [read_run(f, read_history=read_history) for f in find_runs(root)]
    return merge_resumed([run for run in runs if summaries or not is_summary(run)])
