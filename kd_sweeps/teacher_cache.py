"""The frozen teacher's top-k next-token log-probabilities, computed once per dataset and shared by
every grid point of a sweep.

Why this is exact for the sweep: a causal model's outputs at positions 0..t depend on tokens 0..t
only, so its logits on a window that starts at token 0 are the first rows of its logits on the full
sequence. ``lead`` / ``left`` truncation (any ``trunc``, with or without ``cut_after_think``) and
``random_labels`` (the whole sequence) keep such windows, so one pass of the teacher over the FULL
sequences serves every truncation ratio and every section preset. ``middle`` and ``right`` windows
start later: the online teacher sees no context before the window start, the cache would have seen
it, so those modes are refused (``check_truncation``), not silently approximated.

What is stored: for sequence i of L_i tokens, rows t = 0..L_i - 2 (row t predicts token t + 1) hold
the top-k of ``log_softmax(logits[t] / temperature)``: values as fp16, token ids as int32, sorted by
value, descending. Values are log-probabilities AT THE LOSS TEMPERATURE, so the temperature is part
of the cache key: top-k log-probs at one temperature do not determine those at another (that needs
every logit, the very thing not stored). The tail (every id outside the top k) is not stored; a loss
treats it as one "rest" bucket of mass ``1 - sum(exp(values))``, clamped at 0 against fp16 rounding,
as ``chunked_loss.chunked_kd_ce(teacher_topk=...)`` does.

On disk (one folder per cache key)::

    meta.json                  key fields, format, k, temperature, lengths, shard list, build stats
    shard-00000.safetensors    values (R, k) fp16, indices (R, k) int32, offsets (n + 1,) int64
    ...

Shard j holds sequences ``j * shard_size ...`` in order; their rows are concatenated and
``offsets[m]`` is where sequence ``j * shard_size + m`` starts (R = offsets[-1]). The folder is
written under a temporary name and renamed, under a file lock, so parallel grid points build it
once and never see half of it. Rows are read through safetensors' memory map: a grid point touches
only the rows of its batches.
"""

from __future__ import annotations

import hashlib
import json
from array import array
from itertools import accumulate
from pathlib import Path
from typing import Sequence

import torch


FORMAT = "teacher-topk-v1"  # bump when the layout or the meaning of a row changes: new cache keys
# Modes whose kept window starts at token 0 (see the module docstring).
SUPPORTED_MODES = ("lead", "left", "random_labels")


class CacheError(ValueError):
    """A cache that cannot serve this run: wrong data, unreadable shard, unsupported truncation."""


def check_truncation(mode: str) -> None:
    """Raise unless ``truncation.mode`` keeps windows that start at token 0."""
    if mode not in SUPPORTED_MODES:
        raise CacheError(
            f"train.teacher_cache=topk needs truncation.mode in {SUPPORTED_MODES}, got truncation.mode={mode!r}: "
            f"a {mode!r} window starts after token 0, and the teacher run on that window lacks the "
            f"context before it, so its logits are not rows of the cached full-sequence logits. "
            f"Use the online teacher (train.teacher_cache=none) for this mode.")


def cache_key(teacher_id: str, dataset_fingerprint: str, formatting: str, max_tokens: int, k: int,
              temperature: float, precision: str = "fp32") -> str:
    """A short hash of everything the stored rows depend on (see ``key_fields``)."""
    fields = key_fields(teacher_id, dataset_fingerprint, formatting, max_tokens, k, temperature, precision)
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def key_fields(teacher_id: str, dataset_fingerprint: str, formatting: str, max_tokens: int, k: int,
               temperature: float, precision: str = "fp32") -> dict:
    """The key as a dict, written into meta.json so a cache folder says what it holds. ``precision``:
    the teacher's forward in fp32 or under bf16 autocast (as the online teacher runs with
    train.precision=bf16); the two give slightly different rows."""
    fields = {"format": FORMAT, "teacher": teacher_id, "dataset": dataset_fingerprint, "formatting": formatting,
              "max_tokens": int(max_tokens), "k": int(k), "temperature": float(temperature)}
    if precision != "fp32":  # fp32 caches keep the key (and folder name) they had before
        fields["precision"] = precision
    return fields


def dataset_fingerprint(encoded: Sequence) -> str:
    """sha256 of every sequence's token ids (and its length, so boundaries count too)."""
    digest = hashlib.sha256()
    for enc in encoded:
        digest.update(array("q", [len(enc.input_ids), *enc.input_ids]).tobytes())
    return digest.hexdigest()


class TeacherCache:
    """A built cache folder, opened for reading. ``built`` says whether this process just built it."""

    def __init__(self, folder: Path, meta: dict, built: bool = False):
        self.folder, self.meta, self.built = Path(folder), meta, built
        self.k, self.temperature = meta["k"], meta["temperature"]
        self.lengths: list[int] = meta["lengths"]  # full token count of every cached sequence
        self.shard_size: int = meta["shard_size"]
        self._handles: dict[int, object] = {}
        self._offsets: dict[int, list[int]] = {}

    @classmethod
    def load(cls, folder, verify: bool = False) -> "TeacherCache":
        """Open a cache; check every shard's size, header and offsets against meta.json (cheap), and
        with ``verify`` its sha256 too (reads every byte)."""
        folder = Path(folder)
        try:
            meta = json.loads((folder / "meta.json").read_text())
        except (OSError, ValueError) as err:
            raise CacheError(f"no readable teacher cache at {folder} ({err}); build it with build_cache "
                             f"(a damaged one: delete {folder} and run again)") from err
        if meta.get("format") != FORMAT:
            raise CacheError(f"teacher cache at {folder} has format {meta.get('format')!r}, this code reads "
                             f"{FORMAT!r}; delete the folder to rebuild it")
        cache = cls(folder, meta)
        for number, shard in enumerate(meta["shards"]):
            cache._open(number, shard, verify)
        return cache

    def _open(self, number: int, shard: dict, verify: bool) -> None:
        from safetensors import safe_open

        path = self.folder / shard["file"]
        rebuild = f"delete {self.folder} to rebuild the cache"
        size = path.stat().st_size if path.exists() else None
        if size != shard["bytes"]:
            raise CacheError(f"teacher cache shard {path} is missing or truncated: {size} bytes on disk, "
                             f"{shard['bytes']} written; {rebuild}")
        if verify and _sha256(path) != shard["sha256"]:
            raise CacheError(f"teacher cache shard {path} is corrupted (sha256 differs from meta.json); {rebuild}")
        try:
            handle = safe_open(str(path), framework="pt")
            offsets = handle.get_tensor("offsets").tolist()
            shapes = [handle.get_slice(name).get_shape() for name in ("values", "indices")]
        except Exception as err:  # safetensors raises its own error type for a bad header
            raise CacheError(f"teacher cache shard {path} is unreadable ({err}); {rebuild}") from err
        members = self.lengths[shard["first"]:shard["first"] + shard["count"]]
        expected = list(accumulate((length - 1 for length in members), initial=0))  # L - 1 rows each
        if offsets != expected or any(shape != [expected[-1], self.k] for shape in shapes):
            raise CacheError(f"teacher cache shard {path} does not match meta.json (offsets or shapes "
                             f"{shapes} vs {expected[-1]} rows x k={self.k}); {rebuild}")
        self._handles[number], self._offsets[number] = handle, offsets

    def check(self, encoded: Sequence) -> None:
        """Raise unless ``encoded`` is exactly the data this cache was built from."""
        lengths = [len(enc.input_ids) for enc in encoded]
        if lengths == self.lengths and self.meta.get("dataset_fingerprint") == dataset_fingerprint(encoded):
            return
        differ = next((i for i, (a, b) in enumerate(zip(self.lengths, lengths)) if a != b), None)
        detail = ("same lengths, other token ids" if lengths == self.lengths else
                  f"sequence {differ} has {lengths[differ]} tokens, cached {self.lengths[differ]}"
                  if differ is not None else "one list of lengths is a prefix of the other")
        raise CacheError(f"teacher cache at {self.folder} was built for {len(self.lengths)} sequences of these "
                         f"lengths; the data has {len(lengths)} ({detail}). Rebuild with build_cache into the "
                         f"folder of cache_key(..., dataset_fingerprint(encoded), ...), or delete {self.folder}")

    def rows(self, index: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k at positions start..end-1 of sequence ``index``, i.e. for tokens start+1..end.

        Returns values (end - start, k) float32 log-probs and indices (end - start, k) int64 ids. For
        a lead window of ``kept`` tokens: ``rows(index, 0, kept - 1)``.
        """
        if not 0 <= index < len(self.lengths):
            raise IndexError(f"sequence {index} not in a cache of {len(self.lengths)} sequences")
        if not 0 <= start <= end <= self.lengths[index] - 1:
            raise IndexError(f"rows [{start}, {end}) outside sequence {index}, which has "
                             f"{self.lengths[index] - 1} predicting positions")
        number, local = divmod(index, self.shard_size)
        handle, base = self._handles[number], self._offsets[number][local]
        values = handle.get_slice("values")[base + start:base + end]  # (end - start, k) fp16
        indices = handle.get_slice("indices")[base + start:base + end]  # (end - start, k) int32
        return values.float(), indices.long()

    def gather(self, example_indices: Sequence[int], windows: Sequence[tuple[int, int]],
               supervised_masks: Sequence, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``teacher_topk`` for one collated batch, row for row with ``supervised_positions``.

        Row b of the batch is the window ``windows[b] = (start, end)`` of cached sequence
        ``example_indices[b]``; ``supervised_masks[b][j]`` (length end - start, as returned by
        ``sections.supervised_tokens``, or ``labels != IGNORE_INDEX`` of the example) says whether
        window token j is a target. ``supervised_positions(collate(...)["labels"])`` lists, batch-major
        then by time, every window position j - 1 whose next token j is supervised (j >= 1); here the
        same rows come out in the same order, taken from cached row ``start + j - 1``. Returns values
        (N, k) float32 and indices (N, k) int64, on ``device``.
        """
        values, indices = [], []
        for index, (start, end), mask in zip(example_indices, windows, supervised_masks, strict=True):
            if start != 0:
                raise CacheError(f"window ({start}, {end}) of sequence {index} starts after token 0: the "
                                 f"cache only serves truncation.mode in {SUPPORTED_MODES}")
            mask = torch.as_tensor(mask, dtype=torch.bool)
            if mask.shape != (end - start,):
                raise ValueError(f"mask of sequence {index} has shape {tuple(mask.shape)}, window holds "
                                 f"{end - start} tokens")
            predicting = mask[1:].nonzero().squeeze(1)  # (n_b,) window positions j - 1 with token j supervised
            top, ids = self.rows(index, start, end - 1)  # (end - start - 1, k)
            values.append(top[predicting])
            indices.append(ids[predicting])
        if not values:
            return torch.zeros(0, self.k, device=device), torch.zeros(0, self.k, dtype=torch.long, device=device)
        return torch.cat(values).to(device), torch.cat(indices).to(device)

    def disk_bytes(self) -> int:
        return sum(shard["bytes"] for shard in self.meta["shards"]) + (self.folder / "meta.json").stat().st_size


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()
