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
import logging
import math
import os
import shutil
import time
from array import array
from itertools import accumulate
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

FORMAT = "teacher-topk-v1"  # bump when the layout or the meaning of a row changes: new cache keys
# Modes whose kept window starts at token 0 (see the module docstring).
SUPPORTED_MODES = ("lead", "left", "random_labels")
_LOGITS_PER_CHUNK = 2**26  # logit elements built at once (256 MiB in fp32): c = 2**26 // V rows


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


def _lock(folder: Path):
    from filelock import FileLock

    folder.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(folder) + ".lock")


def build_cache(teacher, encoded: Sequence, folder, k: int, temperature: float, batch_size: int, device,
                shard_size: int = 1024, key: Optional[dict] = None, vocab_size: Optional[int] = None,
                autocast: bool = False) -> TeacherCache:
    """Load the cache in ``folder``, or run the teacher once over every full sequence and write it.
    ``teacher`` may be None when the cache is known to be complete (then ``vocab_size`` is needed).

    Under a file lock next to ``folder``: of several processes building the same folder, one builds
    and the others wait, then load it. An existing cache must match ``encoded`` (count, lengths, token
    ids), ``k`` and ``temperature``, else ``CacheError``. ``key`` (``key_fields(...)``) is recorded in
    meta.json. Batches are right-padded (a causal model's real positions never see the padding).
    ``vocab_size``: use only the head's first rows (a student head padded to fewer rows than the
    teacher's, ``models.kd_vocab_size``); then it belongs in ``key``. ``autocast``: run the teacher
    under bf16 autocast, as the online teacher runs with train.precision=bf16 (about 2x faster on a
    CPU with bf16 instructions); then ``precision="bf16"`` belongs in ``key``.
    """
    folder = Path(folder)
    vocab = vocab_size or teacher.get_output_embeddings().weight.shape[0]  # teacher None: vocab_size given
    if not 1 <= k < vocab:
        raise ValueError(f"k={k}: must be in [1, V) with V={vocab} (the rest bucket needs an id outside the top k)")
    if any(len(enc.input_ids) < 1 for enc in encoded):
        raise ValueError("every sequence needs at least one token")
    with _lock(folder):
        cache = None
        if (folder / "meta.json").exists():
            try:
                cache = TeacherCache.load(folder)
            except CacheError as err:  # truncated or unreadable files: rebuilt, not trusted
                log.warning("%s; rebuilding it", err)
        built = cache is None
        if built and teacher is None:
            raise CacheError(f"{folder}: no usable teacher cache there, and the teacher was not loaded to "
                             "build one (it was complete when the run looked); run the point again")
        if built:
            for stale in folder.parent.glob(folder.name + ".tmp*"):  # a build that died; we hold the lock
                shutil.rmtree(stale, ignore_errors=True)
            tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
            tmp.mkdir(parents=True)
            meta = _write(teacher, encoded, tmp, k, temperature, batch_size, device, shard_size, vocab, autocast)
            meta["key"] = key or {}
            (tmp / "meta.json").write_text(json.dumps(meta))  # written last: its presence means complete
            shutil.rmtree(folder, ignore_errors=True)  # a folder without meta.json is not a cache
            os.replace(tmp, folder)
            log.info("teacher cache: %d sequences, k=%d, %.1f MB in %.1f s -> %s", len(encoded), k,
                     sum(s["bytes"] for s in meta["shards"]) / 1e6, meta["build_time_s"], folder)
            cache = TeacherCache.load(folder)
    cache.built = built
    cache.check(encoded)
    if (cache.k, cache.temperature) != (k, float(temperature)):
        raise CacheError(f"teacher cache at {folder} holds k={cache.k} at temperature {cache.temperature}, "
                         f"asked for k={k} at {temperature}; both belong in cache_key")
    return cache


def _write(teacher, encoded, tmp: Path, k, temperature, batch_size, device, shard_size, vocab: int,
           autocast: bool = False) -> dict:
    """Run the teacher over every sequence and write the shards into ``tmp``; returns meta.json's dict."""
    from safetensors.torch import save_file

    started, stats, shards = time.perf_counter(), {"real_tokens": 0, "padded_tokens": 0, "flops": 0}, []
    was_training = teacher.training
    teacher.eval()
    try:
        for first in range(0, len(encoded), shard_size):
            members = range(first, min(first + shard_size, len(encoded)))
            tops = {}
            order = sorted(members, key=lambda i: len(encoded[i].input_ids))  # similar lengths: little padding
            for at in range(0, len(order), batch_size):
                batch = order[at:at + batch_size]
                tops.update(zip(batch, _teacher_topk(teacher, [encoded[i].input_ids for i in batch], k,
                                                     temperature, device, stats, vocab, autocast)))
            offsets = list(accumulate((len(encoded[i].input_ids) - 1 for i in members), initial=0))  # (n + 1,)
            name = f"shard-{len(shards):05d}.safetensors"
            save_file({"values": torch.cat([tops[i][0] for i in members]).contiguous(),  # (R, k) fp16
                       "indices": torch.cat([tops[i][1] for i in members]).contiguous(),  # (R, k) int32
                       "offsets": torch.tensor(offsets, dtype=torch.int64)},  # (n + 1,)
                      str(tmp / name), metadata={"format": FORMAT})
            shards.append({"file": name, "first": first, "count": len(members), "rows": offsets[-1],
                           "bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)})
    finally:
        teacher.train(was_training)
    return {"format": FORMAT, "k": k, "temperature": float(temperature), "values_dtype": "float16",
            "indices_dtype": "int32", "vocab": vocab,
            "n_sequences": len(encoded), "lengths": [len(enc.input_ids) for enc in encoded],
            "dataset_fingerprint": dataset_fingerprint(encoded), "shard_size": shard_size, "shards": shards,
            "build_time_s": time.perf_counter() - started, "teacher_real_tokens": stats["real_tokens"],
            "teacher_padded_tokens": stats["padded_tokens"], "teacher_forward_flops": stats["flops"],
            "teacher_dtype": str(next(teacher.parameters()).dtype), "autocast_bf16": autocast,
            "built_by_pid": os.getpid(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


@torch.no_grad()
def _teacher_rows(teacher, sequences: Sequence[Sequence[int]], device):
    """Final hidden states at every predicting position of a right-padded batch.

    Returns hidden (R, H) with R = sum(L_i - 1), rows grouped by sequence in the given order, the
    head weight (V, H) and the padded shape (B, T). The head is applied later, a chunk of rows at a
    time, so no (B, T, V) logits exist.
    """
    from kd_sweeps.chunked_loss import final_hidden_and_head_weight

    width = max(len(ids) for ids in sequences)
    input_ids = torch.zeros(len(sequences), width, dtype=torch.long)  # pad id irrelevant: never attended
    attention = torch.zeros(len(sequences), width, dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, :len(ids)] = torch.as_tensor(ids)
        attention[row, :len(ids)] = 1
    hidden, weight = final_hidden_and_head_weight(teacher, input_ids.to(device), attention.to(device))  # (B,T,H)
    rows = torch.cat([row * width + torch.arange(len(ids) - 1) for row, ids in enumerate(sequences)])  # (R,)
    return hidden.flatten(0, 1)[rows.to(hidden.device)], weight, (len(sequences), width)


def _log_probs(hidden: torch.Tensor, weight: torch.Tensor, temperature: float):
    """Yield (row slice, log_softmax(logits / T) (c, V) in fp32) chunk by chunk over hidden (R, H)."""
    step = max(1, _LOGITS_PER_CHUNK // weight.shape[0])
    for start in range(0, hidden.shape[0], step):
        logits = F.linear(hidden[start:start + step], weight).float() / temperature  # (c, V)
        yield slice(start, start + step), F.log_softmax(logits, dim=-1)


@torch.no_grad()
def _teacher_topk(teacher, sequences, k, temperature, device, stats, vocab: Optional[int] = None,
                  autocast: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per sequence: top-k values (L - 1, k) fp16 and ids (L - 1, k) int32, on the CPU."""
    from kd_sweeps.cost import ModelShape, forward_flops

    values, indices = [], []
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=autocast):
        hidden, weight, (batch, width) = _teacher_rows(teacher, sequences, device)
        weight = weight[:vocab]  # (V, H): the columns KD compares
        for _, log_probs in _log_probs(hidden, weight, temperature):  # fp32 log-softmax either way
            top, ids = log_probs.topk(k, dim=-1)  # (c, k), sorted descending
            values.append(top.half().cpu())
            indices.append(ids.int().cpu())
    values, indices = torch.cat(values), torch.cat(indices)  # (R, k) fp16, (R, k) int32
    real = sum(len(ids) for ids in sequences)
    shape = ModelShape.from_config(teacher.config)
    # Executed work: the body over the padded batch, the head over the R predicting rows only.
    stats["flops"] += forward_flops(shape, [width] * batch) - 2 * shape.vocab * shape.hidden * (
        batch * width - hidden.shape[0])
    stats["real_tokens"] += real
    stats["padded_tokens"] += batch * width - real
    sizes = [len(ids) - 1 for ids in sequences]
    return list(zip(values.split(sizes), indices.split(sizes)))


@torch.no_grad()
def approximation_error(teacher, encoded: Sequence, cache: TeacherCache, temperature: float,
                        batch_size: int = 16, device="cpu") -> dict:
    """How far the cached top-k + rest teacher is from the dense teacher, per predicting position.

    ``encoded`` are the sequences ``cache`` was built on (held-out ones, to report the error). Per
    position, with p the dense teacher distribution at ``temperature`` and r its mass outside the
    cached ids:

    * ``kl``: KL(p || p~), p~ = p on the cached ids and r spread evenly over the other V - k ids;
      equals r * KL(p_tail / r || uniform). This is the part of the dense forward KL that a
      (k + 1)-bucket loss cannot see when the student is uniform on the tail (in general the unseen
      part is r * KL(p_tail / r || q_tail / q_rest)). 0 when k = V - 1.
    * ``bucket_tv``: total variation between the exact k + 1 buckets and the cached fp16 ones, with
      the rest mass as the loss computes it (1 - sum(exp(values)), clamped at 0): the storage error.
    * ``tail_mass``: r.

    Returns ``{name}_mean`` and ``{name}_max`` for each, and ``n_positions`` and ``k``.
    """
    cache.check(encoded)
    if float(temperature) != cache.temperature:
        raise CacheError(f"cache holds log-probs at temperature {cache.temperature}, asked about {temperature}")
    was_training = teacher.training
    teacher.eval()
    sums, maxima, count = {"kl": 0.0, "bucket_tv": 0.0, "tail_mass": 0.0}, {}, 0
    try:
        for at in range(0, len(encoded), batch_size):
            batch = list(range(at, min(at + batch_size, len(encoded))))
            hidden, weight, _ = _teacher_rows(teacher, [encoded[i].input_ids for i in batch], device)
            cached = [cache.rows(i, 0, len(encoded[i].input_ids) - 1) for i in batch]
            values = torch.cat([v for v, _ in cached]).to(hidden.device)  # (R, k)
            ids = torch.cat([i for _, i in cached]).to(hidden.device)  # (R, k)
            for rows, log_p in _log_probs(hidden, weight, temperature):  # (c, V)
                found = _position_errors(log_p, values[rows], ids[rows])
                for name, per_row in found.items():
                    sums[name] += float(per_row.sum())
                    maxima[name] = max(maxima.get(name, 0.0), float(per_row.max()) if per_row.numel() else 0.0)
                count += log_p.shape[0]
    finally:
        teacher.train(was_training)
    out = {f"{name}_mean": total / max(count, 1) for name, total in sums.items()}
    out.update({f"{name}_max": value for name, value in maxima.items()})
    return {**out, "n_positions": count, "k": cache.k}


def _position_errors(log_p: torch.Tensor, values: torch.Tensor, ids: torch.Tensor) -> dict:
    """Per-row errors (c,) for dense log-probs (c, V) and cached values / ids (c, k)."""
    vocab, k = log_p.shape[1], ids.shape[1]
    top = log_p.gather(1, ids)  # (c, k) exact log-probs of the cached ids
    log_rest = torch.logsumexp(log_p.scatter(1, ids, float("-inf")), dim=-1)  # (c,) log r
    p = log_p.exp()
    tail = p.scatter(1, ids, 0.0)  # (c, V) p on the tail ids, 0 on the cached ones
    log_share = log_rest - math.log(vocab - k)  # (c,) log of r / (V - k), the even share (k < V)
    # KL(p || p~) = sum over tail ids of p * (log p - log_share), with 0 * log 0 = 0 (also when r = 0).
    kl = (tail * (log_p - log_share[:, None])).where(tail > 0, 0.0).sum(-1)  # (c,)
    exact = torch.cat([top.exp(), log_rest.exp()[:, None]], 1)  # (c, k + 1)
    stored = values.exp()  # (c, k)
    stored_rest = (1.0 - stored.sum(-1, keepdim=True)).clamp_min(0.0)  # (c, 1) as chunked_kd_ce
    tv = 0.5 * (exact - torch.cat([stored, stored_rest], 1)).abs().sum(-1)
    return {"kl": kl.clamp_min(0.0), "bucket_tv": tv, "tail_mass": log_rest.exp()}
