"""Memory per GPU for the paper's pair, Qwen3-8B -> Qwen3-4B-Base, with fp32 master weights: worked
out, not measured (no GPU here). Prints the table of docs/performance.md.

    python benchmarks/memory_per_rank.py                   # 4 and 8 GPUs, 4,096-token sequences
    python benchmarks/memory_per_rank.py --gpus 4 --tokens 8192

Parameter counts come from the real configs' shapes (kd_sweeps.plan.QWEN3_SHAPES, counted by
plan.parameter_count); the rest is arithmetic on the training recipe (train=paper): FSDP2 full
sharding of the student over the GPUs with a bf16-compute / fp32-reduce mixed-precision policy,
AdamW, micro-batch 1, activation checkpointing per decoder layer, the chunked KD loss. Each line
says what it counts; treat the total as +-25 % (allocator fragmentation and NCCL's buffers vary).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

GB = 1e9
CHUNK_ROWS = 256  # chunked_kd_ce's default chunk
FKL_LOGIT_TENSORS = 5  # (chunk, V) fp32 tensors alive at once in forward KL's hand-written gradient
CONTEXT_GB = 2.0  # CUDA context + NCCL communicators and buffers: a stated allowance, not derived


def shapes():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from kd_sweeps.plan import pretrained_shape

    return pretrained_shape("Qwen/Qwen3-4B-Base"), pretrained_shape("Qwen/Qwen3-8B")


def layer_params(shape) -> int:
    """One decoder layer's parameters: attention and MLP matrices, its two norms and the q/k norms."""
    return shape.layer_matmul_params() + 2 * shape.hidden + 2 * shape.head_dim


def per_rank(gpus: int, tokens: int, teacher_sharded: bool, student_master_bytes: int = 4) -> dict[str, float]:
    """Bytes per GPU by component (GB)."""
    from kd_sweeps.plan import parameter_count

    student, teacher = shapes()
    p_s, p_t = parameter_count(student), parameter_count(teacher)
    root_s = student.vocab * student.hidden  # the tied embedding / output layer (the root FSDP unit)
    a = 2  # bf16 activations
    per_token_layer = a * (4 * student.hidden + 3 * student.n_heads * student.head_dim
                           + 3 * student.n_kv_heads * student.head_dim + 4 * student.intermediate)
    rows = {
        # Sharded over the GPUs: the optimizer's view of the student.
        "student master weights (fp32, 1/N)": student_master_bytes * p_s / gpus,
        "student gradients (fp32, 1/N)": student_master_bytes * p_s / gpus,
        "AdamW exp_avg + exp_avg_sq (fp32, 1/N)": 2 * student_master_bytes * p_s / gpus,
        "teacher weights (bf16; a full copy, or 1/N sharded)": 2 * p_t / (gpus if teacher_sharded else 1),
        # Gathered for compute: the root stays gathered from forward to backward; layers two at a time.
        "student gathered bf16: root + 2 layers": 2 * (root_s + 2 * layer_params(student)),
        "teacher gathered bf16 when sharded: 2 layers": 2 * 2 * layer_params(teacher) if teacher_sharded else 0.0,
        # Before the reduce-scatter: bf16 gradient and its fp32 copy, of the root and one layer.
        "student unsharded grads (bf16 + fp32 copy): root + 1 layer": 6 * (root_s + layer_params(student)),
        # Activation checkpointing: each layer keeps its input; one layer is recomputed in backward.
        f"activations: {student.n_layers} layer inputs (bf16)": student.n_layers * tokens * student.hidden * a,
        "activations: one layer recomputed for backward": tokens * per_token_layer,
        "teacher forward, one layer at a time (bf16, no grad)":
            tokens * a * (2 * teacher.intermediate + 4 * teacher.hidden),
        # The chunked loss: the head-weight gradient buffer and one chunk's fp32 logits-sized tensors.
        "chunked loss: (V, H) head-gradient buffer (fp32)": 4 * root_s,
        f"chunked loss: {FKL_LOGIT_TENSORS} x ({CHUNK_ROWS}, V) fp32":
            FKL_LOGIT_TENSORS * 4 * CHUNK_ROWS * student.vocab,
        "chunked loss: hidden states at supervised positions": tokens * (4 * student.hidden + a * teacher.hidden),
        "CUDA context, NCCL buffers (allowance)": CONTEXT_GB * GB,
    }
    return {name: value / GB for name, value in rows.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpus", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--tokens", type=int, default=4096, help="tokens of the micro-batch's sequence")
    parser.add_argument("--gpu-gb", type=float, default=80.0)
    args = parser.parse_args(argv)
    from kd_sweeps.plan import parameter_count

    student, teacher = shapes()
    print(f"student Qwen3-4B-Base {parameter_count(student) / 1e9:.3f}B parameters, teacher Qwen3-8B "
          f"{parameter_count(teacher) / 1e9:.3f}B; {args.tokens} tokens per micro-batch (1 sequence)\n")
    columns = [(g, shard) for g in args.gpus for shard in (False, True)]
    tables = {column: per_rank(column[0], args.tokens, column[1]) for column in columns}
    head = [f"{g} GPUs, teacher {'sharded' if shard else 'replicated'}" for g, shard in columns]
    print("| GB per GPU | " + " | ".join(head) + " |")
    print("|---|" + "---|" * len(columns))
    for name in tables[columns[0]]:  # every column has the same components
        print(f"| {name} | " + " | ".join(f"{tables[c][name]:.2f}" for c in columns) + " |")
    totals = [sum(tables[c].values()) for c in columns]
    print("| **total** | " + " | ".join(f"**{t:.1f}**" for t in totals) + " |")
    print("| headroom on " + f"{args.gpu_gb:.0f} GB | " + " | ".join(f"{args.gpu_gb - t:.1f}" for t in totals) + " |")
    bf16 = [sum(per_rank(g, args.tokens, shard, student_master_bytes=2).values()) for g, shard in columns]
    print("| total with a bf16 student (the old load) | " + " | ".join(f"{t:.1f}" for t in bf16) + " |")


if __name__ == "__main__":
    main()
