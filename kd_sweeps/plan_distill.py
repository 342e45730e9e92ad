"""What generating a point's training sequences costs, for the plan (``distill.mode``; what the
run does is kd_sweeps/distill.py's docstring):

    offline    nothing: the dataset's traces.
    on_policy  expected rollouts R = distill.lmbda x steps x train.batch_size (each step draws with
               probability lmbda), each costing generation_flops(student, P, B): P the prompt (the
               tokens before <think>), B = max(1, int(trunc x L)) new tokens, L the reference
               completion (length - P); averaged over the sequences a batch draws from (those with a
               supervised token). Times the processes, as the run reports it: every rank generates
               the whole global batch alike.
    sequence   every training sequence once: generation_flops(teacher, P, B), the budget B = max(1,
               min(data.max_tokens - P, distill.max_new_tokens or the longest L)). Reported in full on
               every point that trains on it, as the runs report it; built once per (teacher, data,
               sampling), which the plan's total counts once.

Both count B new tokens per completion, the worst case (as the evaluation's plan assumes by
default): a completion that stops at its end-of-turn costs less, but a student early in training,
or a teacher that never learned to stop, runs to the budget. Time: at the training rate per GPU
(--train-flops-per-s), the rollouts shared by the processes like training; the teacher's sequences
on one process while the others wait on the folder's lock (serial_flops). Generation runs below
the training rate (decoding is memory-bound), so these times are low.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

import numpy as np
from omegaconf import OmegaConf

from kd_sweeps.cost import ModelShape, generation_flops
from kd_sweeps.plan_lengths import NOT_IN_KEY, Sequences


@dataclass(frozen=True)
class GenerationCost:
    kind: str = ""  # "" (offline) | "rollouts" (on_policy, the student) | "sequences" (the teacher)
    flops: float = 0.0  # as the run reports it: generation_flops / sequence_generation_flops
    completions: float = 0.0  # rollouts expected, or teacher completions
    tokens: float = 0.0  # new tokens at most (each completion runs to its budget)
    serial_flops: float = 0.0  # of flops, what one process computes while the others wait
    key: str = ""  # sequences: the build it shares with other points (the plan's total counts it once)


@functools.lru_cache(maxsize=None)
def _completion_flops(shape: ModelShape, prompt: int, new: int) -> int:
    return generation_flops(shape, prompt, new)


def _flops(shape: ModelShape, prompts: np.ndarray, new: np.ndarray) -> float:
    """Sum of generation_flops over (prompt, new tokens) pairs, each distinct pair computed once."""
    pairs, counts = np.unique(np.stack([prompts, new], axis=1), axis=0, return_counts=True)
    return float(sum(int(c) * _completion_flops(shape, int(p), int(n)) for (p, n), c in zip(pairs, counts)))


def _build_key(cfg) -> str:
    """What the teacher's sequences depend on (kd_sweeps.distill.sequences_folder's key, from config:
    the models, the data, the sampling, the budget; the seed only where sampling draws)."""
    d = cfg.distill
    data = {k: v for k, v in OmegaConf.to_container(cfg.data, resolve=True).items() if k not in NOT_IN_KEY}
    return json.dumps({"teacher": OmegaConf.to_container(cfg.model.teacher, resolve=True),
                       "student": OmegaConf.to_container(cfg.model.student, resolve=True), "data": data,
                       "sampling": [d.temperature, d.top_p, d.top_k], "max_new_tokens": d.max_new_tokens,
                       "seed": cfg.seed if d.temperature > 0 else None}, sort_keys=True)


def generation_cost(cfg, student: ModelShape, teacher: ModelShape, seqs: Sequences, kept: np.ndarray,
                    steps: int, processes: int) -> GenerationCost:
    """The generation of one composed point (formulas in the module docstring); ``kept`` marks the
    sequences with a supervised token, ``steps`` the optimizer steps the point runs."""
    mode = cfg.distill.mode
    prompt = seqs.cot_start.astype(np.int64)
    completion = np.maximum(seqs.length - prompt, 0)  # L: everything after the prompt
    if mode == "on_policy":
        budget = np.maximum(1, (cfg.trunc * completion).astype(np.int64))
        per_rollout = _flops(student, prompt[kept], budget[kept]) / int(kept.sum())
        rollouts = cfg.distill.lmbda * steps * cfg.train.batch_size
        return GenerationCost("rollouts", processes * rollouts * per_rollout, rollouts,
                              rollouts * float(budget[kept].mean()))
    if mode == "sequence":
        limit = cfg.distill.max_new_tokens or int(completion.max())
        budget = np.maximum(1, np.minimum(cfg.data.max_tokens - prompt, limit))
        flops = _flops(teacher, prompt, budget)
        return GenerationCost("sequences", flops, float(len(prompt)), float(budget.sum()), flops, _build_key(cfg))
    return GenerationCost()


def total_generation_flops(costs) -> float:
    """Generation over the points: every point's rollouts, each build of teacher sequences once."""
    builds = {c.key: c.flops for c in costs if c is not None and c.kind == "sequences"}
    return sum(c.flops for c in costs if c is not None and c.kind == "rollouts") + sum(builds.values())


def describe(costs) -> str | None:
    """The note under the plan's table (None when no point generates)."""
    kinds = {c.kind for c in costs if c is not None and c.kind}
    if not kinds:
        return None
    parts = []
    if "rollouts" in kinds:
        parts.append("on_policy: distill.lmbda x steps x train.batch_size student rollouts of "
                     "max(1, int(trunc x L)) new tokens, L the reference completion (x processes: each "
                     "rank generates the whole batch)")
    if "sequences" in kinds:
        parts.append("sequence: one teacher completion per training sequence of min(data.max_tokens - "
                     "prompt, distill.max_new_tokens or the longest L) new tokens; its full cost on every "
                     "point that trains on it, counted once in the total")
    return ("gen FLOPs: " + "; ".join(parts) + ". Every completion runs to its budget (the worst case). "
            "In the training time and GPU-hours at the training FLOP/s (generation is slower: a low "
            "estimate); the teacher's sequences on one process, held by every point that waits for them "
            "(kd_sweeps/plan_distill.py)")
