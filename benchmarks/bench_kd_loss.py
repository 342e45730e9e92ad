"""Output layer + KD/CE loss, forward and backward: full-vocabulary logits vs the chunked loss.

    python benchmarks/bench_kd_loss.py --seq-lens 1024 4096            # CPU, hidden size 256
    python benchmarks/bench_kd_loss.py --device cuda --hidden 2048 --teacher-hidden 4096 --dtype bfloat16

Batch 1, every position supervised, Qwen3's vocabulary (151,936) by default. Each (path, T) case runs
in its own process, so one case's freed memory cannot hide or inflate the next one's peak, and on CPU
under an address-space limit (--memory-budget-gib), so a case that does not fit is reported as such
instead of pushing the machine into swap or the OOM killer. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import time

import torch
import torch.nn.functional as F


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--vocab", type=int, default=151_936, help="Qwen3's vocabulary size")
    parser.add_argument("--hidden", type=int, default=256, help="student hidden size (small to fit a CPU)")
    parser.add_argument("--teacher-hidden", type=int, default=None, help="default: same as --hidden")
    parser.add_argument("--chunk-size", type=int, default=256, help="chunked_kd_ce's default")
    parser.add_argument("--loss", default="forward_kl")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--kd-ratio", type=float, default=0.5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--topk", type=int, default=None, metavar="K",
                        help="the chunked path reads a top-K teacher (as from the teacher cache) instead of "
                             "the teacher's hidden states; the full path keeps the dense teacher")
    parser.add_argument("--check-grads", type=int, default=None, metavar="T",
                        help="only compare losses and gradients at length T against the full path in fp32")
    parser.add_argument("--memory-budget-gib", type=float, default=16.0,
                        help="CPU only: address space a case may add beyond its inputs")
    return parser.parse_args(argv)


def _inputs(args, seq_len: int):
    """Student/teacher final hidden states (1, T, H), heads (V, H), labels (1, T), all supervised."""
    g = torch.Generator().manual_seed(0)
    dtype, device = getattr(torch, args.dtype), torch.device(args.device)
    teacher_hidden_size = args.teacher_hidden or args.hidden

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g)).to(device=device, dtype=dtype)

    # Head weights ~ 1/sqrt(H) so logits have unit scale, as in a trained model.
    inputs = dict(
        hidden=randn(1, seq_len, args.hidden).requires_grad_(True),
        weight=randn(args.vocab, args.hidden, scale=args.hidden ** -0.5).requires_grad_(True),
        teacher_hidden=randn(1, seq_len, teacher_hidden_size),
        teacher_weight=randn(args.vocab, teacher_hidden_size, scale=teacher_hidden_size ** -0.5),
        labels=torch.randint(0, args.vocab, (1, seq_len), generator=g).to(device),
    )
    if args.topk:  # what the teacher cache stores for these rows: top-k log-probs and their ids
        with torch.no_grad():
            log_probs = F.log_softmax(F.linear(inputs["teacher_hidden"][0, :-1], inputs["teacher_weight"]).float()
                                      / args.temperature, dim=-1)  # (T-1, V)
            values, ids = log_probs.topk(args.topk, dim=-1)
        inputs["teacher_topk"] = (values.half(), ids.int())
        del log_probs
    return inputs


def full_step(args, hidden, weight, teacher_hidden, teacher_weight, labels, teacher_topk=None) -> float:
    """Today's path: (1, T, V) logits for both models, then losses.kd_loss + ce_loss."""
    from kd_sweeps.losses import ce_loss, kd_loss, total_loss

    logits = F.linear(hidden, weight)[:, :-1]  # (1, T-1, V)
    with torch.no_grad():
        teacher_logits = F.linear(teacher_hidden, teacher_weight)[:, :-1]  # (1, T-1, V)
    targets = labels[:, 1:]
    mask = targets != -100
    ce = ce_loss(logits, targets, mask)
    kd = kd_loss(logits, teacher_logits, mask, args.loss, args.temperature)
    total = total_loss(ce, kd, args.kd_ratio)
    total.backward()
    return total.item()


def chunked_step(args, hidden, weight, teacher_hidden, teacher_weight, labels, teacher_topk=None) -> float:
    """The chunked path: only supervised rows through the heads, chunk_size rows at a time."""
    from kd_sweeps.chunked_loss import chunked_kd_ce, supervised_positions

    rows, targets = supervised_positions(labels)
    dense = teacher_topk is None
    total, _, _, _ = chunked_kd_ce(
        hidden.flatten(0, 1)[rows], teacher_hidden.flatten(0, 1)[rows] if dense else None, weight,
        teacher_weight if dense else None, targets, name=args.loss, kd_ratio=args.kd_ratio,
        temperature=args.temperature, chunk_size=args.chunk_size, teacher_topk=teacher_topk)
    total.backward()
    return total.item()


STEPS = {"full": full_step, "chunked": chunked_step}


def _limit_address_space(budget_gib: float) -> None:
    """Allow this process budget_gib of address space beyond what it maps now (CPU cases)."""
    with open("/proc/self/status") as handle:
        mapped_kib = next(int(line.split()[1]) for line in handle if line.startswith("VmSize:"))
    limit = mapped_kib * 1024 + int(budget_gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))


def run_case(args, path: str, seq_len: int, results) -> None:
    """Child process: warm up, then time ``reps`` steps, each under a peak-memory probe."""
    from kd_sweeps.memory import PeakMemory

    device = torch.device(args.device)
    inputs = _inputs(args, seq_len)
    if device.type == "cpu":
        _limit_address_space(args.memory_budget_gib)
    step = STEPS[path]
    times, peaks, value = [], [], float("nan")
    try:
        for rep in range(args.warmup + args.reps):
            inputs["hidden"].grad = inputs["weight"].grad = None  # each step allocates its gradients
            with PeakMemory(device) as probe:
                started = time.perf_counter()
                value = step(args, **inputs)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                seconds = time.perf_counter() - started
            if rep >= args.warmup:
                times.append(seconds)
                peaks.append(probe.peak_bytes)
    except (MemoryError, RuntimeError) as err:  # CPU allocator failures and CUDA OOM are RuntimeErrors
        if "memory" not in str(err).lower():
            raise
        results.put(dict(path=path, seq_len=seq_len, error="out of memory"))
        return
    results.put(dict(path=path, seq_len=seq_len, ms=1e3 * statistics.median(times), peak=max(peaks),
                     loss=value))


def check_case(args, path: str, seq_len: int, results) -> None:
    """Child process: loss and gradients of the full path, the chunked path with its fp32-output GEMM
    and the chunked path with the product in the input dtype, against the full path in fp32."""
    from kd_sweeps import chunked_loss

    inputs = _inputs(args, seq_len)
    reference = {k: v.detach().float().requires_grad_(v.requires_grad) if v.is_floating_point() else v
                 for k, v in inputs.items()}

    def run(step, values):
        values["hidden"].grad = values["weight"].grad = None
        loss = step(args, **values)
        return loss, values["hidden"].grad.float(), values["weight"].grad.float()

    want = run(full_step, reference)
    rows = []
    for name, step, fp32_out in (("full", full_step, None), ("chunked, fp32-output GEMM", chunked_step, True),
                                 ("chunked, product in input dtype", chunked_step, False)):
        chunked_loss.FP32_OUT_MATMUL = bool(fp32_out)
        got = run(step, inputs)
        errors = [abs(got[0] - want[0]) / abs(want[0])] + [float((g - w).norm() / w.norm())
                                                          for g, w in zip(got[1:], want[1:])]
        used = "" if fp32_out is None else f" (GEMM used: {chunked_loss.FP32_OUT_MATMUL and inputs['hidden'].is_cuda})"
        rows.append((name + used, *errors))
    results.put(dict(rows=rows))


def measure(args, path: str, seq_len: int, target=None) -> dict:
    context = mp.get_context("spawn")
    results = context.Queue()
    child = context.Process(target=target or run_case, args=(args, path, seq_len, results))
    child.start()
    child.join()
    if not results.empty():
        return results.get()
    return dict(path=path, seq_len=seq_len, error=f"process exited with code {child.exitcode}")


def _cell(result: dict, key: str, scale: float = 1.0) -> str:
    if "error" not in result:
        return f"{result[key] / scale:,.0f}"
    if key in result:  # an estimate for a case that did not run
        return f"{result['error']} (est. ~{result[key] / scale:,.0f})"
    return result["error"]


def _ratio(chunked: dict, full: dict, key: str) -> str:
    if "error" in chunked or key not in full:
        return "n/a"
    ratio = f"{chunked[key] / full[key]:.3f}"
    return ratio if "error" not in full else f"~{ratio} (est.)"


def _estimate_full_peaks(rows) -> None:
    """Where the full path ran out of memory, estimate its peak from the largest T that fit.

    Everything it allocates is (T - 1) x V per tensor (the loss sees T - 1 shifted positions), so its
    peak per supervised row is constant; the estimate is labelled as one in the table.
    """
    measured = [(seq_len, full["peak"]) for seq_len, full, _ in rows if "error" not in full]
    if not measured:
        return
    seq_len, peak = max(measured)
    for other_len, full, _ in rows:
        if "error" in full and other_len > seq_len:
            full["peak"] = peak / (seq_len - 1) * (other_len - 1)


def main(argv=None) -> None:
    args = parse_args(argv)
    budget = f", CPU budget {args.memory_budget_gib:g} GiB per case" if args.device == "cpu" else ""
    print(f"V={args.vocab:,} H={args.hidden} Ht={args.teacher_hidden or args.hidden} chunk={args.chunk_size} "
          f"loss={args.loss} dtype={args.dtype} device={args.device} threads={torch.get_num_threads()} "
          f"median of {args.reps} reps after {args.warmup} warm-up{budget}\n", flush=True)
    if args.check_grads:
        result = measure(args, "check", args.check_grads, check_case)
        print(f"T={args.check_grads}: relative error against the full path in fp32 (same inputs)\n")
        print("| path | loss | d hidden | d head weight |\n|---|---|---|---|")
        for name, *errors in result.get("rows", []):
            print(f"| {name} | " + " | ".join(f"{e:.2e}" for e in errors) + " |")
        if "error" in result:
            print(result["error"])
        return
    rows = []
    for seq_len in args.seq_lens:
        full, chunked = measure(args, "full", seq_len), measure(args, "chunked", seq_len)
        if "error" not in full and "error" not in chunked:
            drift = abs(full["loss"] - chunked["loss"]) / max(abs(full["loss"]), 1e-12)
            # bf16 logits round differently when computed in chunks; fp32 agrees far more closely.
            if not args.topk and drift > (1e-3 if args.dtype == "float32" else 2e-2):
                print(f"WARNING T={seq_len}: losses differ by {drift:.2e} relative "
                      f"({full['loss']} vs {chunked['loss']})", flush=True)
            chunked["drift"] = drift
        rows.append((seq_len, full, chunked))
    _estimate_full_peaks(rows)
    mib = 2**20
    print("| T | full ms/step | chunked ms/step | time chunked/full | full peak MiB | chunked peak MiB "
          "| memory chunked/full | loss difference (rel.) |")
    print("|---|---|---|---|---|---|---|---|")
    for seq_len, full, chunked in rows:
        print(f"| {seq_len} | {_cell(full, 'ms')} | {_cell(chunked, 'ms')} | {_ratio(chunked, full, 'ms')} "
              f"| {_cell(full, 'peak', mib)} | {_cell(chunked, 'peak', mib)} | {_ratio(chunked, full, 'peak')} "
              f"| {chunked.get('drift', float('nan')):.1e} |")


if __name__ == "__main__":
    main()
