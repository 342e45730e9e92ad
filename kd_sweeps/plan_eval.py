"""Evaluation cost of a grid point, for the plan: completions, generated tokens, FLOPs, wall time.

At paper scale generation costs more than training (AIME/MATH-500 with 32,768 new tokens and
several samples per problem), and a point whose evaluation cannot end inside its job's time limit
fails however well it trained. Per point:

    completions = sum over eval.benchmarks of problems x eval.n_samples
    problems    = min(eval.n_problems, the benchmark's size) (synthetic: data.n_test)
    tokens      = completions x G, G = expected generated tokens per completion (an assumption:
                  --eval-tokens, else --eval-fraction x eval.max_new_tokens; 1.0 by default, the
                  worst case, which a student that never learns to stop reaches)
    FLOPs       = completions x kd_sweeps.cost.generation_flops(student, T_p, G): prefill of the
                  prompt, then 2 x N_student per generated token plus attention over the cache;
                  T_p = the training prompts' mean length (prompt and chat template)
    wall time   = tokens / --eval-tokens-per-s (aggregate throughput of the engine; measure yours)

The time limit the evaluation must fit: ``eval.job.timeout_min`` when ``eval.separate_job``,
else the launcher's ``hydra.launcher.timeout_min`` minus the training time, training FLOPs /
(processes x ``--train-flops-per-s``, a per-GPU rate; without a rate the whole limit, so the check
is optimistic).
The basic launcher has no limit: nothing to check.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kd_sweeps.cost import ModelShape, generation_flops

# Aggregate generated tokens/s assumed when none is given: a round planning number, not a
# measurement (none was possible here: no GPU). It depends on the engine, batch, model and length;
# pass what the evaluation of an earlier sweep or benchmarks/ measured (--eval-tokens-per-s).
DEFAULT_TOKENS_PER_S = 1000.0
# Expected generated tokens as a fraction of eval.max_new_tokens: 1.0 plans for the worst case.
DEFAULT_TOKEN_FRACTION = 1.0
SYNTHETIC = "synthetic"


@dataclass(frozen=True)
class EvalAssumptions:
    """What the plan assumes about generation (printed with the plan)."""

    tokens: int | None = None  # generated tokens per completion; None: fraction x max_new_tokens
    fraction: float = DEFAULT_TOKEN_FRACTION
    tokens_per_s: float = DEFAULT_TOKENS_PER_S  # aggregate, all completions of a point together
    train_flops_per_s: float | None = None  # sustained training FLOP/s of one GPU; None: no training time

    def __post_init__(self) -> None:
        problems = []
        if self.tokens is not None and self.tokens < 1:
            problems.append(f"--eval-tokens={self.tokens}: must be a positive token count")
        if not 0 < self.fraction <= 1:
            problems.append(f"--eval-fraction={self.fraction}: must be in (0, 1]")
        if not self.tokens_per_s > 0:
            problems.append(f"--eval-tokens-per-s={self.tokens_per_s}: must be > 0")
        if self.train_flops_per_s is not None and not self.train_flops_per_s > 0:
            problems.append(f"--train-flops-per-s={self.train_flops_per_s}: must be > 0")
        if problems:
            raise ValueError("; ".join(problems))

    def tokens_per_completion(self, max_new_tokens: int) -> int:
        """G: never above the limit, since generation stops there."""
        if self.tokens is not None:
            return min(self.tokens, max_new_tokens)
        return max(1, math.ceil(self.fraction * max_new_tokens))

    def describe(self) -> str:
        """The assumptions, one per line, with the options that change them."""
        tokens = f"{self.tokens:,} (--eval-tokens; at most eval.max_new_tokens)" \
            if self.tokens is not None else \
            f"{self.fraction:g} x eval.max_new_tokens (--eval-fraction" \
            f"{'; 1 = the worst case, every completion runs to the limit' if self.fraction == 1 else ''}" \
            "; or --eval-tokens N)"
        lines = [f"eval: generated tokens per completion = {tokens}",
                 f"      throughput = {self.tokens_per_s:,.0f} generated tokens/s per point, all its "
                 "completions together (--eval-tokens-per-s; measure your engine)",
                 "      FLOPs per completion = prompt prefill + 2 x N_student per generated token "
                 "+ attention over the KV cache (kd_sweeps/cost.py)"]
        if self.train_flops_per_s is not None:
            lines.append(f"      training at {self.train_flops_per_s:.3g} FLOP/s per GPU (--train-flops-per-s) "
                         "shares the job's time limit with an evaluation in the same job")
        return "\n".join(lines)


@dataclass
class EvalCost:
    problems: int  # over all benchmarks
    completions: int  # problems x n_samples
    tokens_per_completion: int  # G
    tokens: int  # generated in all
    flops: float
    seconds: float  # wall time at the assumed throughput
    limit_s: float | None  # time the evaluation has in its job; None: no limit
    limit_source: str  # the key that sets the limit, for messages
    separate_job: bool = False  # eval.separate_job: evaluated in a job of its own


def benchmark_problems(eval_cfg, data_cfg) -> dict[str, int]:
    """Problems each benchmark evaluates: eval.n_problems capped by the benchmark's size (the
    embedded task's: data.n_test); benchmarks of unknown size count eval.n_problems."""
    from kd_sweeps.benchmarks import BENCHMARKS

    counts = {}
    for bench in eval_cfg.benchmarks:
        if bench == SYNTHETIC:
            size = data_cfg.n_test if data_cfg.source == SYNTHETIC else None
        else:
            size = BENCHMARKS[bench].size if bench in BENCHMARKS else None
        counts[bench] = min(eval_cfg.n_problems, size) if size else eval_cfg.n_problems
    return counts


def time_limit(cfg, launcher_timeout_min: float | None,
               train_seconds: float | None) -> tuple[float | None, str]:
    """(seconds the evaluation has, the key that sets them)."""
    if cfg.eval.separate_job:
        return 60.0 * cfg.eval.job.timeout_min, f"eval.job.timeout_min={cfg.eval.job.timeout_min}"
    if launcher_timeout_min is None:
        return None, "no time limit (basic launcher)"
    source = f"hydra.launcher.timeout_min={launcher_timeout_min:g}"
    if train_seconds is None:
        return 60.0 * launcher_timeout_min, source
    return 60.0 * launcher_timeout_min - train_seconds, \
        f"{source} minus the estimated training time ({duration(train_seconds)})"


def eval_cost(cfg, student: ModelShape, prompt_tokens: float, assumptions: EvalAssumptions,
              launcher_timeout_min: float | None = None, train_flops: float | None = None,
              processes: int = 1) -> EvalCost:
    """The evaluation cost of one composed point (formulas in the module docstring); ``processes``
    train the point together (its training time divides by them)."""
    problems = sum(benchmark_problems(cfg.eval, cfg.data).values())
    completions = problems * cfg.eval.n_samples
    per_completion = assumptions.tokens_per_completion(cfg.eval.max_new_tokens)
    tokens = completions * per_completion
    flops = completions * generation_flops(student, round(prompt_tokens), per_completion)
    train_seconds = None if assumptions.train_flops_per_s is None or train_flops is None \
        else train_flops / (processes * assumptions.train_flops_per_s)
    limit, source = time_limit(cfg, launcher_timeout_min, train_seconds)
    return EvalCost(problems, completions, per_completion, tokens, float(flops),
                    tokens / assumptions.tokens_per_s, limit, source, bool(cfg.eval.separate_job))


def fit_warning(cost: EvalCost) -> str | None:
    """A message when the evaluation cannot end inside its job's time limit, else None."""
    if cost.limit_s is None or cost.seconds <= cost.limit_s:
        return None
    remedy = "raise eval.job.timeout_min" if cost.separate_job else \
        "raise hydra.launcher.timeout_min, set eval.separate_job=true (a job and limit of its own)"
    remedy += ", or lower eval.n_samples / eval.max_new_tokens / eval.n_problems"
    if cost.limit_s <= 0:
        return f"no time left to evaluate: {cost.limit_source} leaves {duration(cost.limit_s)}; {remedy}"
    return (f"evaluation needs about {duration(cost.seconds)} ({cost.completions:,} completions x "
            f"{cost.tokens_per_completion:,} tokens) but has {duration(cost.limit_s)} "
            f"({cost.limit_source}); {remedy}")


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    sign, seconds = ("-" if seconds < 0 else ""), abs(seconds)
    if seconds < 120:
        return f"{sign}{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{sign}{seconds / 60:.0f} min"
    return f"{sign}{seconds / 3600:.1f} h"
