"""The training steps: one loop for KD runs and for preparing embedded models (CE only).

Per optimizer step: take ``batch_size`` sequences (the GLOBAL batch, over all ranks), give each
rank its share, split that into micro-batches of ``micro_batch_size`` (the gradient accumulation is
derived: share / micro-batch), run the frozen teacher under no_grad and the student, and add up
the loss ``(1 - r) * CE + r * KD`` (kd_sweeps/batch_loss.py: each micro-batch's share of the step's
value, normalised per token or per sequence), so the gradient does not depend on how the global
batch is split over ranks and micro-batches. The student's master weights and AdamW's state are
fp32 (``models.load_pair``); bf16 is only the compute dtype (autocast here; FSDP2's mixed-precision
policy when sharded, ``distributed.shard_student``).

The loop reads the schema's own dataclasses: ``settings`` is a ``schema.TrainConfig`` (with
``max_steps`` set) and ``loss`` a ``schema.LossConfig``; a grid point passes its config's
(``recipe.PointRecipe``), the embedded models' preparation builds them in code.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass, replace
from typing import Callable, Iterator, Optional, Sequence

import torch

from kd_sweeps import batch_loss, distributed, precision
from kd_sweeps.checkpoint import PreemptionGuard, TrainState
from kd_sweeps.choices import Schedule, values
from kd_sweeps.data import TrainExample, collate, epoch_batches
from kd_sweeps.distributed import DistEnv
from kd_sweeps.schema import LossConfig, TrainConfig

log = logging.getLogger(__name__)
SCHEDULES = values(Schedule)


def warmup_cosine(step: int, total: int, warmup_ratio: float) -> float:
    """LR multiplier: linear warm-up over warmup_ratio * total steps, then cosine decay to 0."""
    warmup = max(1, int(round(warmup_ratio * total)))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_optimizer(student, settings: TrainConfig) -> torch.optim.AdamW:
    """AdamW over every student parameter, with or without decay on norm weights and biases."""
    if settings.decay_norms_and_biases:
        groups = [{"params": list(student.parameters()), "weight_decay": settings.weight_decay}]
    else:
        groups = [{"params": [p for p in student.parameters() if p.ndim >= 2], "weight_decay": settings.weight_decay},
                  {"params": [p for p in student.parameters() if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=settings.lr, betas=tuple(settings.betas))


def build_schedule(optimizer, settings: TrainConfig):
    """The learning-rate schedule, stepped once after every optimizer step."""
    if settings.schedule == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: warmup_cosine(s, settings.max_steps, settings.warmup_ratio))
    if settings.schedule != "onecycle":
        raise ValueError(f"train.schedule={settings.schedule!r}: must be one of {', '.join(SCHEDULES)}")
    pct_start = settings.warmup_ratio
    if pct_start * settings.max_steps == 1.0:
        # torch divides by zero when the warm-up is exactly one step; a hair more gives the same
        # learning rates (that step starts at lr / div_factor either way).
        pct_start *= 1.0 + 1e-9
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=settings.lr, total_steps=settings.max_steps, pct_start=pct_start,
        anneal_strategy="cos", div_factor=settings.div_factor, final_div_factor=settings.final_div_factor,
        cycle_momentum=settings.cycle_momentum)


@dataclass
class Resume:
    """Exact resume: where the state lives and when it is saved besides a preemption signal."""

    state: TrainState
    every: int = 0  # also save every N steps (0: only when a preemption signal arrives)
    # Also save after the last step: an evaluation interrupted in this same job then resumes from the
    # trained state (zero steps left) instead of training again.
    at_end: bool = False


@dataclass
class Step:
    """One finished optimizer step: its index, its (global) metrics, and this rank's micro-batches,
    each {"shape": (B, T), "lengths": [...], "supervised": n} (the cost meter counts them)."""

    index: int
    metrics: dict
    micro_batches: list
    stop: Optional[bool] = None  # a preemption signal seen after this step (read once, when first asked)

    @property
    def done(self) -> int:
        return self.index + 1


class TrainSteps:
    """The optimizer steps of one run, one per iteration, so that the caller keeps its own books
    between them in plain code (``recipe.PointRecipe.train``)::

        with TrainSteps(...) as steps:      # restores a saved state; steps.restored: its extra
            for step in steps:
                count(step)                 # cost, validation, logging
                if steps.save_due(step):    # a preemption signal (any rank), every N steps, the last
                    steps.save(step, extra) # the caller's counters ride along with the weights
        # a signal stops the run after the step it arrived in: Preempted, once the state is saved

    Each step takes ``settings.batch_size`` sequences (the global batch), gives each rank its share in
    micro-batches, and steps AdamW and the schedule. With ``dist`` (several processes, the student
    sharded by ``distributed.shard_student``) metrics are global, micro-batches this rank's own. With
    ``rollout`` (``distill.OnPolicy``) a step it draws trains on the student's own samples of the
    batch's prompts instead, on the divergence alone; its counters are saved with the state.
    ``seed`` fixes the batch order and torch's RNG (the grid point's seed)."""

    def __init__(self, student, teacher, examples: Sequence[TrainExample], pad_id: int, settings: TrainConfig,
                 loss: LossConfig, device: torch.device, desc: str = "train", resume: Optional[Resume] = None,
                 dist: Optional[DistEnv] = None, rollout=None, seed: int = 0):
        self.student, self.teacher, self.examples, self.pad_id = student, teacher, examples, pad_id
        self.settings, self.loss, self.device, self.desc = settings, loss, device, desc
        self.resume, self.dist, self.rollout, self.seed = resume, dist or DistEnv(), rollout, seed
        distributed.micro_batch_size(settings.batch_size, settings.micro_batch_size, self.dist)  # fails before any step
        self.autocast = precision.resolve(settings.precision, device) == "bf16"
        _warn_low_precision_master(student)
        torch.manual_seed(seed)
        student.train()
        if teacher is not None:
            teacher.eval()
        self.optimizer = build_optimizer(student, settings)
        self.schedule = build_schedule(self.optimizer, settings)
        self.first_step, self.restored = 0, None  # restored: the caller's counters saved with the state
        if resume is not None and resume.state.exists():
            self.first_step, extra = resume.state.load(student, self.optimizer, self.schedule)
            if rollout is not None:
                rollout.restore(extra.pop("rollout"))
            self.restored = extra
        self.guard = PreemptionGuard()

    def __enter__(self) -> "TrainSteps":
        self.guard.__enter__()
        return self

    def __exit__(self, *exc) -> bool:
        self.guard.__exit__()
        self.student.eval()
        return False

    def __iter__(self) -> Iterator[Step]:
        settings, student = self.settings, self.student
        # The batch order, and random_labels' draw, are pure functions of (seed, step).
        batches = epoch_batches([len(e.input_ids) for e in self.examples], settings.batch_size, self.seed)
        for _ in range(self.first_step):
            next(batches)
        progress = Progress(settings.max_steps, self.desc, self.first_step, enabled=self.dist.is_main)
        try:
            for index in range(self.first_step, settings.max_steps):
                epoch, batch_ids = next(batches)  # indices into examples, named if the loss is not finite
                chosen = [self.examples[i].for_epoch(epoch) for i in batch_ids]
                sampled = self.rollout is not None and self.rollout.draws(index)
                if sampled:  # the student's completions of these prompts, every rank alike
                    chosen = [r if r.n_supervised else e for r, e in
                              zip(self.rollout.rollouts(student, chosen, index, self.autocast), chosen)]
                loss = replace(self.loss, kd_ratio=1.0) if sampled else self.loss
                metrics, shapes = _optimizer_step(student, self.teacher, chosen, self.pad_id, settings, loss,
                                                  self.optimizer, self.schedule, self.device, index, self.desc,
                                                  self.dist, batch_ids, autocast=self.autocast)
                metrics["on_policy"] = float(sampled)
                step = Step(index, metrics, shapes)
                yield step  # the caller's books, and its save when one is due
                progress.update(step.done, metrics["loss"])
                if self._stop(step):
                    self.guard.stop(step.done)  # raises Preempted
        finally:
            progress.close()

    def _stop(self, step: Step) -> bool:
        """Whether a preemption signal stops the run after ``step``: read once (a signal arriving later
        is seen after the next step) and agreed by every rank (one rank's signal stops them all)."""
        if step.stop is None:
            stop = self.guard.requested
            if self.dist.distributed:
                stop = distributed.agreed_signal(stop, self.dist)
            if stop:  # a rank that saw no signal itself hands over another's (none is never written over)
                self.guard.requested = stop
            step.stop = bool(stop)
        return step.stop

    def save_due(self, step: Step) -> bool:
        """Whether the state is saved after ``step``: a preemption signal, every ``resume.every``
        steps, or the last step with ``resume.at_end`` (never without ``resume``). Every rank asks."""
        if self.resume is None:
            return False
        periodic = self.resume.every and step.done % self.resume.every == 0
        last = self.resume.at_end and step.done == self.settings.max_steps
        return self._stop(step) or bool(periodic) or last

    def save(self, step: Step, extra: Optional[dict] = None) -> None:
        """Save the exact state after ``step`` (every rank: sharded weights are saved collectively),
        with the caller's ``extra`` counters and the rollout's."""
        extra = dict(extra or {})
        if self.rollout is not None:
            extra["rollout"] = self.rollout.state()
        self.resume.state.save(step.done, self.student, self.optimizer, self.schedule, extra)


def train_loop(student, teacher, examples: Sequence[TrainExample], pad_id: int, settings: TrainConfig,
               loss: LossConfig, device: torch.device, on_step: Optional[Callable[[int, dict, list], None]] = None,
               desc: str = "train", resume: Optional[Resume] = None, dist: Optional[DistEnv] = None,
               rollout=None, seed: int = 0) -> dict:
    """Train ``student`` in place in one call, for callers with no counters to save (the embedded
    models' preparation, benchmarks, tests); ``on_step(step, metrics, micro_batches)`` after each
    step. See ``TrainSteps``. Returns the last step's metrics ({} when none was left to run)."""
    metrics: dict = {}
    with TrainSteps(student, teacher, examples, pad_id, settings, loss, device, desc, resume, dist, rollout,
                    seed) as steps:
        for step in steps:
            if on_step is not None:
                on_step(step.index, step.metrics, step.micro_batches)
            if steps.save_due(step):
                steps.save(step)
            metrics = step.metrics
    return metrics


def _warn_low_precision_master(student) -> None:
    low = {str(p.dtype) for p in student.parameters() if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16)}
    if low:
        log.warning("the student's trainable weights are %s: AdamW steps them in that dtype, and updates "
                    "below half its rounding step (most, at fine-tuning learning rates) are lost; load the "
                    "student in fp32 and compute in bf16 (train.precision) instead", ", ".join(sorted(low)))


def accumulate_gradients(student, teacher, mine: Sequence[TrainExample], pad_id: int, micro: int,
                         n_supervised: int, n_sequences: int, loss: LossConfig, autocast: bool, impl: str,
                         device) -> tuple[tuple[float, float, float], list]:
    """Forward and backward over this rank's share ``mine`` of a global batch of ``n_sequences``
    sequences and ``n_supervised`` supervised tokens, ``micro`` sequences at a time; gradients add up
    in ``.grad``. Returns this rank's shares of the step's (ce, kd, total) and, per micro-batch,
    {"shape": (B, T), "lengths": [...], "supervised": n}. Summed over ranks (FSDP sums the
    gradients), the step equals one process's, however the batch was split."""
    ce_sum = kd_sum = total_value = 0.0
    shapes = []
    for start in range(0, len(mine), micro):
        part = mine[start:start + micro]
        batch = {k: v.to(device) for k, v in collate(part, pad_id).items()}
        if hasattr(teacher, "batch_inputs"):  # a cached teacher (kd_sweeps/teachers.py): its rows, no forward
            batch.update(teacher.batch_inputs(part, device))
        shapes.append({"shape": tuple(batch["input_ids"].shape), "lengths": [len(e.input_ids) for e in part],
                       "supervised": sum(e.n_supervised for e in part)})
        scaled, ce, kd = batch_loss.step_losses(student, teacher, batch, n_supervised, loss, autocast, impl, n_sequences)
        scaled.backward()
        ce_sum, kd_sum, total_value = ce_sum + ce, kd_sum + kd, total_value + scaled.item()
    return (ce_sum, kd_sum, total_value), shapes


def _optimizer_step(student, teacher, chosen, pad_id, settings, loss, optimizer, schedule, device, step, desc,
                    dist: DistEnv, batch_ids=None, autocast: bool = False) -> tuple[dict, list]:
    """One optimizer step over the global batch ``chosen`` (examples ``batch_ids``): this rank's slice
    of it, in micro-batches. Returns the step's (global) metrics and this rank's micro-batch shapes."""
    started = time.perf_counter()
    # GLOBAL counts normalise every rank's loss (each rank holds the whole batch's examples, so no
    # collective is needed); FSDP then sums the ranks' gradients: the single-process gradient.
    n_supervised = sum(e.n_supervised for e in chosen)
    mine = distributed.rank_slice(chosen, dist)  # batch_size / world_size sequences
    micro = distributed.micro_batch_size(settings.batch_size, settings.micro_batch_size, dist)
    sums, shapes = accumulate_gradients(student, teacher, mine, pad_id, micro, n_supervised, len(chosen), loss,
                                        autocast, settings.loss_impl, device)
    # Each rank holds its share of the global means: their sums are the step's (same on every rank,
    # so a non-finite loss stops all ranks together).
    ce_sum, kd_sum, total_value = distributed.all_reduce_sum(list(sums), dist)
    if not math.isfinite(total_value):
        raise FloatingPointError(f"{desc}: loss is {total_value} at step {step} (ce={ce_sum}, kd={kd_sum}; "
                                 f"batch examples {batch_ids}, lengths {[len(e.input_ids) for e in chosen]})")
    grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), settings.grad_clip or float("inf"))
    if hasattr(grad_norm, "full_tensor"):  # a DTensor when the student is sharded: the global norm
        grad_norm = grad_norm.full_tensor()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    lr = schedule.get_last_lr()[0]
    schedule.step()
    seconds = time.perf_counter() - started
    tokens = sum(len(e.input_ids) for e in chosen)
    return {"loss": total_value, "ce_loss": ce_sum, "kd_loss": kd_sum, "lr": lr,
            "grad_norm": float(grad_norm), "tokens_per_s": tokens / max(seconds, 1e-9),
            "supervised_tokens": n_supervised}, shapes


def format_duration(seconds: float) -> str:
    """"1h 05m" or "3m 07s"."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h {rest // 60:02d}m" if hours else f"{rest // 60}m {rest % 60:02d}s"


class Progress:
    """A tqdm bar in a terminal; elsewhere (Slurm, CI, a piped launch), where a bar only adds noise,
    one log line per ~10 % of the steps: step, loss, steps/s and the time left."""

    def __init__(self, total: int, desc: str, initial: int = 0, enabled: bool = True):
        self.total, self.desc, self.initial, self.enabled = total, desc, initial, enabled
        self.every = max(1, math.ceil(total / 10))
        self.started = time.perf_counter()
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=True)

    def update(self, done: int, loss: float) -> None:
        """``done`` steps are finished, the last with ``loss``."""
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
            return
        if not self.enabled or (done % self.every and done != self.total):
            return
        rate = (done - self.initial) / max(time.perf_counter() - self.started, 1e-9)  # steps/s, this process
        log.info("%s: step %d/%d (%d%%), loss %.4f, %.2f steps/s, %s left", self.desc, done, self.total,
                 100 * done // self.total, loss, rate, format_duration((self.total - done) / max(rate, 1e-9)))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
