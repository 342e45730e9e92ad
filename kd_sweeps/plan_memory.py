"""Memory of a training process, for the plan and ``benchmarks/memory_per_rank.py``: model shapes,
parameter counts, and two analytic models of the bytes a process holds at its peak.

Which formula applies:
- one process (``hydra.launcher`` gives 1 task, or the basic launcher): ``peak_memory_bytes``, the
  whole student and teacher in one process, no sharding, every layer's activations and the full
  logits kept (an upper bound when activation checkpointing or the chunked loss is on);
- several processes: ``memory_per_rank_bytes``, FSDP2 full sharding of the student over the
  processes, the teacher a full copy or sharded (``train.teacher_parallel``), activation
  checkpointing and the chunked loss as ``train`` sets them.
Neither is measured here (no GPU); treat them as +-30 % and +-25 %.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from kd_sweeps.cost import ModelShape

LOSS_BYTES_PER_LOGIT = 24  # fp32 loss intermediates per supervised logit (see peak_memory_bytes)
CHUNK_ROWS = 256  # chunked_kd_ce's default chunk of supervised positions
FKL_LOGIT_TENSORS = 5  # (chunk, V) fp32 tensors alive at once in forward KL's hand-written gradient
CONTEXT_BYTES = 2e9  # CUDA context + NCCL communicators and buffers: a stated allowance, not derived

# (layers, hidden, heads, kv_heads, head_dim, intermediate, tied embeddings); vocabulary 151,936.
# From each checkpoint's config.json; -Base checkpoints share their model's shape.
QWEN3_SHAPES = {
    "qwen3-0.6b": (28, 1024, 16, 8, 128, 3072, True),
    "qwen3-1.7b": (28, 2048, 16, 8, 128, 6144, True),
    "qwen3-4b": (36, 2560, 32, 8, 128, 9728, True),
    "qwen3-8b": (36, 4096, 32, 8, 128, 12288, False),
    "qwen3-32b": (64, 5120, 64, 8, 128, 25600, False),
}
QWEN3_VOCAB = 151_936


def pretrained_shape(name_or_path: str) -> ModelShape | None:
    """From a local checkpoint's config.json, else from the built-in Qwen3 table, else None."""
    config_file = Path(name_or_path).expanduser() / "config.json"
    if config_file.is_file():
        raw = json.loads(config_file.read_text())
        return ModelShape.from_config(SimpleNamespace(**raw.get("text_config", raw)))
    key = name_or_path.rstrip("/").split("/")[-1].lower().removesuffix("-base")
    if key not in QWEN3_SHAPES:
        return None
    layers, hidden, heads, kv_heads, head_dim, intermediate, tied = QWEN3_SHAPES[key]
    return ModelShape(layers, hidden, heads, kv_heads, head_dim, intermediate, QWEN3_VOCAB, tied)


def parameter_count(shape: ModelShape) -> int:
    """All parameters: matmul weights, embeddings (once if tied), RMSNorm weights (incl. q/k norms)."""
    embeddings = shape.vocab * shape.hidden * (1 if shape.tied_embeddings else 2)
    norms = shape.n_layers * (2 * shape.hidden + 2 * shape.head_dim) + shape.hidden
    return shape.n_layers * shape.layer_matmul_params() + embeddings + norms


def layer_params(shape: ModelShape) -> int:
    """One decoder layer's parameters: attention and MLP matrices, its two norms and the q/k norms."""
    return shape.layer_matmul_params() + 2 * shape.hidden + 2 * shape.head_dim


def layer_activation_bytes_per_token(shape: ModelShape, act: int) -> int:
    """What a Qwen3 layer saves for backward per token: two norm inputs, projection inputs, q/k-norm
    and SDPA inputs, SDPA output, four MLP tensors; ``act`` bytes each (2 bf16, 4 fp32)."""
    q, kv = shape.n_heads * shape.head_dim, shape.n_kv_heads * shape.head_dim
    return act * (4 * shape.hidden + 3 * q + 3 * kv + 4 * shape.intermediate)


def peak_memory_bytes(student: ModelShape, teacher: ModelShape, weight_bytes: int, teacher_bytes: int,
                      autocast: bool, micro_batch: int, max_len: int, max_supervised: int) -> int:
    """Bytes one training process holds at its peak (treat as +-30%; no sharding, no checkpointing):

    student      4 x w x parameters: weights, gradients, AdamW's two moments, in the weights' dtype
                 (w = 4 for fp32, 2 for bf16), + 2 x matmul weights for autocast's bf16 copies of fp32
    teacher      w_t x parameters: frozen, no gradients, no optimizer state
    activations  b x T x layers x a x (4 d + 3 q + 3 kv + 4 f): what a Qwen3 layer saves for backward
                 (two norm inputs, projection inputs, q/k-norm and SDPA inputs, SDPA output, four MLP
                 tensors); a = 2 bytes under bf16 autocast, 4 in fp32; SDPA keeps no T x T scores
    logits       b x V x (2 a T + 24 S): student and teacher logits over all positions, then ~24
                 bytes of fp32 log-softmaxes, probabilities and gradient per supervised position
    b micro-batch, T longest kept sequence, S its supervised tokens, d hidden, q = heads x head_dim,
    kv = kv_heads x head_dim, f intermediate, V vocabulary.
    """
    act = 2 if autocast else 4
    states = 4 * weight_bytes * parameter_count(student)
    casts = 2 * student.matmul_params() if autocast and weight_bytes == 4 else 0
    activations = micro_batch * max_len * student.n_layers * layer_activation_bytes_per_token(student, act)
    logits = micro_batch * student.vocab * (2 * act * max_len + LOSS_BYTES_PER_LOGIT * max_supervised)
    return states + casts + teacher_bytes * parameter_count(teacher) + activations + logits


@dataclass(frozen=True)
class RankLayout:
    """How one point trains on several processes: what ``memory_per_rank`` needs beyond the shapes."""

    processes: int  # FSDP2 ranks, one per GPU
    micro_batch: int = 1  # sequences per forward (train.micro_batch_size)
    max_len: int = 4096  # T: the longest kept sequence, tokens
    max_supervised: int = 4096  # S: its supervised positions
    act_bytes: int = 2  # compute dtype: 2 bf16, 4 fp32
    teacher_bytes: int = 2  # the teacher's weights: 2 bf16, 4 fp32
    teacher_sharded: bool = True  # train.teacher_parallel=shard (else a full copy per rank)
    checkpointing: bool = True  # train.activation_checkpointing
    chunked_loss: bool = True  # train.loss_impl=chunked (else full logits)
    student_master_bytes: int = 4  # fp32 master weights and AdamW state (models.load_pair)


def _dtype(nbytes: int) -> str:
    return "bf16" if nbytes == 2 else "fp32"


def memory_per_rank(student: ModelShape, teacher: ModelShape, layout: RankLayout) -> dict[str, float]:
    """Bytes per GPU by component (docs/performance.md derives each line), FSDP2 full sharding of the
    student with a bf16-compute / fp32-reduce policy, AdamW."""
    n, b, t, a = layout.processes, layout.micro_batch, layout.max_len, layout.act_bytes
    p_s, p_t = parameter_count(student), parameter_count(teacher)
    master, tw = layout.student_master_bytes, layout.teacher_bytes
    root_s = student.vocab * student.hidden  # the tied embedding / output layer (the root FSDP unit)
    rows = {
        # Sharded over the GPUs: the optimizer's view of the student.
        f"student master weights ({_dtype(master)}, 1/N)": master * p_s / n,
        f"student gradients ({_dtype(master)}, 1/N)": master * p_s / n,
        f"AdamW exp_avg + exp_avg_sq ({_dtype(master)}, 1/N)": 2 * master * p_s / n,
        f"teacher weights ({_dtype(tw)}; a full copy, or 1/N sharded)": tw * p_t / (n if layout.teacher_sharded else 1),
        # Gathered for compute: the root stays gathered from forward to backward; layers two at a time.
        "student gathered bf16: root + 2 layers": 2 * (root_s + 2 * layer_params(student)),
        "teacher gathered bf16 when sharded: 2 layers":
            2 * 2 * layer_params(teacher) if layout.teacher_sharded else 0.0,
        # Before the reduce-scatter: bf16 gradient and its fp32 copy, of the root and one layer.
        "student unsharded grads (bf16 + fp32 copy): root + 1 layer": 6 * (root_s + layer_params(student)),
    }
    per_token_layer = layer_activation_bytes_per_token(student, a)
    if layout.checkpointing:  # each layer keeps its input; one layer is recomputed in backward
        rows[f"activations: {student.n_layers} layer inputs ({_dtype(a)})"] = \
            b * student.n_layers * t * student.hidden * a
        rows["activations: one layer recomputed for backward"] = b * t * per_token_layer
    else:
        rows[f"activations: {student.n_layers} layers saved for backward"] = b * t * student.n_layers * per_token_layer
    rows[f"teacher forward, one layer at a time ({_dtype(a)}, no grad)"] = \
        b * t * a * (2 * teacher.intermediate + 4 * teacher.hidden)
    if layout.chunked_loss:  # the head-weight gradient buffer and one chunk's fp32 logits-sized tensors
        rows["chunked loss: (V, H) head-gradient buffer (fp32)"] = 4 * root_s
        rows[f"chunked loss: {FKL_LOGIT_TENSORS} x ({CHUNK_ROWS}, V) fp32"] = \
            FKL_LOGIT_TENSORS * 4 * CHUNK_ROWS * student.vocab
        rows["chunked loss: hidden states at supervised positions"] = \
            b * layout.max_supervised * (4 * student.hidden + a * teacher.hidden)
    else:  # student and teacher logits over all positions, then fp32 loss tensors per supervised one
        rows["full loss: logits and fp32 loss tensors"] = \
            b * student.vocab * (2 * a * t + LOSS_BYTES_PER_LOGIT * layout.max_supervised)
    rows["CUDA context, NCCL buffers (allowance)"] = CONTEXT_BYTES
    return rows


def memory_per_rank_bytes(student: ModelShape, teacher: ModelShape, layout: RankLayout) -> int:
    """The total of ``memory_per_rank``: bytes one of ``layout.processes`` GPUs holds at its peak."""
    return round(sum(memory_per_rank(student, teacher, layout).values()))
