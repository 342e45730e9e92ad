"""Token-level losses for knowledge distillation.

Every divergence is computed per position from logits of shape (N, V), so the
same code can run on all supervised positions at once or on a chunk of them;
callers reduce afterwards. ``kd_loss`` and ``ce_loss`` select the supervised
positions first, which keeps padding (whatever its logits hold) out of both
the value and the gradient.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from kd_sweeps.choices import LossName, values

LOSS_NAMES = values(LossName)


def _check_name(name: str) -> None:
    if name not in LOSS_NAMES:
        raise ValueError(f"unknown KD loss {name!r}; allowed names: {', '.join(LOSS_NAMES)}")


def _check_unit(label: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{label} must be in [0, 1], got {value}")


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    # float64 is kept for exact reference checks; everything else (bf16, fp16)
    # is upcast because log-softmax over a large vocabulary loses too much in
    # half precision.
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def kl_from_log_probs(logp: Tensor, logq: Tensor) -> Tensor:
    """KL(p || q) = sum_v p (log p - log q), from log-probs (N, V) -> (N,).

    Terms with p == 0 contribute exactly 0 (0 log 0 = 0). Both logs are zeroed
    there *before* subtracting: masking only the product would still leave
    -inf - (-inf) in the graph, and its NaN leaks into the backward pass.
    """
    p = logp.exp()
    live = p > 0
    zero = logp.new_zeros(())
    return (p * (torch.where(live, logp, zero) - torch.where(live, logq, zero))).sum(-1)


def _log_mix(logp: Tensor, logq: Tensor, w: float) -> Tensor:
    """log((1 - w) p + w q), elementwise, from log-probs (N, V) -> (N, V).

    A two-term logsumexp, so tiny probabilities keep their precision. Where
    both terms are -inf the inputs are replaced by zeros before the logsumexp
    (its backward is NaN there) and the result is put back to -inf.
    """
    if w == 0.0:
        return logp
    if w == 1.0:
        return logq
    a = logp + math.log1p(-w)
    b = logq + math.log(w)
    dead = torch.isneginf(a) & torch.isneginf(b)
    zero = a.new_zeros(())
    mixed = torch.logaddexp(torch.where(dead, zero, a), torch.where(dead, zero, b))
    return torch.where(dead, a, mixed)


def token_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    name: str,
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    mix: float = 0.5,
) -> Tensor:
    """Per-position divergence between teacher and student distributions.

    Args:
        student_logits: (N, V); any leading shape (..., V) also works.
        teacher_logits: same shape as ``student_logits``.
        name: one of ``LOSS_NAMES``.
        temperature: both distributions are softmax(logits / temperature).
        beta: JSD interpolation weight, in [0, 1].
        alpha: skew weight for ``skew_kl`` / ``skew_reverse_kl``, in [0, 1].
        mix: weight of the forward term in ``combined_kl``, in [0, 1].

    Returns:
        (N,) divergence per position, in float32 (float64 if either input is
        float64). It is NOT multiplied by temperature**2; ``kd_loss`` does that.

    With p_T, p_S the teacher and student probabilities:

    - forward_kl: KL(p_T || p_S). This is the true KL, not the cross-entropy
      -sum p_T log p_S that some implementations use; both have the same
      gradient w.r.t. the student, but only the KL is 0 when p_S == p_T.
    - reverse_kl: KL(p_S || p_T).
    - combined_kl: mix * KL(p_T || p_S) + (1 - mix) * KL(p_S || p_T).
    - jsd: with m = (1 - beta) p_S + beta p_T,
      (1 - beta) KL(p_S || m) + beta KL(p_T || m). This form is identically
      0 at beta = 0 and beta = 1, so those two endpoints follow the usual
      convention instead: beta == 0 returns forward_kl and beta == 1 returns
      reverse_kl.
    - tvd: 0.5 * sum |p_S - p_T|.
    - skew_kl: KL(p_T || (1 - alpha) p_S + alpha p_T).
    - skew_reverse_kl: KL(p_S || (1 - alpha) p_T + alpha p_S).

    Zero probabilities (e.g. -inf logits) follow 0 log 0 = 0 and never give
    NaN. A divergence that is genuinely infinite (reverse_kl where the teacher
    gives 0 to a token the student does not) comes out as +inf.
    """
    _check_name(name)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher logits differ in shape: {tuple(student_logits.shape)} "
            f"vs {tuple(teacher_logits.shape)}"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    for label, value in (("beta", beta), ("alpha", alpha), ("mix", mix)):
        _check_unit(label, value)

    dtype = _compute_dtype(student_logits, teacher_logits)
    log_s = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)

    if name == "forward_kl":
        return kl_from_log_probs(log_t, log_s)
    if name == "reverse_kl":
        return kl_from_log_probs(log_s, log_t)
    if name == "combined_kl":
        # A zero weight drops its term entirely, so an infinite KL on that
        # side cannot turn into 0 * inf = NaN.
        out = log_s.new_zeros(log_s.shape[:-1])
        if mix > 0:
            out = out + mix * kl_from_log_probs(log_t, log_s)
        if mix < 1:
            out = out + (1 - mix) * kl_from_log_probs(log_s, log_t)
        return out
    if name == "jsd":
        if beta == 0.0:
            return kl_from_log_probs(log_t, log_s)
        if beta == 1.0:
            return kl_from_log_probs(log_s, log_t)
        log_m = _log_mix(log_s, log_t, beta)
        return (1 - beta) * kl_from_log_probs(log_s, log_m) + beta * kl_from_log_probs(log_t, log_m)
    if name == "tvd":
        return 0.5 * (log_s.exp() - log_t.exp()).abs().sum(-1)
    if name == "skew_kl":
        return kl_from_log_probs(log_t, _log_mix(log_s, log_t, alpha))
    return kl_from_log_probs(log_s, _log_mix(log_t, log_s, alpha))  # skew_reverse_kl


def _bool_mask(mask: Tensor, shape: torch.Size) -> Tensor:
    if mask.shape != shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match positions {tuple(shape)}")
    # 0/1 integer masks (attention-mask style) are accepted as well.
    return mask if mask.dtype == torch.bool else mask != 0


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` (...) over positions where ``mask`` (...) is True.

    Returns a scalar. With an all-False mask the result is 0.0, still attached
    to the graph, with zero gradients. Masked-out values are selected away
    with ``torch.where`` (not multiplied by 0), so NaN there cannot leak in.
    """
    mask = _bool_mask(mask, values.shape)
    total = torch.where(mask, values, values.new_zeros(())).sum()
    return total / mask.sum().clamp_min(1)


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    name: str,
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    mix: float = 0.5,
) -> Tensor:
    """Distillation loss averaged over supervised positions.

    Args:
        student_logits, teacher_logits: (..., V), e.g. (B, T, V) or (N, V).
        mask: (...) bool; True where the position is supervised.
        name, temperature, beta, alpha, mix: see ``token_divergence``.

    Returns:
        Scalar: mean of ``token_divergence`` over the masked positions, times
        temperature**2 (keeps gradient size roughly independent of the
        temperature). Only the masked rows are gathered and evaluated, so
        masked-out positions get exactly zero gradient whatever their logits
        are. An all-False mask gives exactly 0.0 and zero gradients.
    """
    _check_name(name)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher logits differ in shape: {tuple(student_logits.shape)} "
            f"vs {tuple(teacher_logits.shape)}"
        )
    mask = _bool_mask(mask, student_logits.shape[:-1])
    div = token_divergence(
        student_logits[mask], teacher_logits[mask], name,
        temperature=temperature, beta=beta, alpha=alpha, mix=mix,
    )  # (N,)
    return div.sum() / mask.sum().clamp_min(1) * temperature**2


def ce_loss(student_logits: Tensor, target_ids: Tensor, mask: Tensor) -> Tensor:
    """Next-token cross-entropy (temperature 1) averaged over masked positions.

    Args:
        student_logits: (..., V).
        target_ids: (...) integer ids; must be valid ids wherever mask is True
            (an ignore index such as -100 there would be counted as 0 loss).
        mask: (...) bool.

    Returns:
        Scalar in float32 (float64 for float64 logits); 0.0 with zero
        gradients if the mask is all False.
    """
    mask = _bool_mask(mask, student_logits.shape[:-1])
    if target_ids.shape != mask.shape:
        raise ValueError(f"target_ids shape {tuple(target_ids.shape)} does not match mask {tuple(mask.shape)}")
    logits = student_logits[mask]  # (N, V)
    logits = logits.to(_compute_dtype(logits))
    nll = F.cross_entropy(logits, target_ids[mask].long(), reduction="sum")
    return nll / mask.sum().clamp_min(1)


def total_loss(ce: Tensor, kd: Tensor, kd_ratio: float) -> Tensor:
    """Blend of the two scalar losses: (1 - kd_ratio) * ce + kd_ratio * kd."""
    _check_unit("kd_ratio", kd_ratio)
    return (1 - kd_ratio) * ce + kd_ratio * kd
