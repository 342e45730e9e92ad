"""Building the teacher's top-k cache (the format and the reader: ``kd_sweeps.teacher_cache``): one
pass of the frozen teacher over the full sequences, chunked over the vocabulary, written to a
temporary folder and renamed under a file lock; and the check of what the top-k approximation loses."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from itertools import accumulate
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from kd_sweeps.teacher_cache import FORMAT, CacheError, TeacherCache, _sha256, dataset_fingerprint

log = logging.getLogger(__name__)
_LOGITS_PER_CHUNK = 2**26  # logit elements built at once (256 MiB in fp32): c = 2**26 // V rows


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
