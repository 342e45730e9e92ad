"""Helpers several test modules share (fixtures live in conftest.py). Heavy libraries are imported
inside the helpers that need them: a module importing a constant from here stays cheap to collect."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class LoggerCfg:
    """A ``logger`` config node for a Tracker built directly (outside Hydra)."""

    mode: str = "offline"
    project: str = "kd-sweeps-test"
    entity: str | None = None
    tags: list = field(default_factory=list)


def random_embedded_model(tokenizer, layers: int = 2, hidden: int = 64, heads: int = 2, scale: float = 0.15,
                          seed: int = 0):
    """A random embedded-shape Qwen3 whose matrices are drawn at ``scale``: large enough that its
    greedy completions differ in length and content (a near-uniform init emits one token forever)."""
    import torch
    from transformers import Qwen3ForCausalLM

    from kd_sweeps import models

    torch.manual_seed(seed)
    model = Qwen3ForCausalLM._from_config(models.qwen3_config({"layers": layers, "hidden": hidden, "heads": heads},
                                                              tokenizer))
    with torch.no_grad():
        for weight in model.parameters():
            if weight.dim() > 1:
                weight.normal_(0, scale)
    return model


# ---------------------------------------------------------------- sweeps launched as a user does
# A grid point small enough for a CPU test: the embedded models prepared with a handful of steps
# (their accuracy is not the point), 3 training steps, 8 evaluation problems.
FAST = [
    "model.teacher.prep_steps=8", "model.teacher.prep_examples=256", "model.teacher.prep_eval_problems=8",
    "model.student.prep_steps=4", "model.student.prep_examples=256", "model.student.prep_eval_problems=8",
    "data.n_train=64", "data.n_test=8", "train.max_steps=3", "train.batch_size=8",
    "eval.n_problems=8", "eval.max_new_tokens=48", "train.num_threads=1",
    "eval.baselines=[]",  # the references cost two evaluations: tested where asked for (test_baselines.py)
    "logger=disabled",  # W&B files cost ~1 s a run: the tests that read them use FAST_WANDB
]
# The same point with its W&B run written (logger=offline, the default): for tests that read W&B files.
FAST_WANDB = [arg for arg in FAST if not arg.startswith("logger=")]


def launch(args, cwd: Path, cache_dir: Path, check: bool = True) -> subprocess.CompletedProcess:
    """``python launch.py *args`` in ``cwd`` with the embedded models cached in ``cache_dir``, offline."""
    from tests.conftest import ROOT

    env = {**os.environ, "KD_SWEEPS_CACHE": str(cache_dir), "WANDB_MODE": "offline", "WANDB_SILENT": "true",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_DIR": str(cwd)}
    proc = subprocess.run([sys.executable, str(ROOT / "launch.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"launch failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def point_results(sweep_dir: Path) -> list[dict]:
    """Every point's result.json, ordered by trunc; each folder is named by the point's id."""
    results = []
    for path in sweep_dir.glob("*/result.json"):
        result = json.loads(path.read_text())
        assert result["run_id"] in (None, path.parent.name)
        results.append(result)
    return sorted(results, key=lambda r: (r["config"] or {}).get("trunc") or r["overrides"][0])


# ---------------------------------------------------------------- several processes
# A point for torchrun tests: untrained embedded models (prep_steps=0), 3 steps of 4 micro-batches.
E2E = ["model.teacher.prep_steps=0", "model.teacher.prep_examples=64", "model.teacher.prep_eval_problems=4",
       "model.student.prep_steps=0", "model.student.prep_examples=64", "model.student.prep_eval_problems=4",
       "data.n_train=64", "data.n_test=4", "train.max_steps=3", "train.batch_size=8", "train.micro_batch_size=2",
       "train.precision=fp32", "train.checkpoint_every=2", "train.device=cpu", "train.num_threads=1",
       "eval.n_problems=4", "eval.max_new_tokens=16", "eval.baselines=[]"]
# Splitting a step differently only reorders sums: ~1e-7 relative in fp32. AdamW then moves every
# weight by ~lr whatever its gradient's size, so where a gradient is nearly zero that rounding shows
# in the weights up to ~lr times its relative size; exactness of the update is checked in float64.
TOLERANCE = 1e-5


def free_port() -> int:
    """A TCP port nothing listens on now, for a process group's rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def slurm_skip_reason() -> str | None:
    """Why a test that needs the Slurm cluster cannot run here, or None when partition debug has an idle node."""
    import shutil

    if shutil.which("sinfo") is None:
        return "sinfo not on PATH (no Slurm; start one with .ci/slurm/up.sh)"
    import time

    deadline = time.monotonic() + 60  # a node still finishing an earlier test's jobs is busy, not absent
    while True:
        try:
            out = subprocess.run(["sinfo", "-h", "-p", "debug", "-o", "%T"], capture_output=True, text=True,
                                 timeout=5)
        except (subprocess.TimeoutExpired, OSError) as err:
            return f"sinfo did not answer ({err}); start Slurm with .ci/slurm/up.sh"
        states = out.stdout.split()
        if out.returncode == 0 and "idle" in states:
            return None
        if out.returncode != 0 or not {"completing", "mixed", "allocated"} & set(states) \
                or time.monotonic() > deadline:
            return f"no idle node in partition debug ({(out.stdout + out.stderr).strip() or 'no output'})"
        time.sleep(1)


# ---------------------------------------------------------------- tiny models and data
TINY = {"layers": 1, "hidden": 32, "heads": 2}


def tiny_setup(n_sequences: int, attn: str = "eager"):
    """(tokenizer, examples, student, frozen teacher): embedded-task traces, CoT+A at trunc 0.5,
    random 1-layer Qwen3s (the teacher wider)."""
    import torch
    from transformers import Qwen3ForCausalLM

    from kd_sweeps import data, models
    from kd_sweeps.synthetic import make_split
    from kd_sweeps.tokenizer import build_tokenizer

    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    encoded, _ = data.encode(make_split(n_sequences, seed=0), tokenizer, 4096)
    examples, _ = data.training_examples(encoded, ("CoT", "A"), 0.5, "lead", False, 0)
    student = Qwen3ForCausalLM._from_config(models.qwen3_config(TINY, tokenizer), attn_implementation=attn)
    teacher = Qwen3ForCausalLM._from_config(models.qwen3_config({**TINY, "hidden": 48}, tokenizer),
                                            attn_implementation=attn)
    teacher.requires_grad_(False)
    return tokenizer, examples, student, teacher


def tiny_model(tokenizer, seed: int):
    """A random 1-layer Qwen3 in eval mode whose top-k sets are not near-ties."""
    import torch
    from transformers import Qwen3ForCausalLM

    from kd_sweeps.models import qwen3_config

    torch.manual_seed(seed)
    config = qwen3_config(TINY, tokenizer)
    config.initializer_range = 0.2  # peakier than the default 0.02: top-k sets are not near-ties
    return Qwen3ForCausalLM(config).eval()


def encoded_split(tokenizer, n: int, seed: int):
    """``n`` embedded-task sequences, encoded without a length cap."""
    from kd_sweeps.data import encode
    from kd_sweeps.synthetic import make_split

    encoded, _ = encode(make_split(n, seed), tokenizer, max_tokens=10**6)
    return encoded


# ---------------------------------------------------------------- reference divergences
def kl(p, q):
    """KL(p || q) over the last axis; written for strictly positive p, q (random finite logits)."""
    import torch

    return (p * torch.log(p / q)).sum(-1)


def ref_divergence_from_probs(ps, pt, name, beta=0.5, alpha=0.1, mix=0.5):
    """The divergence ``name`` between student ``ps`` and teacher ``pt`` probabilities (..., K) from
    explicit formulas: also usable on bucketed distributions."""
    if name == "forward_kl":
        return kl(pt, ps)
    if name == "reverse_kl":
        return kl(ps, pt)
    if name == "combined_kl":
        return mix * kl(pt, ps) + (1 - mix) * kl(ps, pt)
    if name == "jsd":
        if beta == 0:
            return kl(pt, ps)
        if beta == 1:
            return kl(ps, pt)
        m = (1 - beta) * ps + beta * pt
        return (1 - beta) * kl(ps, m) + beta * kl(pt, m)
    if name == "tvd":
        return 0.5 * (ps - pt).abs().sum(-1)
    if name == "skew_kl":
        return kl(pt, (1 - alpha) * ps + alpha * pt)
    if name == "skew_reverse_kl":
        return kl(ps, (1 - alpha) * pt + alpha * ps)
    raise AssertionError(name)


def point_folders(root: Path, records: list) -> list:
    """One folder per record under ``root``, named by its run id, holding it as result.json: a sweep
    folder as the launches leave it, without running them."""

    folders = []
    for rec in records:
        folder = Path(root) / rec["run_id"]
        folder.mkdir(parents=True)
        (folder / "result.json").write_text(json.dumps(rec))
        folders.append(folder)
    return folders
