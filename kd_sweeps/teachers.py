"""The teacher a training step sees, from one factory: the live model (placed on the ranks as
``train.teacher_parallel`` says) or its top-k cache (``train.teacher_cache=topk``, kd_sweeps/
teacher_cache.py). The recipe calls ``stand_in`` before the models load and ``for_steps`` after; it
never asks which teacher it got. A cached teacher offers ``batch_inputs`` (its rows of each
micro-batch), which the loop adds to the batch; a live one is called like any model.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from kd_sweeps import distributed, models, teacher_cache, teacher_cache_build
from kd_sweeps.cost import ModelShape
from kd_sweeps.data import IGNORE_INDEX
from kd_sweeps.point_record import RESULT_FILE, read_result


class CachedTeacher:
    """The teacher as its cached top-k log-probabilities: no forward pass at all during training;
    each micro-batch gathers its rows."""

    def __init__(self, cache):
        self.cache = cache

    def eval(self) -> "CachedTeacher":
        return self

    def rows_for(self, part, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(values (N, k), ids (N, k)) in the order of ``supervised_positions`` for this micro-batch."""
        return self.cache.gather([e.index for e in part], [e.window for e in part],
                                 [e.labels != IGNORE_INDEX for e in part], device=device)

    def batch_inputs(self, part, device) -> dict:
        """What the loss reads for this micro-batch instead of a teacher forward."""
        return {"teacher_topk": self.rows_for(part, device),
                "teacher_vocab": self.cache.meta["vocab"]}  # the columns its top-k were taken over


def stand_in(cfg: DictConfig, tokenizer, encoded, cache_dir: Path):
    """(what ``models.load_pair`` takes instead of loading the teacher, the data's fingerprint): a
    weightless stand-in when the teacher's top-k cache for these data is built already (a point that
    only reads the cache never loads the teacher: at paper scale 16 GB and a minute), else None."""
    if cfg.train.teacher_cache != "topk":
        return None, ""
    fingerprint = teacher_cache.dataset_fingerprint(encoded)  # hashes every token once per point
    return _ready_stand_in(cfg, tokenizer, fingerprint, cache_dir), fingerprint


def for_steps(cfg: DictConfig, teacher, student, encoded, fingerprint: str, cache_dir: Path, env,
              output_dir: Path) -> tuple:
    """(the teacher each step uses, its shape for the per-step FLOPs or None when no teacher runs per
    step, what the cache cost: summary keys). ``teacher`` and ``student``: ``models.load_pair``'s."""
    if cfg.train.teacher_cache != "topk":
        placed = distributed.place_teacher(teacher.model, env, cfg.train.teacher_parallel)
        return placed, ModelShape.from_config(teacher.model.config), {}
    # the columns KD compares: fewer than the teacher's rows when the student's head is padded less
    vocab = min(models.output_rows(teacher), models.output_rows(student))
    cached, summary = _cached(cfg, teacher, encoded, fingerprint, cache_dir, env.device, vocab, env, output_dir)
    return cached, None, summary  # the build is reported once, in the summary


def cache_folder(cfg: DictConfig, teacher_path: str, teacher_rows: int, vocab: int, fingerprint: str,
                 cache_dir: Path) -> tuple[Path, dict]:
    """Where the teacher's top-k cache for this (teacher, data, formatting, k, temperature,
    precision, compared columns) lives, and its key."""
    key = dict(teacher_id=str(teacher_path), dataset_fingerprint=fingerprint,
               formatting=f"{cfg.data.name}:{models.TASK_VERSION}", max_tokens=cfg.data.max_tokens,
               k=cfg.train.teacher_topk, temperature=cfg.loss.temperature, precision=cfg.train.precision)
    fields, suffix = teacher_cache.key_fields(**key), ""
    if vocab != teacher_rows:
        fields["vocab"] = vocab
        suffix = f"-v{vocab}"
    return cache_dir / f"teacher-topk-{teacher_cache.cache_key(**key)}{suffix}", fields


def _ready_stand_in(cfg: DictConfig, tokenizer, fingerprint: str, cache_dir: Path):
    """The teacher's stand-in (no weights) when its top-k cache is built already, else None: a point
    that only reads the cache never loads the teacher (at paper scale, 16 GB and a minute per point)."""
    if cfg.train.teacher_cache != "topk":
        return None
    stand_in = models.teacher_without_weights(cfg, tokenizer)
    student_rows = models.planned_rows(cfg, "student", tokenizer)
    if stand_in is None or student_rows is None:
        return None
    folder, _ = cache_folder(cfg, stand_in.path, stand_in.rows, min(stand_in.rows, student_rows), fingerprint,
                             cache_dir)
    return stand_in if (folder / "meta.json").exists() else None


def _cached(cfg: DictConfig, teacher, encoded, fingerprint: str, cache_dir: Path, device, vocab: int,
            env: distributed.DistEnv, output_dir: Path) -> tuple:
    """The teacher's top-k cache, built once per sweep under a file lock and shared by every grid
    point; and what its build cost. ``vocab``: the columns KD compares (fewer than the teacher's
    rows when the student's head is padded less). In a multi-process point rank 0 builds it (its
    record says so) while the other ranks wait for it."""
    folder, fields = cache_folder(cfg, teacher.path, models.output_rows(teacher), vocab, fingerprint, cache_dir)
    started = time.perf_counter()
    if not env.is_main:  # polled, not a collective: a build can outlast the process group's timeout
        while not (folder / "meta.json").exists():
            if (read_result(output_dir) or {}).get("status") == "failed":
                raise RuntimeError(f"rank 0 failed before the teacher cache {folder} was built; see "
                                   f"{output_dir / RESULT_FILE}")
            time.sleep(1.0)
    cache = teacher_cache_build.build_cache(teacher.model, encoded, folder, cfg.train.teacher_topk,
                                            cfg.loss.temperature, 32, device, key=fields, vocab_size=vocab,
                                            autocast=cfg.train.precision == "bf16")
    summary = {"teacher_cache_built_here": bool(cache.built), "teacher_cache_path": str(cache.folder),
               "teacher_cache_seconds": time.perf_counter() - started, "teacher_loaded": teacher.model is not None,
               "teacher_cache_build_flops": cache.meta.get("teacher_forward_flops", 0) if cache.built else 0}
    return CachedTeacher(cache), summary
