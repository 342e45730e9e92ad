"""Sequence lengths for the plan: measured, cached, estimated or assumed, and what a point keeps.

Where they come from, first match wins, per data config and student tokenizer:
1. the embedded task (``data.source=synthetic``): generated in code and encoded (embedded student)
   or estimated from characters (pretrained student), every time: it takes under a second;
2. a real dataset measured before: ``<cache_dir>/plan/lengths-<key>.npz`` (cache_dir is the run's,
   ``KD_SWEEPS_CACHE`` or ~/.cache/kd-sweeps), keyed by the data config (and a local file's size
   and time) and the student's tokenizer;
3. a real dataset that can be read here (local file or folder, or a hub dataset in the local HF
   cache): encoded with the student's tokenizer when it is at hand offline (the embedded one, a
   local folder, the HF cache), else estimated from characters; then written to that cache;
4. data that cannot be read: every sequence assumed the same, ``--lengths P,COT,A`` or else the
   data preset's ``data.assumed_lengths``; the longest sequence is ``data.max_tokens`` (the length
   filter drops longer rows), the honest bound for memory.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from kd_sweeps.identity import NON_IDENTITY_DATA_KEYS

CHARS_PER_TOKEN = 3.5  # length estimate for pretrained tokenizers (see estimated_sequences)
TEMPLATE_TOKENS_BEFORE, TEMPLATE_TOKENS_AFTER = 8, 2  # Qwen3 chat template around the two turns
LENGTHS_VERSION = 1  # bump when what a cached file holds changes: older files are then not read
NOT_IN_KEY = NON_IDENTITY_DATA_KEYS  # data keys that change no row or length (a point's id leaves them out too)


@dataclass
class Sequences:
    """Full (untruncated) training sequences of one data config: token lengths and span bounds."""

    length: np.ndarray  # (N,) templated length
    cot_start: np.ndarray  # (N,) first <think> = end of the prompt P
    cot_end: np.ndarray  # (N,) one past the first </think> = start of the answer A
    exact: bool  # encoded with the real tokenizer (True) or estimated / assumed
    source: str = "tokenized"  # tokenized | characters | assumed
    detail: str = ""  # where: "cached", the cache file written, the assumption's key
    longest: "Sequences | None" = None  # assumed lengths: the one worst-case sequence memory is sized for


def encoded_sequences(data_cfg, tokenizer) -> Sequences:
    from kd_sweeps import data

    encoded, _, _ = data.load_encoded(data_cfg, "train", tokenizer)  # a real dataset: length-filtered, then split
    length = np.array([len(e.input_ids) for e in encoded], dtype=np.int64)
    cot = np.array([e.spans.cot for e in encoded], dtype=np.int64).reshape(-1, 2)
    return Sequences(length, cot[:, 0], cot[:, 1], exact=True)


def estimated_sequences(data_cfg) -> Sequences:
    """Lengths from characters: ``CHARS_PER_TOKEN`` = 3.5 for Qwen3's 151k BPE on English math reasoning
    (~4 on prose, fewer where digits split one per token: expect +-25%), each marker one token, plus
    the chat template's 8 tokens before the answer turn and 2 after it."""
    from kd_sweeps import data

    def tokens(text: str) -> int:
        return math.ceil(len(text) / CHARS_PER_TOKEN)

    rows = []
    for record in data.load_records(data_cfg, "train"):
        reasoning = record["reasoning"]
        start, end = reasoning.find("<think>"), reasoning.find("</think>")
        if start < 0 or end < start:
            continue  # no markers: data.encode drops these too
        prompt = TEMPLATE_TOKENS_BEFORE + tokens(record["problem"]) + tokens(reasoning[:start])
        cot_end = prompt + 2 + tokens(reasoning[start + len("<think>"):end])  # markers: one token each
        length = cot_end + tokens(reasoning[end + len("</think>"):]) + TEMPLATE_TOKENS_AFTER
        if length <= data_cfg.max_tokens:
            rows.append((length, prompt, cot_end))
    if not rows:
        raise ValueError(f"no training sequence with both markers within data.max_tokens={data_cfg.max_tokens}")
    table = np.array(rows, dtype=np.int64)
    return Sequences(table[:, 0], table[:, 1], table[:, 2], exact=False, source="characters")


def assumed_sequences(count: int, lengths, max_tokens: int, detail: str) -> Sequences:
    """``count`` sequences of (P, CoT, A) tokens each, and for memory one of ``max_tokens`` tokens with
    the same proportions. Uniform lengths make the attention FLOPs a little low (mean T^2 >= (mean T)^2)."""
    prompt, cot, answer = (int(x) for x in lengths)
    ones = np.ones(count, dtype=np.int64)
    scale = max_tokens / (prompt + cot + answer)
    worst_p = max(1, round(prompt * scale))
    worst_cot_end = min(max_tokens, worst_p + max(1, round(cot * scale)))
    longest = Sequences(np.array([max_tokens]), np.array([worst_p]), np.array([worst_cot_end]), exact=False,
                        source="assumed", detail=detail)
    return Sequences(ones * (prompt + cot + answer), ones * prompt, ones * (prompt + cot), exact=False,
                     source="assumed", detail=detail, longest=longest)


def point_tokens(seqs: Sequences, trunc: float, mode: str, sections, cut_after_think: bool):
    """(kept length, supervised tokens) per sequence: ``sections.supervised_tokens`` in closed form."""
    length = np.minimum(seqs.length, seqs.cot_end) if cut_after_think else seqs.length
    keep = np.maximum(1, (length * trunc).astype(np.int64))  # floor, at least one token
    if mode in ("lead", "left"):
        start, end = np.zeros_like(length), keep
    elif mode == "middle":
        start = (length - keep) // 2
        end = start + keep
    elif mode == "right":
        start, end = length - keep, length
    else:  # random_labels: every token kept, n - round((1 - trunc) * n) of the labels
        start, end = np.zeros_like(length), length
    bounds = {"P": (0, seqs.cot_start), "CoT": (seqs.cot_start, seqs.cot_end), "A": (seqs.cot_end, seqs.length)}
    first = start + 1  # the first kept token has no predecessor in the window: never a target
    supervised = sum(np.clip(np.minimum(hi, end) - np.maximum(lo, first), 0, None)
                     for lo, hi in (bounds[s] for s in dict.fromkeys(sections)))
    if mode == "random_labels":
        supervised = supervised - np.round((1.0 - trunc) * supervised).astype(np.int64)
    return end - start, supervised


# --------------------------------------------------------------------------- the cache of measured lengths


def lengths_key(data_cfg, tokenizer_id: str, method: str) -> str:
    """16 hex digits over what the rows and their lengths depend on."""
    data = {k: v for k, v in OmegaConf.to_container(data_cfg, resolve=True).items() if k not in NOT_IN_KEY}
    local = Path(str(data.get("path") or "")).expanduser()
    stamp = None
    if data.get("source") in ("json", "path") and local.exists():  # a local copy edited in place is new data
        stat = local.stat()
        stamp = [stat.st_size, stat.st_mtime_ns]
    payload = json.dumps({"version": LENGTHS_VERSION, "data": data, "stamp": stamp, "tokenizer": tokenizer_id,
                          "method": method}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def cache_file(cache_dir, key: str) -> Path:
    return Path(str(cache_dir)).expanduser() / "plan" / f"lengths-{key}.npz"


def read_cached(path: Path) -> Sequences | None:
    """The sequences a cache file holds, or None when it is absent or unreadable (then re-measured)."""
    try:
        with np.load(path, allow_pickle=False) as saved:
            meta = json.loads(str(saved["meta"]))
            return Sequences(saved["length"].astype(np.int64), saved["cot_start"].astype(np.int64),
                             saved["cot_end"].astype(np.int64), exact=meta["method"] == "tokenized",
                             source=meta["method"], detail=f"cached {path}")
    except (OSError, KeyError, ValueError):
        return None


def write_cached(path: Path, seqs: Sequences, meta: dict) -> None:
    """Atomically (``record_files.atomic_file``): a parallel plan reads the old file or the new one."""
    from kd_sweeps.record_files import atomic_file

    with atomic_file(path, "wb") as handle:
        np.savez(handle, length=seqs.length.astype(np.int32), cot_start=seqs.cot_start.astype(np.int32),
                 cot_end=seqs.cot_end.astype(np.int32), meta=np.array(json.dumps(meta, sort_keys=True)))


# --------------------------------------------------------------------------- per data config


def _offline_tokenizer(cfg):
    """The pretrained student's tokenizer if it is on this machine (a local folder or the HF cache),
    else None: the plan never downloads."""
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(cfg.model.student.name_or_path, local_files_only=True,
                                             trust_remote_code=cfg.model.trust_remote_code)
    except Exception:
        return None


def _checked_lengths(value, key: str) -> tuple[int, int, int]:
    parts = list(value)
    if len(parts) != 3 or not all(isinstance(x, int) and x >= 1 for x in parts):
        raise ValueError(f"{key}={parts}: expected three positive token counts [P, CoT, A]")
    return parts[0], parts[1], parts[2]


class LengthFinder:
    """The sequences of each (data config, student tokenizer), found once per plan (module docstring)."""

    def __init__(self, lengths_option: tuple[int, int, int] | None = None):
        self.lengths_option = lengths_option  # --lengths: in place of data.assumed_lengths
        self._found: dict[str, Sequences | Exception] = {}
        self._tokenizer = None

    def embedded_tokenizer(self):
        if self._tokenizer is None:  # built in memory (no cache dir written)
            from kd_sweeps.tokenizer import build_tokenizer

            self._tokenizer = build_tokenizer()
        return self._tokenizer

    def sequences(self, cfg) -> Sequences:
        from kd_sweeps.models import TASK_VERSION

        embedded = cfg.model.student.source == "embedded"
        tokenizer_id = f"embedded:{TASK_VERSION}" if embedded else f"pretrained:{cfg.model.student.name_or_path}"
        key = json.dumps([tokenizer_id, OmegaConf.to_container(cfg.data, resolve=True)], sort_keys=True)
        if key not in self._found:
            try:
                self._found[key] = self._find(cfg, tokenizer_id, embedded)
            except Exception as err:  # reported on every point that uses these data
                self._found[key] = err
        found = self._found[key]
        if isinstance(found, Exception):
            raise ValueError(f"training data: {type(found).__name__}: {found}")
        return found

    def _find(self, cfg, tokenizer_id: str, embedded: bool) -> Sequences:
        data_cfg = cfg.data
        if data_cfg.source == "synthetic":
            return encoded_sequences(data_cfg, self.embedded_tokenizer()) if embedded \
                else estimated_sequences(data_cfg)
        files = {method: cache_file(cfg.cache_dir, lengths_key(data_cfg, tokenizer_id, method))
                 for method in ("tokenized", "characters")}
        for path in files.values():
            cached = read_cached(path)
            if cached is not None:
                return cached
        try:
            tokenizer = self.embedded_tokenizer() if embedded else _offline_tokenizer(cfg)
            seqs = encoded_sequences(data_cfg, tokenizer) if tokenizer is not None else estimated_sequences(data_cfg)
        except Exception as err:
            return self._assumed(data_cfg, err)
        path = files[seqs.source]
        try:
            write_cached(path, seqs, {"method": seqs.source, "tokenizer": tokenizer_id, "data": data_cfg.name,
                                      "sequences": int(len(seqs.length))})
            seqs.detail = f"measured here, cached {path}"
        except OSError as err:
            seqs.detail = f"measured here; not cached ({err})"
        return seqs

    def _assumed(self, data_cfg, err: Exception) -> Sequences:
        if self.lengths_option is not None:
            lengths, key = self.lengths_option, "--lengths"
        elif data_cfg.get("assumed_lengths") is not None:
            lengths = _checked_lengths(data_cfg.assumed_lengths, "data.assumed_lengths")
            key = f"data.assumed_lengths of data={data_cfg.name}"
        else:
            raise ValueError(f"{type(err).__name__}: {err}; without the data the plan needs assumed lengths: "
                             "--lengths P,COT,A or data.assumed_lengths=[P,CoT,A]") from err
        detail = (f"{key}: P {lengths[0]:,}, CoT {lengths[1]:,}, A {lengths[2]:,} tokens; the data cannot be read "
                  f"here: {type(err).__name__}")
        # data.n_train caps the rows kept; all of them are assumed to pass the length filter.
        return assumed_sequences(data_cfg.n_train or 10_000, lengths, data_cfg.max_tokens, detail)

