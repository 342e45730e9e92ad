"""The loss of one micro-batch, as its share of the optimizer step's value.

The loss is ``(1 - r) * CE + r * KD`` over the supervised tokens, normalised one of two ways
(``loss.normalize``):

  token     sum over the step's supervised tokens / the step's supervised-token count: every token
            weighs the same (long sequences weigh more);
  sequence  each sequence's own token mean, averaged over the step's sequences: every sequence
            weighs the same, as the paper's code (batch 1 per GPU, the GPUs' gradients averaged).

Either way each micro-batch's loss is its share of the step's value, so the gradient does not
depend on how the global batch is split over ranks and micro-batches (``train.TrainSteps``). Two
implementations give the same value: ``chunked`` (the output layers on supervised positions only,
kd_sweeps/chunked_loss.py) and ``full`` ((B, T, V) logits for both models, the plain reference).
"""

from __future__ import annotations

import torch

from kd_sweeps.choices import Normalize, values
from kd_sweeps.chunked_loss import chunked_kd_ce, supervised_positions
from kd_sweeps.data import IGNORE_INDEX
from kd_sweeps.distributed import hidden_and_head  # also works on an FSDP-sharded model
from kd_sweeps.losses import ce_loss, kd_loss
from kd_sweeps.schema import LossConfig

NORMALIZE = values(Normalize)


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
