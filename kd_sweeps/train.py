"""The training loop: one readable function for KD runs and for preparing embedded models (CE only).

Per optimizer step: take ``batch_size`` sequences, split into ``grad_accum`` micro-batches, run the
frozen teacher under no_grad and the student, and add up
``(1 - r) * CE + r * KD`` where both terms are sums over supervised tokens divided by the number
of supervised tokens in the WHOLE step — so the gradient does not depend on how a batch is split.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from kd_sweeps import distributed
from kd_sweeps.checkpoint import PreemptionGuard, TrainState
from kd_sweeps.chunked_loss import chunked_kd_ce, supervised_positions
from kd_sweeps.data import IGNORE_INDEX, TrainExample, collate, length_grouped_batches
from kd_sweeps.distributed import DistEnv, hidden_and_head  # also works on an FSDP-sharded model
from kd_sweeps.losses import ce_loss, kd_loss


@dataclass
class LoopSettings:
    max_steps: int
    batch_size: int
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_ratio: float = 0.1
    grad_clip: float = 1.0
    precision: str = "bf16"
    log_every: int = 10
    seed: int = 0
    loss_impl: str = "chunked"  # chunked | full (see step_losses)


@dataclass
class LossSettings:
    name: str = "forward_kl"
    kd_ratio: float = 0.5
    temperature: float = 1.0
    beta: float = 0.5
    alpha: float = 0.1
    mix: float = 0.5


def warmup_cosine(step: int, total: int, warmup_ratio: float) -> float:
    """LR multiplier: linear warm-up over warmup_ratio * total steps, then cosine decay to 0."""
    warmup = max(1, int(round(warmup_ratio * total)))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class CachedTeacher:
    """The teacher as its cached top-k log-probabilities (kd_sweeps/teacher_cache.py): no forward
    pass at all during training; each micro-batch gathers its rows."""

    def __init__(self, cache):
        self.cache = cache

    def eval(self) -> "CachedTeacher":
        return self

    def rows_for(self, part, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(values (N, k), ids (N, k)) in the order of ``supervised_positions`` for this micro-batch."""
        return self.cache.gather([e.index for e in part], [e.window for e in part],
                                 [e.labels != IGNORE_INDEX for e in part], device=device)


def step_losses(student, teacher, batch: dict, n_step_supervised: int, loss: LossSettings,
                autocast: bool, impl: str = "chunked") -> tuple[torch.Tensor, float, float]:
    """Loss of one micro-batch, scaled so that summing over the step's micro-batches gives the
    step's mean. Returns (scaled total, ce mean, kd mean) with the means for logging.

    ``chunked`` (default) runs the output layers on supervised positions only, a chunk at a time
    (kd_sweeps/chunked_loss.py); ``full`` builds (B, T, V) logits for both models — the plain
    reference the chunked path is tested against."""
    topk = batch.get("teacher_topk")  # set when the teacher is a CachedTeacher
    use_teacher = teacher is not None and loss.kd_ratio > 0
    kd_ratio = loss.kd_ratio if teacher is not None else 0.0
    if topk is not None and impl != "chunked":
        raise ValueError("the cached teacher needs train.loss_impl=chunked")
    device_type = batch["input_ids"].device.type
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if impl == "chunked":
        rows, targets = supervised_positions(batch["labels"], IGNORE_INDEX)  # (N,), (N,)
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
            hidden, weight = hidden_and_head(student, **inputs)  # (B, T, H), (V, H)
            teacher_hidden = teacher_weight = None
            if use_teacher and topk is None:
                with torch.no_grad():
                    t_hidden, teacher_weight = hidden_and_head(teacher, **inputs)
                teacher_hidden = t_hidden.flatten(0, 1)[rows]  # (N, Ht)
            # Heads padded to different sizes (models.check_vocabularies): while the teacher takes
            # part, both distributions are over the shared first V columns, for CE as for KD (the
            # full path does the same); a cache was built on those columns (batch["teacher_vocab"]).
            vocab = teacher_weight.shape[0] if teacher_weight is not None else batch.get("teacher_vocab")
            if use_teacher and vocab is not None and vocab != weight.shape[0]:
                vocab = min(weight.shape[0], vocab)
                weight = weight[:vocab]  # (V, H)
                teacher_weight = None if teacher_weight is None else teacher_weight[:vocab]  # (V, Ht)
            total, ce, kd, n_here = chunked_kd_ce(
                hidden.flatten(0, 1)[rows], teacher_hidden, weight, teacher_weight, targets,
                name=loss.name, kd_ratio=kd_ratio if use_teacher else 0.0, temperature=loss.temperature,
                beta=loss.beta, alpha=loss.alpha, mix=loss.mix, teacher_topk=topk if use_teacher else None)
        return total * (n_here / max(1, n_step_supervised)), ce.item(), kd.item()
    targets = batch["labels"][:, 1:]  # (B, T-1): token t+1 is predicted at position t
    mask = targets != IGNORE_INDEX
    n_here = int(mask.sum())
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
        logits = student(**inputs).logits[:, :-1]  # (B, T-1, V)
    kd = torch.zeros((), device=logits.device)
    teacher_logits = None
    if use_teacher:
        with torch.no_grad(), torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
            teacher_logits = teacher(**inputs).logits[:, :-1]
        vocab = min(logits.shape[-1], teacher_logits.shape[-1])  # shared columns of padded heads
        logits, teacher_logits = logits[..., :vocab], teacher_logits[..., :vocab]  # (B, T-1, V)
    ce = ce_loss(logits, targets.clamp_min(0), mask)
    if teacher_logits is not None:
        kd = kd_loss(logits, teacher_logits, mask, loss.name, loss.temperature, loss.beta,
                     loss.alpha, loss.mix)
    total = (1.0 - kd_ratio) * ce + kd_ratio * kd
    return total * (n_here / max(1, n_step_supervised)), ce.item(), kd.item()


@dataclass
class Resume:
    """Exact resume: where the state lives, how often to save it, and the caller's own counters."""

    state: TrainState
    every: int = 0  # also save every N steps (0: only when a preemption signal arrives)
    get_extra: Callable[[], dict] = dict  # counters to save with the state (cost, time)
    set_extra: Callable[[dict], None] = lambda extra: None


def train_loop(student, teacher, examples: Sequence[TrainExample], pad_id: int,
               settings: LoopSettings, loss: LossSettings, device: torch.device,
               on_step: Optional[Callable[[int, dict, list], None]] = None,
               desc: str = "train", resume: Optional[Resume] = None,
               dist: Optional[DistEnv] = None) -> dict:
    """Train ``student`` in place. ``on_step(step, metrics, micro_batches)`` is called after every
    optimizer step with, per micro-batch, its padded shape, real lengths and supervised-token count
    (logging and cost accounting live there). With ``resume``,
    a saved state is restored first and a preemption signal saves one and stops at a step boundary.
    With ``dist`` (several processes, student sharded by ``distributed.shard_student``) every rank
    trains on its slice of each global batch; metrics are global, ``micro_batches`` this rank's own.
    Returns the last step's metrics."""
    dist = dist or DistEnv()
    distributed.micro_batch_size(settings.batch_size, settings.grad_accum, dist)  # fails before any step
    torch.manual_seed(settings.seed)
    student.train()
    if teacher is not None:
        teacher.eval()
    decay = [p for p in student.parameters() if p.ndim >= 2]
    no_decay = [p for p in student.parameters() if p.ndim < 2]  # norms and biases
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=settings.lr,
                                  betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, settings.max_steps, settings.warmup_ratio))
    first_step = 0
    if resume is not None and resume.state.exists():
        first_step, extra = resume.state.load(student, optimizer, schedule)
        resume.set_extra(extra)
    batches = length_grouped_batches([len(e.input_ids) for e in examples], settings.batch_size,
                                     settings.seed)
    for _ in range(first_step):  # the batch order is a pure function of (seed, step)
        next(batches)
    progress = _progress(settings.max_steps, desc, first_step) if dist.is_main else None
    metrics: dict = {}
    with PreemptionGuard() as guard:
        for step in range(first_step, settings.max_steps):
            batch_ids = list(next(batches))  # indices into examples, named if the loss is not finite
            chosen = [examples[i] for i in batch_ids]
            metrics, shapes = _optimizer_step(student, teacher, chosen, pad_id, settings, loss,
                                              optimizer, schedule, device, step, desc, dist, batch_ids)
            if on_step is not None:
                on_step(step, metrics, shapes)
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{metrics['loss']:.3f}", refresh=False)
            done = step + 1
            stop = guard.requested  # read once: a signal arriving later is seen after the next step
            if dist.distributed:  # a signal seen by any rank stops all of them after this same step
                stop = distributed.agreed_signal(stop, dist)
            if resume is not None and (stop or (resume.every and done % resume.every == 0)):
                resume.state.save(done, student, optimizer, schedule, resume.get_extra())
            if stop:
                guard.requested = stop  # a rank that saw no signal itself hands over another's
                guard.stop(done)
    if progress is not None:
        progress.close()
    student.eval()
    return metrics


def _optimizer_step(student, teacher, chosen, pad_id, settings, loss, optimizer, schedule, device,
                    step, desc, dist: DistEnv, batch_ids=None) -> tuple[dict, list]:
    """One optimizer step over the global batch ``chosen`` (examples ``batch_ids``): this rank's slice
    of it, split into grad_accum micro-batches. Returns the step's (global) metrics and, per
    micro-batch of this rank, {"shape": (B, T), "lengths": [...], "supervised": n}."""
    started = time.perf_counter()
    # The GLOBAL count normalises every rank's loss (each rank holds the whole batch's examples, so
    # no collective is needed); FSDP then sums the ranks' gradients: the single-process gradient.
    n_supervised = sum(e.n_supervised for e in chosen)
    mine = distributed.rank_slice(chosen, dist)  # batch_size / world_size sequences
    micro = distributed.micro_batch_size(settings.batch_size, settings.grad_accum, dist)
    ce_sum = kd_sum = total_value = 0.0
    shapes = []
    for start in range(0, len(mine), micro):
        part = mine[start:start + micro]
        batch = {k: v.to(device) for k, v in collate(part, pad_id).items()}
        if isinstance(teacher, CachedTeacher):
            batch["teacher_topk"] = teacher.rows_for(part, device)
            batch["teacher_vocab"] = teacher.cache.meta["vocab"]  # the columns its top-k were taken over
        shapes.append({"shape": tuple(batch["input_ids"].shape), "lengths": [len(e.input_ids) for e in part],
                       "supervised": sum(e.n_supervised for e in part)})
        scaled, ce, kd = step_losses(student, teacher, batch, n_supervised, loss,
                                     settings.precision == "bf16", settings.loss_impl)
        scaled.backward()
        share = sum(e.n_supervised for e in part) / max(1, n_supervised)
        ce_sum, kd_sum, total_value = ce_sum + ce * share, kd_sum + kd * share, total_value + scaled.item()
    # Each rank holds its share of the global means: their sums are the step's (same on every rank,
    # so a non-finite loss stops all ranks together).
    ce_sum, kd_sum, total_value = distributed.all_reduce_sum([ce_sum, kd_sum, total_value], dist)
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


def _progress(total: int, desc: str, initial: int = 0):
    """A tqdm bar in a terminal; nothing in logs (Slurm, CI) where a bar only adds noise."""
    if not sys.stderr.isatty():
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=True)
