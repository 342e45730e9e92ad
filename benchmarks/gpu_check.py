"""KD training on one GPU at realistic width: tokens/s, peak memory and MFU at trunc 1.0 and 0.5.

    python benchmarks/gpu_check.py                          # one H100 (estimated 1-2 minutes)
    python benchmarks/gpu_check.py --loss-impl chunked full # also full (B, T, V) logits, for comparison
    python benchmarks/gpu_check.py --device cpu --tiny      # seconds: checks the script itself

The pair has Qwen3's architecture and RANDOM weights (a GPU box may have no hub access; speed and
memory do not depend on the values), built in code:
  student  Qwen3-4B width: hidden 2560, 32 query / 8 KV heads of 128, MLP 9728, tied head;
  teacher  Qwen3-8B width: hidden 4096, 32 / 8 heads of 128, MLP 12288, untied head;
both with vocabulary 151,936 and 12 of their 36 layers (--layers): 1.60B and 3.56B parameters, so
that the teacher, the student with its gradients and AdamW states (fp32 master weights, as a run
loads the student; --master-weights bf16 for the old pure-bf16 student) and the activations fit one
80 GB GPU. Each step is the project's own
loop (kd_sweeps.train): 8 sequences in 8 micro-batches of one 4096-token sequence, trunc 0.5
keeping the leading 2048 tokens of each; every position after the first is supervised, bf16
autocast. The first --warmup steps are not timed.

MFU = model FLOPs (kd_sweeps.cost: student forward + backward, teacher forward; with the chunked
loss the output layers only on supervised positions) / time / peak. The peak is 989e12, the H100
SXM's dense bf16 tensor-core rate (H100 PCIe: 756e12, H200: 989e12; --peak-flops to change it).
Activation recomputation is not counted (that is the definition of MFU, not HFU).

Memory columns (CUDA allocator): the peak; the peak above the two models' weights (gradients, AdamW
states, activations, logits); and the transient part, the peak above what stays allocated between
steps (weights, optimizer states): what a step's activations and logits add, the part trunc scales.
"""

from __future__ import annotations

import argparse
import time

import torch

from kd_sweeps import train
from kd_sweeps.cost import CostMeter, ModelShape, peak_memory_bytes
from kd_sweeps.data import IGNORE_INDEX, TrainExample
from kd_sweeps.distributed import enable_activation_checkpointing
from kd_sweeps.schema import LossConfig, TrainConfig

H100_BF16_DENSE_FLOPS = 989e12
QWEN3_VOCAB = 151_936
# (hidden, query heads, KV heads, head dim, MLP width, tied head) of the real models.
STUDENT_4B = (2560, 32, 8, 128, 9728, True)
TEACHER_8B = (4096, 32, 8, 128, 12288, False)
TINY = {"student": (64, 4, 2, 16, 128, True), "teacher": (96, 4, 2, 24, 192, False), "vocab": 512,
        "layers": 2, "seq_len": 128, "batch_size": 2, "grad_accum": 1, "steps": 4, "warmup": 1}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="toy sizes (for a CPU smoke run)")
    parser.add_argument("--layers", type=int, default=12, help="layers of each model (the real ones have 36)")
    parser.add_argument("--seq-len", type=int, default=4096, help="tokens per sequence before truncation")
    parser.add_argument("--truncs", type=float, nargs="+", default=[1.0, 0.5])
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per optimizer step")
    parser.add_argument("--grad-accum", type=int, default=8, help="micro-batches per step")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per configuration")
    parser.add_argument("--warmup", type=int, default=3, help="first steps left out of the timing")
    parser.add_argument("--loss-impl", nargs="+", default=["chunked"], choices=["chunked", "full"])
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default=None,
                        help="bf16 autocast (default on GPU) | fp32 (default on CPU: bf16 is emulated)")
    parser.add_argument("--master-weights", choices=["fp32", "bf16"], default="fp32",
                        help="the student's weights and AdamW states: fp32 (what a run does, "
                             "models.load_pair) | bf16 (the old pure-bf16 student, for comparison)")
    parser.add_argument("--peak-flops", type=float, default=H100_BF16_DENSE_FLOPS)
    parser.add_argument("--profile", type=float, default=None, metavar="TRUNC",
                        help="afterwards, profile 2 steps at this trunc (first --loss-impl) and print the "
                             "operators taking the most device time (the table ends with their total)")
    args = parser.parse_args(argv)
    args.precision = args.precision or ("fp32" if args.device == "cpu" else "bf16")
    if args.tiny:
        args.layers, args.seq_len, args.batch_size = TINY["layers"], TINY["seq_len"], TINY["batch_size"]
        args.grad_accum, args.steps, args.warmup = TINY["grad_accum"], TINY["steps"], TINY["warmup"]
    return args


def qwen3(shape: tuple, layers: int, vocab: int, device: torch.device, dtype: torch.dtype):
    """A Qwen3ForCausalLM of the given shape with random weights, built directly on ``device``."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    hidden, heads, kv_heads, head_dim, mlp, tied = shape
    config = Qwen3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                         max_position_embeddings=40_960, rope_theta=1_000_000.0, tie_word_embeddings=tied,
                         pad_token_id=0, bos_token_id=None, eos_token_id=1)
    with torch.device(device):
        return Qwen3ForCausalLM._from_config(config, attn_implementation="sdpa", dtype=dtype)


def random_examples(n: int, seq_len: int, vocab: int, seed: int = 0) -> list[TrainExample]:
    """n sequences of seq_len random ids; every position but the first is a supervised target."""
    g = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(n):
        ids = torch.randint(2, vocab, (seq_len,), generator=g)  # (T,), no pad/eos ids
        labels = ids.clone()
        labels[0] = IGNORE_INDEX  # the first token is never predicted
        examples.append(TrainExample(ids, labels, seq_len - 1))
    return examples


def measure(student, teacher, args, trunc: float, impl: str, device: torch.device) -> dict:
    """Train ``args.steps`` steps at one trunc; returns throughput, memory and MFU of the timed steps."""
    seq_len = max(2, int(round(args.seq_len * trunc)))  # lead truncation: the first trunc of each sequence
    vocab = student.config.vocab_size
    examples = random_examples(4 * args.batch_size, seq_len, vocab)
    meter = CostMeter(ModelShape.from_config(student.config), ModelShape.from_config(teacher.config),
                      head_on_supervised_only=impl == "chunked")
    marks: dict = {}

    def on_step(step: int, metrics: dict, micro_batches: list) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step == args.warmup - 1:
            marks["start"] = time.perf_counter()
        if device.type == "cuda":
            marks["resident"] = torch.cuda.memory_allocated(device)  # weights + optimizer states (+ grads)
        if step >= args.warmup:
            for micro in micro_batches:
                meter.add_step(micro["shape"], micro["lengths"], micro["supervised"])
            marks["end"], marks["loss"] = time.perf_counter(), metrics["loss"]

    settings = TrainConfig(max_steps=args.steps, batch_size=args.batch_size,
                           micro_batch_size=args.batch_size // args.grad_accum,
                           lr=1e-5, warmup_ratio=0.1, precision=args.precision, loss_impl=impl)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    weights = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    train.train_loop(student, teacher, examples, 0, settings, LossConfig(kd_ratio=0.5), device,
                     on_step=on_step, desc=f"trunc={trunc} {impl}")
    seconds = marks["end"] - marks["start"]
    peak = peak_memory_bytes(device)
    return {"loss_impl": impl, "trunc": trunc, "seq_len": seq_len, "timed_steps": args.steps - args.warmup,
            "tokens_per_s": meter.tokens_trained / seconds, "step_s": seconds / (args.steps - args.warmup),
            "peak_memory_gib": peak / 2**30,
            # Above the two models' weights: gradients, optimizer states, activations, logits.
            "step_memory_gib": (peak - weights) / 2**30 if device.type == "cuda" else float("nan"),
            # Above what stays allocated between steps: what a step's activations and logits add.
            "transient_gib": (peak - marks.get("resident", 0)) / 2**30 if device.type == "cuda" else float("nan"),
            "mfu": meter.flops_total / seconds / args.peak_flops, "final_loss": marks["loss"]}


def profile(student, teacher, args, trunc: float, impl: str, device: torch.device) -> None:
    """Two steps under torch.profiler: the top operators by device time (CPU time on CPU), and the wall
    time of the two steps under the profiler."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    seq_len = max(2, int(round(args.seq_len * trunc)))
    examples = random_examples(2 * args.batch_size, seq_len, student.config.vocab_size, seed=1)
    settings = TrainConfig(max_steps=2, batch_size=args.batch_size,
                           micro_batch_size=args.batch_size // args.grad_accum, lr=1e-5,
                           precision=args.precision, loss_impl=impl)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        started = time.perf_counter()
        train.train_loop(student, teacher, examples, 0, settings, LossConfig(kd_ratio=0.5), device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall = time.perf_counter() - started
    events = prof.key_averages()
    sort_key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"profile: {impl}, trunc {trunc} ({seq_len} tokens/seq), 2 steps, {wall:.3f} s wall under the profiler")
    print(events.table(sort_by=sort_key, row_limit=20, max_name_column_width=60))
    student.zero_grad(set_to_none=True)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.warmup < 1 or args.steps <= args.warmup:
        raise SystemExit(f"--steps ({args.steps}) must exceed --warmup ({args.warmup}) >= 1")
    torch.manual_seed(0)
    vocab = TINY["vocab"] if args.tiny else QWEN3_VOCAB
    shapes = (TINY["student"], TINY["teacher"]) if args.tiny else (STUDENT_4B, TEACHER_8B)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    student = qwen3(shapes[0], args.layers, vocab, device, torch.float32 if args.master_weights == "fp32" else dtype)
    teacher = qwen3(shapes[1], args.layers, vocab, device, dtype).requires_grad_(False)
    if args.activation_checkpointing:
        enable_activation_checkpointing(student)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    params = [sum(p.numel() for p in m.parameters()) / 1e9 for m in (student, teacher)]
    print(f"{name}; student {params[0]:.2f}B, teacher {params[1]:.2f}B parameters, {args.layers} layers each; "
          f"{args.batch_size} sequences/step in {args.grad_accum} micro-batches; {args.precision} compute, "
          f"{args.master_weights} student weights; "
          f"MFU against {args.peak_flops:.3g} FLOP/s")
    rows = []
    for impl in args.loss_impl:
        for trunc in args.truncs:
            try:
                rows.append(measure(student, teacher, args, trunc, impl, device))
            except torch.OutOfMemoryError:  # report the case and go on with the next one
                print(f"{impl} trunc={trunc}: out of memory")
            student.zero_grad(set_to_none=True)
    print("| loss | trunc | tokens/seq | tokens/s | s/step | peak memory (GiB) | above weights (GiB) "
          "| transient (GiB) | MFU | final loss |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['loss_impl']} | {r['trunc']} | {r['seq_len']} | {r['tokens_per_s']:,.0f} | {r['step_s']:.3f} "
              f"| {r['peak_memory_gib']:.1f} | {r['step_memory_gib']:.2f} | {r['transient_gib']:.2f} "
              f"| {r['mfu']:.1%} | {r['final_loss']:.3f} |")
    if args.profile is not None:
        try:
            profile(student, teacher, args, args.profile, args.loss_impl[0], device)
        except Exception as err:  # the table above is the result; a profiler problem must not hide it
            print(f"profile failed: {type(err).__name__}: {err}")
    return rows


if __name__ == "__main__":
    main()
