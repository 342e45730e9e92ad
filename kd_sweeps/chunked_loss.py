"""KD + CE loss computed from final hidden states, chunk by chunk, without full-vocabulary logits.

The plain path (``losses.kd_loss`` on ``model(...).logits``) keeps (B, T, V) logits for student and
teacher plus several same-sized fp32 intermediates alive until backward; at Qwen3's V = 151,936 and
T = 4,096 each one is 2.5 GB. Here only the N supervised positions go through the output layers, and
only ``chunk_size`` of them at a time: per chunk the student and teacher logits (c, V) are built,
the loss and its gradient w.r.t. those logits are computed, the gradient is pushed through the
output layer at once (into the hidden-state and head-weight gradients) and the chunk is freed.

Why the gradient is computed in the forward pass instead of recomputing each chunk in backward:
recomputing would run both output layers twice (the teacher's head is the largest matmul here), and
it saves no memory, because the head-weight gradient (V, H) is a full tensor either way (backward
would return it too). So ``forward`` leaves two buffers behind for ``backward``: d loss / d hidden
(N, H) and d loss / d head weight (V, H); ``backward`` only scales them by the incoming gradient.
Nothing of size N x V ever exists. The peak extra memory is set by one chunk's loss, plus the (V, H)
fp32 weight-gradient buffer: forward_kl (the default) has its gradient written out by hand and in
place, about 5 (chunk_size, V) fp32 tensors at once against a dense teacher and 3 against the
top-k cache (``kd_sweeps/forward_kl.py``); the other divergences go through autograd
on ``token_divergence``, about 9 (reverse_kl) to 15 (jsd). At Qwen3's V = 151,936 one such tensor
is 148 MiB per 256 rows.

Out of scope: heads that are not a plain linear map of the last hidden state, such as logit
soft-capping (Gemma 2/3) or logit scaling (Cohere, Granite); ``final_hidden_and_head_weight``
refuses them.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from kd_sweeps.forward_kl import dense_forward_kl, sparse_forward_kl
from kd_sweeps.losses import LOSS_NAMES, token_divergence

# On CUDA the weight gradient is summed into its fp32 buffer by one cuBLAS call per chunk that reads
# bf16/fp16 inputs and writes fp32 (``torch.addmm(..., out_dtype=torch.float32)``); False sums a
# product in the inputs' dtype instead (one (V, H) temporary per chunk), as on CPU. Set to False
# where the fp32-output GEMM is missing; it is also switched off on the first call that fails.
FP32_OUT_MATMUL = True

# config fields that make the logits something other than lm_head(hidden): soft-capping / scaling.
_HEAD_TRANSFORMS = {"final_logit_softcapping": None, "logit_scale": None, "logits_scaling": 1.0}


def supervised_positions(labels: Tensor, ignore_index: int = -100) -> tuple[Tensor, Tensor]:
    """Positions that predict a supervised token, and the token they predict.

    Args:
        labels: (B, T) unshifted labels: the token id where position t is supervised,
            ``ignore_index`` elsewhere. Position t predicts the token at t + 1.

    Returns:
        row_index: (N,) long, flat indices into the B * T positions, i.e. rows of
            ``hidden.flatten(0, 1)`` for hidden states (B, T, H); in (batch, time) order.
        target_ids: (N,) long, ``labels[b, t + 1]`` for each of those rows.
    """
    if labels.dim() != 2:
        raise ValueError(f"labels must be (B, T), got shape {tuple(labels.shape)}")
    batch, width = labels.shape
    targets = labels[:, 1:]  # (B, T-1): token t+1 is predicted at position t
    keep = targets != ignore_index
    b, t = keep.nonzero(as_tuple=True)
    return b * width + t, targets[b, t].long()


def final_hidden_and_head_weight(model, input_ids: Tensor,
                                 attention_mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Final hidden states (B, T, H) and the output-layer weight (V, H) of a transformers CausalLM.

    For Qwen3 / Llama-style models the decoder's ``last_hidden_state`` already has the final norm
    applied, so ``hidden @ weight.T`` equals ``model(...).logits``. Models whose logits are
    soft-capped or scaled after the head, or whose head has a bias, raise ``ValueError``.
    """
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    issues = [f"{model.__class__.__name__}: config.{key}={getattr(config, key)!r} changes the logits "
              f"after the output layer; the chunked loss only supports a plain linear head"
              for key, neutral in _HEAD_TRANSFORMS.items()
              if getattr(config, key, neutral) not in (neutral, None)]
    head = model.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        issues.append(f"{model.__class__.__name__}: the output layer has a bias; pass it as "
                      f"student_head_bias instead of using final_hidden_and_head_weight")
    if issues:
        raise ValueError("\n".join(issues))
    out = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state, head.weight


class _Teacher:
    """The teacher side of one call: per chunk of rows, either dense logits or sparse top-k."""

    def __init__(self, hidden, weight, logits_fn, topk):
        self.hidden, self.weight, self.logits_fn, self.topk = hidden, weight, logits_fn, topk

    def dense_logits(self, rows: slice) -> Tensor:
        """Teacher logits (c, V) for the chunk ``rows``, in the matmul dtype, without a graph."""
        with torch.no_grad():  # the teacher is frozen: no graph on its side
            hidden = self.hidden[rows]  # (c, Ht)
            return self.logits_fn(hidden) if self.logits_fn else F.linear(hidden, self.weight)  # (c, V)

    def forward_kl(self, student_logits: Tensor, rows: slice, temperature: float, sums: Tensor,
                   grad_scale: Optional[float]) -> Optional[Tensor]:
        """Forward KL for the chunk ``rows`` with its gradient written by hand: see
        ``forward_kl.dense_forward_kl`` and ``forward_kl.sparse_forward_kl``."""
        if self.topk is None:
            return dense_forward_kl(student_logits, self.dense_logits(rows), temperature, sums, grad_scale)
        values, indices = self.topk
        return sparse_forward_kl(student_logits, values[rows], indices[rows], temperature, sums, grad_scale)

    def kd_rows(self, student_logits: Tensor, rows: slice, loss) -> Tensor:
        """Per-row divergence (c,) times temperature**2 for the chunk ``rows``."""
        if self.topk is not None:
            values, indices = self.topk
            divergence = _sparse_divergence(student_logits, values[rows], indices[rows], loss)  # (c,)
        else:
            divergence = token_divergence(student_logits, self.dense_logits(rows), **loss)  # (c,)
        return divergence * loss["temperature"] ** 2


def _sparse_divergence(student_logits: Tensor, values: Tensor, indices: Tensor, loss: dict) -> Tensor:
    """Divergence on k + 1 buckets: the teacher's top-k ids, and one bucket for all other ids.

    student_logits (c, V); values (c, k) teacher log-probs at the loss temperature; indices (c, k).
    Both distributions are tempered over the full vocabulary first and bucketed afterwards (the
    rest bucket's mass is the sum of the tempered tail, not a tempered sum).
    """
    dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    log_s = F.log_softmax(student_logits.to(dtype) / loss["temperature"], dim=-1)  # (c, V)
    student_top = log_s.gather(1, indices)  # (c, k)
    others = log_s.scatter(1, indices, float("-inf"))  # (c, V) with the top-k ids removed
    student_rest = torch.logsumexp(others, dim=-1, keepdim=True)  # (c, 1)
    values = values.to(dtype)
    # log(1 - sum_k p_T): clamped at 0 so rounding in the cache cannot make the rest mass negative.
    covered = torch.logsumexp(values, dim=-1, keepdim=True).clamp_max(0.0)  # (c, 1)
    teacher_rest = torch.log(-torch.expm1(covered))  # (c, 1); -inf when the top-k hold all the mass
    # Bucketed log-probs are already normalised, so token_divergence's log_softmax at temperature 1
    # leaves them unchanged (and, being the same function of the logits, the gradient too).
    return token_divergence(torch.cat([student_top, student_rest], 1), torch.cat([values, teacher_rest], 1),
                            **{**loss, "temperature": 1.0})  # (c,)


class _ChunkedKDCE(torch.autograd.Function):
    """Loss value and d loss / d (hidden, weight, bias) in one chunked pass; backward only scales."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, teacher, settings):
        n, kd_ratio = hidden.shape[0], settings["kd_ratio"]
        dtype = torch.float64 if torch.float64 in (hidden.dtype, weight.dtype) else torch.float32
        # needs_input_grad stays True under torch.no_grad(), so the caller's grad mode is passed in.
        grad_enabled = settings["grad_enabled"]
        need_hidden, need_weight, need_bias = (grad_enabled and need for need in ctx.needs_input_grad[:3])
        need_any = need_hidden or need_weight or need_bias
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None  # (N, H)
        grad_weight = weight.new_zeros(weight.shape, dtype=dtype) if need_weight else None  # (V, H)
        grad_bias = weight.new_zeros(weight.shape[0], dtype=dtype) if need_bias else None  # (V,)
        sums = hidden.new_zeros(2, dtype=dtype)  # (CE, KD) summed over rows
        for start in range(0, n, settings["chunk_size"]):
            rows = slice(start, min(start + settings["chunk_size"], n))
            chunk = hidden[rows]  # (c, H)
            grad_logits = _chunk_loss(chunk, weight, bias, targets[rows], rows, teacher, settings, sums,
                                      need_any)  # (c, V) or None
            if need_any:
                _push_through_head(grad_logits, chunk, weight, rows, grad_hidden, grad_weight, grad_bias)
            del grad_logits  # free this chunk's (c, V) gradient before the next chunk's logits
        ctx.grads = (grad_hidden,
                     grad_weight.to(weight.dtype) if need_weight else None,
                     grad_bias.to(bias.dtype) if need_bias else None)
        ce_mean, kd_mean = sums / max(n, 1)  # N == 0: sums are 0, so means are 0 rather than 0 / 0
        ctx.mark_non_differentiable(ce_mean, kd_mean)
        return (1.0 - kd_ratio) * ce_mean + kd_ratio * kd_mean, ce_mean, kd_mean

    @staticmethod
    def backward(ctx, grad_total, _grad_ce, _grad_kd):
        if ctx.grads is None:
            raise RuntimeError("chunked_kd_ce's backward can run only once per forward "
                               "(its gradients are scaled in place)")
        grads, ctx.grads = ctx.grads, None
        # In place: the (V, H) weight gradient is large, and nothing else holds these buffers.
        scaled = [None if g is None else g.mul_(grad_total.to(g.dtype)) for g in grads]
        return (*scaled, None, None, None)


def _chunk_loss(chunk, weight, bias, targets, rows, teacher, settings, sums, need_grad) -> Optional[Tensor]:
    """Adds this chunk's CE and KD sums into ``sums`` (2,); returns d objective / d logits (c, V).

    The objective is ((1 - r) * CE_sum + r * KD_sum) / N, so that the chunks add up to the means.
    KD goes first and its graph is freed before CE starts: at most one loss's (c, V) intermediates
    are alive at a time. CE needs no graph: its gradient is softmax - one_hot, built in place.
    """
    n, kd_ratio = settings["n"], settings["kd_ratio"]
    logits = F.linear(chunk, weight, bias)  # (c, V), in the matmul dtype (bf16 under autocast)
    matmul_dtype = logits.dtype
    # An fp32 (fp64) leaf: the gradient comes out, and is summed, at the loss precision.
    logits = logits.to(sums.dtype).requires_grad_(need_grad)
    grad = None
    if teacher is not None and settings["loss"]["name"] == "forward_kl":  # the gradient written by hand
        logits = logits.detach()
        grad = teacher.forward_kl(logits, rows, settings["loss"]["temperature"], sums,
                                  kd_ratio / n if need_grad else None)
    elif teacher is not None:
        with torch.enable_grad() if need_grad else torch.no_grad():
            kd_rows = teacher.kd_rows(logits, rows, settings["loss"])  # (c,)
        sums[1] += kd_rows.detach().sum()
        if need_grad:
            (grad,) = torch.autograd.grad(kd_rows, logits, torch.full_like(kd_rows, kd_ratio / n))
        del kd_rows  # frees the KD graph
    with torch.no_grad():
        logits = logits.detach()
        log_normaliser = torch.logsumexp(logits, dim=-1, keepdim=True)  # (c, 1)
        sums[0] += (log_normaliser - logits.gather(1, targets[:, None])).sum()
        if need_grad and kd_ratio < 1:
            ce_grad = logits.sub_(log_normaliser).exp_()  # softmax (c, V), reusing the logits' storage
            ce_grad[torch.arange(len(targets), device=targets.device), targets] -= 1.0
            ce_weight = (1 - kd_ratio) / n
            grad = ce_grad.mul_(ce_weight) if grad is None else grad.add_(ce_grad, alpha=ce_weight)
    return None if grad is None else grad.to(matmul_dtype)


def _push_through_head(grad_logits, chunk, weight, rows, grad_hidden, grad_weight, grad_bias):
    """Chain rule through logits = chunk @ weight.T + bias, for one chunk of rows.

    grad_logits (c, V) in the dtype the forward matmul produced, chunk (c, H), weight (V, H). Without
    autocast all three share one dtype; under autocast the matmuls below are cast like the forward
    one (autocast caches the weight's cast). The weight gradient is summed over chunks in fp32 (fp64
    for fp64); when the product is in lower precision, see ``_add_product``.
    """
    if grad_hidden is not None:
        grad_hidden[rows] = grad_logits @ weight  # (c, H)
    if grad_weight is not None:
        if grad_logits.dtype == chunk.dtype == grad_weight.dtype:
            grad_weight.addmm_(grad_logits.T, chunk)  # (V, H) += (V, c) @ (c, H), no temporary
        else:
            _add_product(grad_weight, grad_logits.T, chunk)  # (V, H) += (V, c) @ (c, H)
    if grad_bias is not None:
        grad_bias += grad_logits.sum(0)


def _add_product(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc (fp32) += a @ b for a in bf16/fp16 (b is cast to a's dtype, as autocast would).

    On CUDA with ``FP32_OUT_MATMUL``: one GEMM that accumulates in fp32 and adds into ``acc`` in
    place, so no (V, H) temporary (at Qwen3's V and H = 2,560 a 742 MiB bf16 product per chunk,
    written, read back and added). Elsewhere the product is formed in a's dtype, then added.
    """
    global FP32_OUT_MATMUL
    if acc.is_cuda and acc.dtype == torch.float32 and a.dtype in (torch.bfloat16, torch.float16) \
            and FP32_OUT_MATMUL:
        try:
            with torch.autocast("cuda", enabled=False):  # autocast would cast acc to a's dtype
                torch.addmm(acc, a, b.to(a.dtype), out_dtype=torch.float32, out=acc)
            return
        except (TypeError, RuntimeError, NotImplementedError):  # a torch without the fp32-output GEMM
            FP32_OUT_MATMUL = False
    acc += a @ b


def chunked_kd_ce(
    student_hidden: Tensor,
    teacher_hidden: Optional[Tensor],
    student_head_weight: Tensor,
    teacher_head_weight: Optional[Tensor],
    targets: Tensor,
    *,
    name: str,
    kd_ratio: float,
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    mix: float = 0.5,
    chunk_size: int = 256,
    student_head_bias: Optional[Tensor] = None,
    teacher_logits_fn: Optional[Callable[[Tensor], Tensor]] = None,
    teacher_topk: Optional[tuple[Tensor, Tensor]] = None,
) -> tuple[Tensor, Tensor, Tensor, int]:
    """(1 - kd_ratio) * CE + kd_ratio * KD over N supervised positions, through the output layers.

    Args:
        student_hidden: (N, H) student final hidden states (after the final norm) at the supervised
            positions, e.g. ``hidden.flatten(0, 1)[row_index]`` with ``supervised_positions``.
        teacher_hidden: (N, Ht) teacher hidden states at the same positions (never differentiated),
            or None with ``teacher_topk`` or without a teacher.
        student_head_weight: (V, H) student output layer (``lm_head.weight``); differentiated.
        teacher_head_weight: (V, Ht) teacher output layer; may be None with ``teacher_logits_fn``.
        targets: (N,) next-token ids, valid ids in [0, V).
        name, temperature, beta, alpha, mix: the KD divergence, as in ``losses.token_divergence``.
        kd_ratio: weight of KD in the total, in [0, 1].
        chunk_size: rows per chunk; the peak extra memory is about 5-15 (chunk_size, V) fp32 tensors
            (see the module docstring), so 256 rows at V = 151,936 need roughly 0.7-2.2 GiB.
        student_head_bias: optional (V,) bias of the student output layer; differentiated.
        teacher_logits_fn: optional map from a chunk of teacher hidden states (c, Ht) to teacher
            logits (c, V), for teachers whose head is not ``hidden @ teacher_head_weight.T``.
        teacher_topk: sparse teacher instead of ``teacher_hidden``: (values (N, k), indices (N, k)),
            the teacher's log-probabilities AT THE LOSS TEMPERATURE, i.e. top-k of
            ``log_softmax(teacher_logits / temperature)``, and their distinct token ids, k < V.
            The KD term then compares two distributions over k + 1 buckets: the k ids, and one
            "rest" bucket holding 1 - sum(exp(values)) for the teacher and the student's tempered
            probability of every other id. With k = V - 1 this is exactly the dense divergence.

    Returns:
        (total, ce_mean, kd_mean, N): scalars in fp32 (fp64 for fp64 inputs). CE is at temperature
        1; KD is the mean divergence times temperature**2, like ``losses.kd_loss``. Only ``total``
        is differentiable (ce_mean and kd_mean are for logging). Without a teacher (both
        ``teacher_hidden`` and ``teacher_topk`` None) or with kd_ratio == 0 the KD term is not
        computed, kd_mean is 0, and total is CE. N == 0 gives exact zeros and zero gradients.

    The gradients are computed during this call (when anything requires grad) and held until
    backward: (N, H) for the hidden states and (V, H) for the weight. ``backward`` may run once.
    Autocast, if active, applies to the output-layer matmuls as in the plain path.
    """
    _validate(student_hidden, teacher_hidden, student_head_weight, teacher_head_weight, targets,
              name, kd_ratio, temperature, chunk_size, student_head_bias, teacher_logits_fn, teacher_topk)
    has_teacher = teacher_hidden is not None or teacher_topk is not None
    if teacher_topk is not None:
        teacher_topk = (teacher_topk[0].detach(), teacher_topk[1].long())  # gather/scatter want int64 ids
    teacher = None
    if has_teacher and kd_ratio > 0:
        teacher = _Teacher(None if teacher_hidden is None else teacher_hidden.detach(),
                           None if teacher_head_weight is None else _cast_once(teacher_head_weight.detach()),
                           teacher_logits_fn, teacher_topk)
    settings = {"kd_ratio": kd_ratio if teacher is not None else 0.0, "chunk_size": chunk_size,
                "n": student_hidden.shape[0],
                "grad_enabled": torch.is_grad_enabled(),
                "loss": {"name": name, "temperature": temperature, "beta": beta, "alpha": alpha, "mix": mix}}
    total, ce_mean, kd_mean = _ChunkedKDCE.apply(
        student_hidden, student_head_weight, student_head_bias, targets.long(), teacher, settings)
    return total, ce_mean, kd_mean, student_hidden.shape[0]


def _cast_once(weight: Tensor) -> Tensor:
    """Under autocast, the fp32 teacher head (V, Ht) cast to the autocast dtype once per call.

    Autocast caches casts only for leaves that require grad; a frozen teacher head would otherwise
    be cast again for every chunk (a (V, Ht) copy each time).
    """
    device_type = weight.device.type
    if weight.dtype == torch.float32 and torch.is_autocast_enabled(device_type):
        return weight.to(torch.get_autocast_dtype(device_type))
    return weight


def _validate(hidden, teacher_hidden, weight, teacher_weight, targets, name, kd_ratio, temperature,
              chunk_size, bias, teacher_logits_fn, teacher_topk) -> None:
    """Collect every problem with the arguments, then raise once."""
    issues = []
    if name not in LOSS_NAMES:
        issues.append(f"name={name!r}: allowed names: {', '.join(LOSS_NAMES)}")
    if not 0.0 <= kd_ratio <= 1.0:
        issues.append(f"kd_ratio={kd_ratio}: must be in [0, 1]")
    if not (temperature > 0 and math.isfinite(temperature)):
        issues.append(f"temperature={temperature}: must be finite and > 0")
    if not (isinstance(chunk_size, int) and chunk_size >= 1):
        issues.append(f"chunk_size={chunk_size!r}: must be an int >= 1")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[-1]:
        issues.append(f"student_hidden {tuple(hidden.shape)} and student_head_weight {tuple(weight.shape)}: "
                      f"expected (N, H) and (V, H)")
    n, vocab = hidden.shape[0], weight.shape[0]
    if targets.shape != (n,) or targets.is_floating_point():
        issues.append(f"targets {tuple(targets.shape)} {targets.dtype}: expected integer ids of shape ({n},)")
    if bias is not None and bias.shape != (vocab,):
        issues.append(f"student_head_bias {tuple(bias.shape)}: expected ({vocab},)")
    if teacher_hidden is not None and teacher_topk is not None:
        issues.append("teacher_hidden and teacher_topk: give one of them, not both")
    if teacher_hidden is not None:
        if teacher_hidden.dim() != 2 or teacher_hidden.shape[0] != n:
            issues.append(f"teacher_hidden {tuple(teacher_hidden.shape)}: expected ({n}, Ht)")
        if teacher_logits_fn is None and (teacher_weight is None or teacher_weight.shape[0] != vocab
                                          or teacher_weight.shape[-1] != teacher_hidden.shape[-1]):
            shape = None if teacher_weight is None else tuple(teacher_weight.shape)
            issues.append(f"teacher_head_weight {shape}: expected ({vocab}, {teacher_hidden.shape[-1]}) "
                          f"(or pass teacher_logits_fn)")
    if teacher_logits_fn is not None and teacher_hidden is None:
        issues.append("teacher_logits_fn: needs teacher_hidden (it maps teacher hidden states to logits)")
    if teacher_topk is not None:
        values, indices = teacher_topk
        if values.shape != indices.shape or values.dim() != 2 or values.shape[0] != n:
            issues.append(f"teacher_topk shapes {tuple(values.shape)}, {tuple(indices.shape)}: "
                          f"expected two ({n}, k) tensors")
        elif not 1 <= values.shape[1] < vocab:
            issues.append(f"teacher_topk k={values.shape[1]}: must be in [1, V) with V={vocab}")
        if indices.is_floating_point() or not values.is_floating_point():
            issues.append(f"teacher_topk dtypes {values.dtype}, {indices.dtype}: expected float "
                          f"log-probs and integer ids")
    if issues:
        raise ValueError("chunked_kd_ce: invalid arguments:\n" + "\n".join(issues))
