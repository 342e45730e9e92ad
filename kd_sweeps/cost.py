"""Compute and memory cost of a KD training run.

FLOPs formula (one multiply-add = 2 FLOPs; only matrix multiplications count)
----------------------------------------------------------------------------
For a decoder-only transformer with ``L`` layers, hidden size ``d``, ``h``
query heads, ``h_kv`` key/value heads of size ``d_h``, gated-MLP width ``f``
and vocabulary ``V``::

    P_layer = d*(h*d_h) + 2*d*(h_kv*d_h) + (h*d_h)*d    # q, k, v, o projections
            + 3*d*f                                      # gate, up, down
    P       = L*P_layer + V*d                            # + output layer (logits)

    forward(T) = 2*P*T                                   # weight matmuls
               + L * 4*h*d_h*T*T                         # Q K^T and A V

summed over the sequences of a batch. The input embedding is a lookup, not a
matmul, so it adds nothing (tied or not). Norms, activations, softmax and the
loss itself are elementwise and left out; at these shapes they are a few
percent at most.

Attention is counted as the full ``T x T`` score matrix, not the causal half.
That is what eager attention and the math SDPA kernel execute (the causal mask
is applied to a full matrix), and it is also what
``torch.utils.flop_counter.FlopCounterMode`` charges for the fused SDPA kernels
(flash / memory-efficient / cuDNN), which it counts as two full
``(T x d_h) @ (d_h x T)``-sized bmms per head whatever ``is_causal`` says. A
flash kernel that skips fully masked tiles does roughly half the attention
work, so for it this term is an upper bound. (On CPU, PyTorch's
``_scaled_dot_product_flash_attention_for_cpu`` has no flop formula at all, so
FlopCounterMode reports zero attention FLOPs there.) Grouped-query attention
broadcasts K/V to all ``h`` query heads, so the attention term uses ``h``.

Training step
-------------
The backward pass costs two forwards (gradient w.r.t. the input and w.r.t.
the weight of every matmul), so a student step is ``3 * forward``. The frozen
teacher runs one forward under ``no_grad``. Kernels that recompute activations
(gradient checkpointing, the flash-attention backward) do more work than this
and are not counted; the count is of the model, not of recomputation.

Generation (evaluation)
-----------------------
With a KV cache, a prompt of ``T_p`` tokens is one forward (``forward(T_p)``
above), then every generated token is one position of one forward: ``2*P``
FLOPs of weight matmuls (``P`` as above: the output layer included) plus its
query against the ``c`` cached positions (itself included), ``4*h*d_h*c`` per
layer. The i-th of ``G`` generated tokens sees ``c = T_p + i``, so one
completion costs::

    generation(T_p, G) = forward(T_p) + 2*P*G + L*4*h*d_h*(G*T_p + G*(G+1)/2)

The last generated token's step is counted although its logits go unused:
one token in ``G``, well within the estimate's accuracy.

Padding
-------
Cost is what the hardware executes: a batch padded to ``(B, T_max)`` costs
``B`` forwards of length ``T_max`` whatever the real lengths are. Real and
padded token counts are tracked separately so the waste stays visible.
"""

from __future__ import annotations

import resource
import sys
from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a decoder-only transformer that its FLOPs depend on."""

    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied_embeddings: bool = False  # kept for parameter counts; FLOPs do not depend on it

    def __post_init__(self) -> None:
        for name in ("n_layers", "hidden", "n_heads", "n_kv_heads", "head_dim", "intermediate", "vocab"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")

    @classmethod
    def from_config(cls, config) -> "ModelShape":
        """Read a Llama/Qwen-style ``PretrainedConfig`` (text part if multimodal)."""
        if hasattr(config, "get_text_config"):
            config = config.get_text_config()
        n_heads = config.num_attention_heads
        # Older configs leave these out: then every head has its own K/V and
        # heads split the hidden size evenly.
        n_kv_heads = getattr(config, "num_key_value_heads", None) or n_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
        return cls(
            n_layers=config.num_hidden_layers,
            hidden=config.hidden_size,
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            head_dim=head_dim,
            intermediate=config.intermediate_size,
            vocab=config.vocab_size,
            tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        )

    def layer_matmul_params(self) -> int:
        """Weights of one layer that multiply every token: attention + gated MLP."""
        q_width = self.n_heads * self.head_dim
        kv_width = self.n_kv_heads * self.head_dim
        attention = self.hidden * q_width + 2 * self.hidden * kv_width + q_width * self.hidden
        mlp = 3 * self.hidden * self.intermediate
        return attention + mlp

    def matmul_params(self) -> int:
        """Weights that take part in a matmul per token (layers + output layer)."""
        return self.n_layers * self.layer_matmul_params() + self.vocab * self.hidden


def _check_lengths(seq_lengths: Sequence[int]) -> list[int]:
    lengths = [int(t) for t in seq_lengths]
    if any(t < 0 for t in lengths):
        raise ValueError(f"sequence lengths must be >= 0, got {lengths}")
    return lengths


def attention_flops(shape: ModelShape, seq_len: int) -> int:
    """Score (Q K^T) and value (A V) matmuls of all layers for one sequence.

    Each is ``n_heads`` products of (T x d_h) by (d_h x T) or (T x T) by
    (T x d_h): 2*T*T*d_h FLOPs per head, full T x T (see module docstring).
    """
    return shape.n_layers * 2 * (2 * shape.n_heads * shape.head_dim * seq_len * seq_len)


def forward_flops(shape: ModelShape, seq_lengths: Sequence[int]) -> int:
    """FLOPs of one forward pass over sequences of the given lengths."""
    lengths = _check_lengths(seq_lengths)
    linear = 2 * shape.matmul_params() * sum(lengths)
    return linear + sum(attention_flops(shape, t) for t in lengths)


def generation_flops(shape: ModelShape, prompt_tokens: int, new_tokens: int) -> int:
    """FLOPs of one completion of ``new_tokens`` after a prompt of ``prompt_tokens`` with a KV
    cache (formula in the module docstring)."""
    prompt, new = int(prompt_tokens), int(new_tokens)
    if prompt < 0 or new < 0:
        raise ValueError(f"token counts must be >= 0, got prompt={prompt}, new={new}")
    attention_per_position = shape.n_layers * 4 * shape.n_heads * shape.head_dim
    decode = 2 * shape.matmul_params() * new + attention_per_position * (new * prompt + new * (new + 1) // 2)
    return forward_flops(shape, [prompt]) + decode


def kd_step_flops(student: ModelShape, teacher: ModelShape | None, seq_lengths: Sequence[int]) -> dict:
    """FLOPs of one micro-batch: student forward+backward, teacher forward.

    ``teacher=None`` is plain cross-entropy training (teacher term 0).
    """
    lengths = _check_lengths(seq_lengths)
    flops_student = 3 * forward_flops(student, lengths)
    flops_teacher = 0 if teacher is None else forward_flops(teacher, lengths)
    return {"student": flops_student, "teacher": flops_teacher, "total": flops_student + flops_teacher}


class CostMeter:
    """Accumulates a run's cost: call ``.add_step(...)`` once per micro-batch.

    FLOPs are counted on the padded batch actually executed; token counts keep
    real, supervised and padding tokens apart.
    """

    def __init__(self, student: ModelShape, teacher: ModelShape | None, head_on_supervised_only: bool = False) -> None:
        self.student = student
        self.teacher = teacher
        # The chunked loss runs both output layers on the supervised positions only: the head's
        # 2 * V * H FLOPs per position are then counted for those positions, not for every token.
        self.head_on_supervised_only = head_on_supervised_only
        self.flops_student = 0
        self.flops_teacher = 0
        self.tokens_trained = 0  # real (non-padding) tokens fed to the student
        self.tokens_supervised = 0  # positions that entered the loss
        self.tokens_padded = 0  # padding positions executed for nothing

    @property
    def flops_total(self) -> int:
        return self.flops_student + self.flops_teacher

    def add_step(self, batch_shape: tuple[int, int], real_lengths: Sequence[int], n_supervised: int) -> None:
        """Record one micro-batch of padded shape ``(B, T_max)``.

        ``real_lengths`` holds the B unpadded lengths; ``n_supervised`` the
        number of positions the loss was taken over.
        """
        n_seqs, t_max = (int(x) for x in batch_shape)
        lengths = _check_lengths(real_lengths)
        if n_seqs < 0 or t_max < 0:
            raise ValueError(f"batch_shape must be non-negative, got {batch_shape}")
        if len(lengths) != n_seqs:
            raise ValueError(f"{len(lengths)} real lengths for a batch of {n_seqs} sequences")
        if any(t > t_max for t in lengths):
            raise ValueError(f"real lengths {lengths} exceed the padded length {t_max}")
        n_real = sum(lengths)
        if not 0 <= n_supervised <= n_real:
            raise ValueError(f"n_supervised={n_supervised} must be in [0, {n_real}] (real tokens)")
        step = kd_step_flops(self.student, self.teacher, [t_max] * n_seqs)
        if self.head_on_supervised_only:
            skipped = n_seqs * t_max - int(n_supervised)  # positions whose logits are never built
            step["student"] -= 3 * 2 * self.student.vocab * self.student.hidden * skipped
            if self.teacher is not None:
                step["teacher"] -= 2 * self.teacher.vocab * self.teacher.hidden * skipped
        self.flops_student += step["student"]
        self.flops_teacher += step["teacher"]
        self.tokens_trained += n_real
        self.tokens_supervised += int(n_supervised)
        self.tokens_padded += n_seqs * t_max - n_real

    def summary(self) -> dict:
        return {
            "train_flops": self.flops_total,
            "train_flops_student": self.flops_student,
            "train_flops_teacher": self.flops_teacher,
            "tokens_trained": self.tokens_trained,
            "tokens_supervised": self.tokens_supervised,
            "tokens_padded": self.tokens_padded,
        }


def peak_memory_bytes(device) -> int:
    """Peak memory in bytes: CUDA allocator peak, or the process's peak RSS on CPU.

    On CPU the peak resident set size covers the whole process lifetime and
    every thread in it; ``reset_peak_memory`` cannot lower it.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    if device.type == "cpu":
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        # ru_maxrss is in bytes on macOS and in KiB on Linux (and other BSDs).
        return int(peak if sys.platform == "darwin" else peak * 1024)
    raise ValueError(f"no peak-memory measure for device type {device.type!r}")


def reset_peak_memory(device) -> None:
    """Start a new CUDA peak; a no-op on CPU, whose RSS peak is process-lifetime."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif device.type != "cpu":
        raise ValueError(f"no peak-memory measure for device type {device.type!r}")
