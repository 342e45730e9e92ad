"""Does a point fit its launcher? Memory per process against the device's, time against the job's
limit with the requeues the launcher allows, and the GPU-hours it holds.

Training time = training FLOPs / (processes x sustained FLOP/s per GPU). The default rate is an
assumption, not a measurement: 40 % of an H100's dense bf16 peak (989 TFLOP/s), a typical model
FLOPs utilisation of FSDP training at this scale; pass a measured one (``--train-flops-per-s``).
A Slurm point that reaches its time limit is requeued (``hydra.launcher.max_num_timeout`` times)
and resumes from the state it saved on the warning signal, so a run longer than one limit still
finishes with ``ceil(time / limit) - 1`` requeues: "fits with K requeues", not a failure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kd_sweeps.plan_eval import duration

H100_DENSE_BF16_FLOPS = 989e12  # NVIDIA's H100 SXM dense bf16 peak, FLOP/s
DEFAULT_MFU = 0.4  # sustained share of the peak assumed for training
DEFAULT_TRAIN_FLOPS_PER_S = DEFAULT_MFU * H100_DENSE_BF16_FLOPS  # per GPU
DEFAULT_GPU_MEMORY_GIB = 80.0  # an H100 80 GB
# The evaluation job (eval.separate_job) is submitted by kd_sweeps/eval_job.py without a
# max_num_timeout, so submitit's Slurm default applies: 3 requeues, resuming per problem.
EVAL_JOB_REQUEUES = 3
GIB = 2**30


@dataclass(frozen=True)
class Hardware:
    """What the plan assumes about the machines (printed with the plan)."""

    gpu_memory_gib: float = DEFAULT_GPU_MEMORY_GIB
    train_flops_per_s: float = DEFAULT_TRAIN_FLOPS_PER_S  # sustained, per GPU

    def describe(self) -> str:
        rate = f"{self.train_flops_per_s / 1e12:.0f} TFLOP/s per GPU (--train-flops-per-s"
        if self.train_flops_per_s == DEFAULT_TRAIN_FLOPS_PER_S:
            rate += f"; default: {DEFAULT_MFU:.0%} of an H100's {H100_DENSE_BF16_FLOPS / 1e12:.0f} TFLOP/s dense bf16"
        memory = f"{self.gpu_memory_gib:g} GiB per GPU (--gpu-memory-gib"
        if self.gpu_memory_gib == DEFAULT_GPU_MEMORY_GIB:
            memory += "; default: an H100 80 GB"
        return (f"fit: GPU memory {memory}); CPU jobs (no GPU in the launcher) against hydra.launcher.mem_gb / "
                f"tasks_per_node\n     training time = FLOPs / (processes x {rate}))")


@dataclass
class Fit:
    train_seconds: float
    eval_seconds: float
    train_gpu_hours: float  # processes x training hours
    eval_gpu_hours: float  # the evaluation's GPUs x its hours
    verdict: str
    fits: bool


def attempts_verdict(seconds: float, limit_min: float | None, requeues: int, what: str) -> tuple[bool, str, int]:
    """(fits, message, requeues used) for ``seconds`` of work in jobs of ``limit_min`` minutes."""
    if limit_min is None or seconds <= 60.0 * limit_min:
        return True, "", 0
    limit_s = 60.0 * limit_min
    needed = math.ceil(seconds / limit_s) - 1
    if needed <= requeues:
        return True, f"{needed} requeue{'s' if needed > 1 else ''} ({what})", needed
    return False, f"no: {what} ~{duration(seconds)} > {duration(limit_s)} limit (requeues: {requeues})", needed


def fit(memory_bytes: int, memory_limit_gib: float, memory_kind: str, train_flops: float, eval_seconds: float,
        processes: int, hardware: Hardware, launcher, eval_cfg) -> Fit:
    """The verdict of one point: memory first, then training (and evaluation) time."""
    train_s = train_flops / (processes * hardware.train_flops_per_s)
    eval_gpus = (eval_cfg.job.gpus_per_node or 1) if eval_cfg.separate_job else processes
    result = Fit(train_s, eval_seconds, processes * train_s / 3600, eval_gpus * eval_seconds / 3600, "fits", True)
    if memory_bytes > memory_limit_gib * GIB:
        result.verdict = (f"no: memory {memory_bytes / GIB:.3g} GiB/rank > {memory_limit_gib:g} GiB"
                          f"{'' if memory_kind == 'GPU' else ' ' + memory_kind}")
        result.fits = False
        return result
    if eval_cfg.separate_job:
        eval_requeues = EVAL_JOB_REQUEUES if launcher.kind == "slurm" else 0
        checks = [attempts_verdict(train_s, launcher.timeout_min, launcher.requeues, "train"),
                  attempts_verdict(eval_seconds, eval_cfg.job.timeout_min, eval_requeues, "eval")]
    else:
        checks = [attempts_verdict(train_s + eval_seconds, launcher.timeout_min, launcher.requeues, "train+eval")]
    failed = [message for ok, message, _ in checks if not ok]
    if failed:
        result.verdict, result.fits = "; ".join(failed), False
    elif any(used for _, _, used in checks):
        result.verdict = "fits with " + ", ".join(message for _, message, used in checks if used)
    return result


def memory_limit(launcher, hardware: Hardware) -> tuple[float, str]:
    """(GiB one process may hold, what it is): the GPU's, or for a CPU job its share of the node's."""
    if launcher.kind != "basic" and not launcher.gpus_per_node and launcher.mem_gb:
        return launcher.mem_gb / max(1, launcher.processes // max(1, launcher.nodes)), "host (hydra.launcher.mem_gb)"
    return hardware.gpu_memory_gib, "GPU"
