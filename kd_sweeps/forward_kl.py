"""Forward KL (the default KD loss) for one chunk of rows, its gradient written out by hand.

``chunked_loss`` computes each chunk's loss gradient in its forward pass anyway; for forward KL the
gradient has a closed form, so it is built in place instead of through autograd on
``losses.token_divergence``, which keeps several more (chunk, V) fp32 tensors alive (at Qwen3's
V = 151,936, 148 MiB each per 256 rows). Both functions add tau^2 * the chunk's summed KL into
``sums[1]`` and return grad_scale * d(tau^2 KL) / d student_logits, or None without ``grad_scale``;
values and gradients equal the autograd path's (tests/test_chunked_loss.py).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from kd_sweeps.losses import kl_from_log_probs


@torch.no_grad()
def dense_forward_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float, sums: Tensor,
                     grad_scale: Optional[float]) -> Optional[Tensor]:
    """Forward KL against a dense teacher for one chunk, its gradient written out by hand.

    KL(p_T || p_S) with p = softmax(logits / tau): adds tau^2 * sum of the rows' KL into ``sums[1]``
    and returns grad_scale * tau^2 * d KL / d student_logits = grad_scale * tau * (p_S - p_T), (c, V),
    or None when ``grad_scale`` is None. Autograd through ``token_divergence`` keeps about eight
    (c, V) tensors alive at once; this about five, the student's logits included. The values equal
    ``losses.token_divergence(..., "forward_kl")``: each row is summed elementwise as
    p_T (log p_T - log p_S), and p_T == 0 contributes exactly 0 (the teacher's -inf log-probs are
    clamped to the dtype's lowest finite value first). ``student_logits`` (c, V) is left unchanged;
    it is finite, as any linear head's output is. ``teacher_logits`` is used up (divided in place).
    """
    dtype = student_logits.dtype
    teacher = teacher_logits.to(dtype)  # a new tensor, or the fresh matmul output itself
    del teacher_logits
    if temperature != 1.0:
        teacher.div_(temperature)
    log_t = F.log_softmax(teacher, dim=-1)  # (c, V)
    del teacher
    p_t = log_t.exp()  # (c, V)
    log_t.clamp_(min=torch.finfo(dtype).min)  # -inf -> lowest finite, so 0 * log 0 is 0, not NaN
    log_s = F.log_softmax(student_logits / temperature if temperature != 1.0 else student_logits, dim=-1)
    log_ratio = log_t.sub_(log_s)  # (c, V): log p_T - log p_S, in log_t's storage
    kl = log_ratio.mul_(p_t).sum(-1)  # (c,), the product in place: no (c, V) temporary
    del log_ratio, log_t
    sums[1] += kl.sum() * temperature ** 2
    if grad_scale is None:
        return None
    return log_s.exp_().sub_(p_t).mul_(grad_scale * temperature)  # (c, V) in log_s's storage


@torch.no_grad()
def sparse_forward_kl(student_logits: Tensor, values: Tensor, indices: Tensor, temperature: float,
                      sums: Tensor, grad_scale: Optional[float]) -> Optional[Tensor]:
    """Forward KL on the k + 1 buckets of a top-k teacher (``chunked_loss._sparse_divergence``), by hand.

    student_logits (c, V), left unchanged; values (c, k) teacher log-probs at the temperature;
    indices (c, k). Adds tau^2 * sum of the rows' KL into ``sums[1]``; returns grad_scale * tau^2 *
    d KL / d student_logits (c, V), or None when ``grad_scale`` is None. With p the student's tempered
    probabilities, s_R its mass outside the top-k ids, t_i / t_R the teacher's bucket masses and
    T = sum(t) (1 up to the cache's rounding): d KL / d z_j = (p_j T - t_j) / tau for a top-k id and
    p_j (T - t_R / s_R) / tau for any other id. s_R is taken in the log domain, relative to the
    largest other id (so a confident student whose other ids all underflow still gets a finite
    loss, as autograd's logsumexp gives). One (c, V) tensor besides the logits (two while the
    normaliser is taken), where autograd keeps about six.
    """
    dtype = student_logits.dtype
    scaled = student_logits / temperature if temperature != 1.0 else student_logits.clone()  # (c, V)
    log_normaliser = torch.logsumexp(scaled, dim=-1, keepdim=True)  # (c, 1)
    log_s_top = scaled.gather(1, indices) - log_normaliser  # (c, k)
    scaled.scatter_(1, indices, float("-inf"))  # only the other ids are left
    top_other = scaled.amax(-1, keepdim=True)  # (c, 1), finite: k < V and the logits are finite
    rest = scaled.sub_(top_other).exp_()  # (c, V): exp(z_j / tau - top_other), 0 at the top-k ids
    rest_sum = rest.sum(-1, keepdim=True)  # (c, 1), >= 1
    log_s_rest = top_other - log_normaliser + rest_sum.log()  # (c, 1)
    t_top = values.to(dtype)  # (c, k)
    # log(1 - sum_k t): clamped at 0 so rounding in the cache cannot make the rest mass negative.
    covered = torch.logsumexp(t_top, dim=-1, keepdim=True).clamp_max(0.0)  # (c, 1)
    log_t_rest = torch.log(-torch.expm1(covered))  # (c, 1); -inf when the top-k hold all the mass
    log_t = torch.cat([t_top, log_t_rest], 1)  # (c, k + 1)
    kl = kl_from_log_probs(log_t, torch.cat([log_s_top, log_s_rest], 1))  # (c,)
    sums[1] += kl.sum() * temperature ** 2
    if grad_scale is None:
        return None
    t = log_t.exp()  # (c, k + 1)
    total = t.sum(-1, keepdim=True)  # (c, 1)
    # other ids: p_j (T - t_R / s_R) = rest_j * (exp(top_other - log_normaliser) T - t_R / rest_sum)
    rest.mul_((top_other - log_normaliser).exp() * total - t[:, -1:] / rest_sum)
    rest.scatter_(1, indices, log_s_top.exp() * total - t[:, :-1])  # the top-k ids
    return rest.mul_(grad_scale * temperature)
