"""Memory per GPU for the paper's pair, Qwen3-8B -> Qwen3-4B-Base, with fp32 master weights: worked
out, not measured (no GPU here). Prints the table of docs/performance.md.

    python benchmarks/memory_per_rank.py                   # 4 and 8 GPUs, 4,096-token sequences
    python benchmarks/memory_per_rank.py --gpus 4 --tokens 8192

The numbers are ``kd_sweeps.plan_memory.memory_per_rank``, the function ``python -m kd_sweeps.plan``
uses for every point of more than one process. Parameter counts come from the real configs' shapes
(plan_memory.QWEN3_SHAPES); the rest is arithmetic on the training recipe (train=paper): FSDP2 full
sharding of the student over the GPUs with a bf16-compute / fp32-reduce mixed-precision policy,
AdamW, micro-batch 1, activation checkpointing per decoder layer, the chunked KD loss. Each line
says what it counts; treat the total as +-25 % (allocator fragmentation and NCCL's buffers vary).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from kd_sweeps.plan_memory import RankLayout, memory_per_rank, parameter_count, pretrained_shape  # noqa: E402

GB = 1e9


def shapes():
    return pretrained_shape("Qwen/Qwen3-4B-Base"), pretrained_shape("Qwen/Qwen3-8B")


def per_rank(gpus: int, tokens: int, teacher_sharded: bool, student_master_bytes: int = 4) -> dict[str, float]:
    """GB per GPU by component: ``kd_sweeps.plan_memory.memory_per_rank`` (the plan's own function) for
    train=paper: micro-batch 1 of ``tokens`` tokens, all supervised, bf16 compute, checkpointing,
    the chunked loss."""
    layout = RankLayout(processes=gpus, micro_batch=1, max_len=tokens, max_supervised=tokens, act_bytes=2,
                        teacher_bytes=2, teacher_sharded=teacher_sharded, checkpointing=True, chunked_loss=True,
                        student_master_bytes=student_master_bytes)
    return {name: value / GB for name, value in memory_per_rank(*shapes(), layout).items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpus", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--tokens", type=int, default=4096, help="tokens of the micro-batch's sequence")
    parser.add_argument("--gpu-gb", type=float, default=80.0)
    args = parser.parse_args(argv)
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
