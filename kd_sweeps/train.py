"""The training loop: one readable function for KD runs and for preparing embedded models (CE only).

Per optimizer step: take ``batch_size`` sequences (the GLOBAL batch, over all ranks), give each
rank its share, split that into micro-batches of ``micro_batch_size`` (the gradient accumulation is
derived: share / micro-batch), run the frozen teacher under no_grad and the student, and add up
the loss ``(1 - r) * CE + r * KD``, normalised one of two ways (``loss.normalize``):

  token     sum over the step's supervised tokens / the step's supervised-token count: every token
            weighs the same (long sequences weigh more);
  sequence  each sequence's own token mean, averaged over the step's sequences: every sequence
            weighs the same, as the paper's code (batch 1 per GPU, the GPUs' gradients averaged).

Either way each micro-batch's loss is its share of the step's value, so the gradient does not
depend on how the global batch is split over ranks and micro-batches. The student's master
weights and AdamW's state are fp32 (``models.load_pair``); bf16 is only the compute dtype
(autocast here; FSDP2's mixed-precision policy when sharded, ``distributed.shard_student``).

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
from typing import Callable, Optional, Sequence

import torch

from kd_sweeps import distributed, precision
from kd_sweeps.choices import Normalize, Schedule, values
from kd_sweeps.checkpoint import PreemptionGuard, TrainState
from kd_sweeps.chunked_loss import chunked_kd_ce, supervised_positions
from kd_sweeps.data import IGNORE_INDEX, TrainExample, collate, epoch_batches
from kd_sweeps.distributed import DistEnv, hidden_and_head  # also works on an FSDP-sharded model
from kd_sweeps.losses import ce_loss, kd_loss
from kd_sweeps.schema import LossConfig, TrainConfig

log = logging.getLogger(__name__)
SCHEDULES = values(Schedule)
NORMALIZE = values(Normalize)


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


def step_losses(student, teacher, batch: dict, n_step_supervised: int, loss: LossConfig,
                autocast: bool, impl: str = "chunked", n_step_sequences: int = 0) -> tuple[torch.Tensor, float, float]:
    """Loss of one micro-batch, scaled so that summing over the step's micro-batches (and ranks)
    gives the step's value. Returns (scaled total, ce, kd) with ce and kd this micro-batch's shares
    of the step's means, for logging. ``n_step_sequences``: the step's sequences (sequence
    normalisation).

    ``chunked`` (default) runs the output layers on supervised positions only, a chunk at a time
    (kd_sweeps/chunked_loss.py); ``full`` builds (B, T, V) logits for both models — the plain
    reference the chunked path is tested against."""
    if loss.normalize not in NORMALIZE:
        raise ValueError(f"loss.normalize={loss.normalize!r}: must be one of {', '.join(NORMALIZE)}")
    per_sequence = loss.normalize == "sequence"
    if per_sequence and n_step_sequences < 1:
        raise ValueError("loss.normalize=sequence needs the step's number of sequences (n_step_sequences)")
    terms = (_chunked_terms if impl == "chunked" else _full_terms)(student, teacher, batch, loss, autocast,
                                                                   per_sequence)
    scaled, ce_share, kd_share = None, 0.0, 0.0
    for total, ce, kd, n in terms:  # one term per sequence (sequence) or for the micro-batch (token)
        weight = 1.0 / n_step_sequences if per_sequence else n / max(1, n_step_supervised)
        scaled = total * weight if scaled is None else scaled + total * weight
        ce_share, kd_share = ce_share + ce * weight, kd_share + kd * weight
    return scaled, ce_share, kd_share


def _sequence_rows(labels: torch.Tensor) -> list[slice]:
    """Per sequence of a (B, T) label batch, its slice of the ``supervised_positions`` rows
    (batch-major); sequences without a target have none."""
    counts = (labels[:, 1:] != IGNORE_INDEX).sum(1).tolist()  # (B,)
    starts = [sum(counts[:b]) for b in range(len(counts))]
    return [slice(start, start + n) for start, n in zip(starts, counts) if n]


def _chunked_terms(student, teacher, batch, loss: LossConfig, autocast: bool, per_sequence: bool) -> list:
    """[(total, ce, kd, supervised rows)] of the chunked loss: one term, or one per sequence."""
    topk = batch.get("teacher_topk")  # set when the teacher is a cached one (teachers.CachedTeacher)
    use_teacher = teacher is not None and loss.kd_ratio > 0
    kd_ratio = loss.kd_ratio if use_teacher else 0.0
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    rows, targets = supervised_positions(batch["labels"], IGNORE_INDEX)  # (N,), (N,)
    with torch.autocast(batch["input_ids"].device.type, dtype=torch.bfloat16, enabled=autocast):
        hidden, weight = hidden_and_head(student, **inputs)  # (B, T, H), (V, H)
        teacher_hidden = teacher_weight = None
        if use_teacher and topk is None:
            with torch.no_grad():
                t_hidden, teacher_weight = hidden_and_head(teacher, **inputs)
            teacher_hidden = t_hidden.flatten(0, 1)[rows]  # (N, Ht)
        # Heads padded to different sizes (models.check_vocabularies): while the teacher takes part,
        # both distributions are over the shared first V columns, for CE as for KD (the full path
        # does the same); a cache was built on those columns (batch["teacher_vocab"]).
        vocab = teacher_weight.shape[0] if teacher_weight is not None else batch.get("teacher_vocab")
        if use_teacher and vocab is not None and vocab != weight.shape[0]:
            vocab = min(weight.shape[0], vocab)
            weight = weight[:vocab]  # (V, H)
            teacher_weight = None if teacher_weight is None else teacher_weight[:vocab]  # (V, Ht)
        student_rows = hidden.flatten(0, 1)[rows]  # (N, H)
        terms = []
        for part in _sequence_rows(batch["labels"]) if per_sequence else [slice(None)]:
            total, ce, kd, n = chunked_kd_ce(
                student_rows[part], None if teacher_hidden is None else teacher_hidden[part], weight,
                teacher_weight, targets[part], name=loss.name, kd_ratio=kd_ratio, temperature=loss.temperature,
                beta=loss.beta, alpha=loss.alpha, mix=loss.mix,
                teacher_topk=(topk[0][part], topk[1][part]) if use_teacher and topk is not None else None)
            terms.append((total, ce.item(), kd.item(), n))
    return terms


def _full_terms(student, teacher, batch, loss: LossConfig, autocast: bool, per_sequence: bool) -> list:
    """[(total, ce, kd, supervised tokens)] from (B, T, V) logits: one term, or one per sequence."""
    if batch.get("teacher_topk") is not None:
        raise ValueError("the cached teacher needs train.loss_impl=chunked")
    use_teacher = teacher is not None and loss.kd_ratio > 0
    kd_ratio = loss.kd_ratio if teacher is not None else 0.0
    device_type = batch["input_ids"].device.type
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    targets = batch["labels"][:, 1:]  # (B, T-1): token t+1 is predicted at position t
    mask = targets != IGNORE_INDEX
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
        logits = student(**inputs).logits[:, :-1]  # (B, T-1, V)
    teacher_logits = None
    if use_teacher:
        with torch.no_grad(), torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
            teacher_logits = teacher(**inputs).logits[:, :-1]
        vocab = min(logits.shape[-1], teacher_logits.shape[-1])  # shared columns of padded heads
        logits, teacher_logits = logits[..., :vocab], teacher_logits[..., :vocab]  # (B, T-1, V)
    parts = [slice(b, b + 1) for b in range(mask.shape[0]) if mask[b].any()] if per_sequence else [slice(None)]
    terms = []
    for part in parts:
        ce = ce_loss(logits[part], targets[part].clamp_min(0), mask[part])
        kd = torch.zeros((), device=logits.device)
        if teacher_logits is not None:
            kd = kd_loss(logits[part], teacher_logits[part], mask[part], loss.name, loss.temperature, loss.beta,
                         loss.alpha, loss.mix)
        terms.append(((1.0 - kd_ratio) * ce + kd_ratio * kd, ce.item(), kd.item(), int(mask[part].sum())))
    return terms


@dataclass
class Resume:
    """Exact resume: where the state lives, how often to save it, and the caller's own counters."""

    state: TrainState
    every: int = 0  # also save every N steps (0: only when a preemption signal arrives)
    get_extra: Callable[[], dict] = dict  # counters to save with the state (cost, time)
    set_extra: Callable[[dict], None] = lambda extra: None
    # Also save after the last step: an evaluation interrupted in this same job then resumes from the
    # trained state (zero steps left) instead of training again.
    at_end: bool = False


def train_loop(student, teacher, examples: Sequence[TrainExample], pad_id: int,
               settings: TrainConfig, loss: LossConfig, device: torch.device,
               on_step: Optional[Callable[[int, dict, list], None]] = None,
               desc: str = "train", resume: Optional[Resume] = None,
               dist: Optional[DistEnv] = None, rollout=None, seed: int = 0) -> dict:
    """Train ``student`` in place. ``on_step(step, metrics, micro_batches)`` is called after every
    optimizer step with, per micro-batch, its padded shape, real lengths and supervised-token count
    (logging and cost accounting live there). With ``resume``,
    a saved state is restored first and a preemption signal saves one and stops at a step boundary.
    With ``dist`` (several processes, student sharded by ``distributed.shard_student``) every rank
    trains on its slice of each global batch; metrics are global, ``micro_batches`` this rank's own.
    With ``rollout`` (``distill.OnPolicy``) a step it draws trains on the student's own samples of
    the batch's prompts instead, on the divergence alone. ``seed`` fixes the batch order and torch's
    RNG (the grid point's seed). Returns the last step's metrics."""
    dist = dist or DistEnv()
    distributed.micro_batch_size(settings.batch_size, settings.micro_batch_size, dist)  # fails before any step
    autocast = precision.resolve(settings.precision, device) == "bf16"
    _warn_low_precision_master(student)
    torch.manual_seed(seed)
    student.train()
    if teacher is not None:
        teacher.eval()
    optimizer = build_optimizer(student, settings)
    schedule = build_schedule(optimizer, settings)
    first_step = 0
    if resume is not None and resume.state.exists():
        first_step, extra = resume.state.load(student, optimizer, schedule)
        resume.set_extra(extra)
    # The batch order, and random_labels' draw, are pure functions of (seed, step).
    batches = epoch_batches([len(e.input_ids) for e in examples], settings.batch_size, seed)
    for _ in range(first_step):
        next(batches)
    progress = Progress(settings.max_steps, desc, first_step, enabled=dist.is_main)
    metrics: dict = {}
    with PreemptionGuard() as guard:
        for step in range(first_step, settings.max_steps):
            epoch, batch_ids = next(batches)  # indices into examples, named if the loss is not finite
            chosen = [examples[i].for_epoch(epoch) for i in batch_ids]
            sampled = rollout is not None and rollout.draws(step)
            if sampled:  # the student's completions of these prompts, every rank alike
                chosen = [r if r.n_supervised else e for r, e in
                          zip(rollout.rollouts(student, chosen, step, autocast), chosen)]
            metrics, shapes = _optimizer_step(student, teacher, chosen, pad_id, settings,
                                              replace(loss, kd_ratio=1.0) if sampled else loss, optimizer,
                                              schedule, device, step, desc, dist, batch_ids, autocast=autocast)
            metrics["on_policy"] = float(sampled)
            if on_step is not None:
                on_step(step, metrics, shapes)
            done = step + 1
            progress.update(done, metrics["loss"])
            stop = guard.requested  # read once: a signal arriving later is seen after the next step
            if dist.distributed:  # a signal seen by any rank stops all of them after this same step
                stop = distributed.agreed_signal(stop, dist)
            periodic = resume is not None and resume.every and done % resume.every == 0
            last = resume is not None and resume.at_end and done == settings.max_steps
            if resume is not None and (stop or periodic or last):
                resume.state.save(done, student, optimizer, schedule, resume.get_extra())
            if stop:
                guard.requested = stop  # a rank that saw no signal itself hands over another's
                guard.stop(done)
    progress.close()
    student.eval()
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
        scaled, ce, kd = step_losses(student, teacher, batch, n_supervised, loss, autocast, impl, n_sequences)
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
