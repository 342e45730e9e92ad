"""Training-step cost at trunc 0.5 vs 1.0 on the same sequences: time, peak memory, FLOPs.

    python benchmarks/bench_trunc_step.py                 # the embedded default's shapes, CPU
    python benchmarks/bench_trunc_step.py --hidden 512 --layers 4 --device cuda

Each ratio runs in its own process (a fresh peak-memory baseline); the student and teacher are the
embedded Qwen3 shapes with random weights (speed does not depend on what they know).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time


def measure(args) -> dict:
    import torch
    from transformers import Qwen3ForCausalLM

    from kd_sweeps import data, models, train
    from kd_sweeps.cost import CostMeter, ModelShape
    from kd_sweeps.memory import PeakMemory
    from kd_sweeps.schema import LossConfig, TrainConfig
    from kd_sweeps.synthetic import make_split
    from kd_sweeps.tokenizer import build_tokenizer

    torch.manual_seed(0)
    device = torch.device(args.device)
    tokenizer = build_tokenizer()
    encoded, _ = data.encode(make_split(args.sequences, seed=0), tokenizer, 4096)
    examples, _ = data.training_examples(encoded, ("P", "CoT", "A"), args.trunc, "lead", False, 0)
    spec = {"layers": args.layers, "hidden": args.hidden, "heads": max(1, args.hidden // 32)}
    student = Qwen3ForCausalLM._from_config(models.qwen3_config(spec, tokenizer)).to(device)
    teacher_spec = {**spec, "layers": spec["layers"] + 1, "hidden": int(spec["hidden"] * 1.5) // 32 * 32}
    teacher = Qwen3ForCausalLM._from_config(models.qwen3_config(teacher_spec, tokenizer)).to(device)
    teacher.requires_grad_(False)
    meter = CostMeter(ModelShape.from_config(student.config), ModelShape.from_config(teacher.config), True)
    times = []

    def on_step(step, metrics, micro_batches):
        times.append(time.perf_counter())
        for micro in micro_batches:
            meter.add_step(micro["shape"], micro["lengths"], micro["supervised"])

    settings = TrainConfig(max_steps=args.steps, batch_size=args.batch_size, lr=1e-3,
                           precision=args.precision)
    with PeakMemory(device) as memory:
        start = time.perf_counter()
        train.train_loop(student, teacher, examples, tokenizer.pad_token_id, settings, LossConfig(),
                         device, on_step)
    step_times = [b - a for a, b in zip([start] + times[:-1], times)][args.warmup:]
    return {"trunc": args.trunc, "ms_per_step": 1000 * statistics.median(step_times),
            "peak_memory_mib": memory.peak_bytes / 2**20, "flops_per_step": meter.flops_total / args.steps,
            "tokens_per_step": meter.tokens_trained / args.steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trunc", type=float, default=None, help="measure one ratio (internal)")
    parser.add_argument("--ratios", type=float, nargs="+", default=[1.0, 0.5])
    parser.add_argument("--hidden", type=int, default=96)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--sequences", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.trunc is not None:
        print(json.dumps(measure(args)))
        return
    rows = []
    for ratio in args.ratios:
        cmd = [sys.executable, __file__, "--trunc", str(ratio)] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("trunc", "ratios")]
        rows.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1]))
    base = rows[0]
    print("| trunc | ms/step | peak MiB | GFLOPs/step | tokens/step | time ratio | memory ratio | FLOPs ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['trunc']} | {row['ms_per_step']:.1f} | {row['peak_memory_mib']:.1f} | "
              f"{row['flops_per_step'] / 1e9:.2f} | {row['tokens_per_step']:.0f} | "
              f"{row['ms_per_step'] / base['ms_per_step']:.3f} | "
              f"{row['peak_memory_mib'] / base['peak_memory_mib']:.3f} | "
              f"{row['flops_per_step'] / base['flops_per_step']:.3f} |")


if __name__ == "__main__":
    main()
