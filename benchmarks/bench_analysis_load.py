"""How long loading and joining 1,000 runs takes, per source.

    python benchmarks/bench_analysis_load.py [--runs 1000] [--real 50] [--keep DIR]

Writes, in a temporary folder:

* ``results/``: one ``result.json`` per run, shaped and formatted as the trainer
  writes them, plus the sweep's ``multirun.yaml`` (a 1,000-point grid);
* ``wandb/``: offline W&B runs. ``--real`` of them are written by wandb itself
  in a child process (slow: about a second each); the rest are copies of those
  whose run record is rewritten (run id, trunc, sections, seed) and whose log is
  re-chunked and re-checksummed, so every run has its own id and grid point;

then times ``load()`` on each, the online join (``load_online`` over an
in-memory fake of ``wandb.Api``, so without network time), and the grid check.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TRUNCS = [round(0.1 * i, 1) for i in range(1, 11)]  # 10 values
SECTIONS = ["all", "prompt_cot", "cot", "cot_ans", "ans"]  # x 5 presets
SEEDS = list(range(20))  # x 20 seeds = 1,000 points
INCLUDE = {"all": ["P", "CoT", "A"], "prompt_cot": ["P", "CoT"], "cot": ["CoT"],
           "cot_ans": ["CoT", "A"], "ans": ["A"]}


def grid(n: int) -> list[tuple[float, str, int]]:
    return [(t, s, seed) for t in TRUNCS for s in SECTIONS for seed in SEEDS][:n]


def make_record(i: int, trunc: float, sections: str, seed: int) -> dict:
    """A result.json record as the trainer writes it: full resolved config, summary."""
    config = {
        "trunc": trunc, "seed": seed, "sweep": "bench", "cache_dir": "~/.cache/kd-sweeps",
        "truncation": {"mode": "lead", "cut_after_think": False},
        "sections": {"name": sections, "include": INCLUDE[sections]},
        "loss": {"name": "forward_kl", "kd_ratio": 0.5, "temperature": 1.0, "beta": 0.5,
                 "alpha": 0.1, "mix": 0.5},
        "model": {"name": "tiny", "attn_implementation": "sdpa", "trust_remote_code": False,
                  **{role: {"name_or_path": f"embedded-{role}", "source": "embedded",
                            "layers": 3, "hidden": 128, "heads": 4, "prep_steps": 600,
                            "prep_lr": 3e-3, "prep_batch_size": 32, "prep_examples": 20000,
                            "prep_min_steps": 2, "prep_max_steps": 12}
                     for role in ("teacher", "student")}},
        "data": {"name": "synthetic", "source": "synthetic", "path": "", "n_train": 4000,
                 "n_test": 200, "min_steps": 2, "max_steps": 12, "max_tokens": 4096,
                 "seed": 42},
        "train": {"max_steps": 300, "batch_size": 32, "grad_accum": 1, "lr": 1e-3,
                  "weight_decay": 0.0, "warmup_ratio": 0.05, "grad_clip": 1.0,
                  "precision": "fp32", "log_every": 10, "device": "auto", "num_threads": 0},
        "eval": {"benchmarks": ["synthetic", "math500"], "n_problems": 200, "batch_size": 100,
                 "max_new_tokens": 256, "n_samples": 1, "temperature": 0.0, "top_p": 1.0},
        "logger": {"mode": "offline", "project": "kd-sweeps", "entity": None, "tags": []},
        "output_dir": f"multirun/bench/{i}", "extra": {},
    }
    acc = 0.3 + 0.4 * trunc + 0.001 * seed
    summary = {"accuracy": acc, "accuracy_stderr": 0.03, "train_flops": 1e13 * trunc,
               "train_flops_student": 4e12 * trunc, "train_flops_teacher": 6e12 * trunc,
               "train_time_s": 300 * trunc, "peak_memory_bytes": int(4e8 * (1 + trunc)),
               "tokens_trained": int(1.2e6 * trunc), "tokens_supervised": int(1e6 * trunc),
               "tokens_padded": 20000, "padding_ratio": 0.016, "examples_skipped": 0,
               "final_loss": 0.4, "final_ce_loss": 0.5, "final_kd_loss": 0.3,
               "teacher_accuracy": 0.9, "base_accuracy": 0.1}
    for bench in ("synthetic", "math500"):
        summary.update({f"eval/{bench}/accuracy": acc, f"eval/{bench}/stderr": 0.03,
                        f"eval/{bench}/n": 200, f"eval/{bench}/generated_tokens": 30000})
    return {"run_id": f"run{i:05d}", "sweep": "bench", "status": "ok", "error": None,
            "overrides": [f"trunc={trunc}", f"sections={sections}", f"seed={seed}",
                          "sweep=bench"],
            "config": config, "summary": summary,
            "started_at": "2026-11-27T17:00:00+00:00", "finished_at": "2026-11-27T17:05:00+00:00"}


def write_results(root: Path, n: int) -> None:
    for i, point in enumerate(grid(n)):
        job = root / str(i)
        job.mkdir(parents=True)
        # As the trainer formats it (indent, sorted keys), so the bytes read are realistic.
        (job / "result.json").write_text(json.dumps(make_record(i, *point), indent=2,
                                                    sort_keys=True))
    task = [f"trunc={','.join(map(str, TRUNCS))}", f"sections={','.join(SECTIONS)}",
            f"seed={','.join(map(str, SEEDS))}", "sweep=bench"]
    multirun = {"hydra": {"sweeper": {"params": None},
                          "overrides": {"hydra": ["hydra.mode=MULTIRUN"], "task": task}},
                "sweep": "bench"}
    (root / "multirun.yaml").write_text(json.dumps(multirun))  # JSON is valid YAML


# Runs in a child interpreter so wandb's service and globals stay out of the timing.
WANDB_WRITER = textwrap.dedent(
    """
    import json, sys
    import wandb

    root, records = sys.argv[1], json.loads(sys.argv[2])
    for rec in records:
        run = wandb.init(mode="offline", dir=root + "/" + rec["run_id"], id=rec["run_id"],
                         group=rec["sweep"], project="kd-sweeps", job_type="train",
                         config=rec["config"], settings=wandb.Settings(console="off"))
        for step in range(0, 300, 10):  # the trainer logs every log_every=10 steps
            run.log({"train/loss": 1.0 / (step + 1), "train/kd_loss": 0.5,
                     "train/ce_loss": 0.5, "train/lr": 1e-3}, step=step)
        run.summary.update(rec["summary"])
        run.finish()
    """
)


def write_real_wandb(root: Path, records: list[dict]) -> None:
    home = root / ".wandb-home"
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true",
               WANDB_CONFIG_DIR=str(home / "config"), WANDB_CACHE_DIR=str(home / "cache"),
               WANDB_DATA_DIR=str(home / "data"))
    subprocess.run([sys.executable, "-c", WANDB_WRITER, str(root), json.dumps(records)],
                   env=env, check=True, timeout=1800)
    shutil.rmtree(home, ignore_errors=True)


_HEADER = struct.pack("<4sHB", b":W&B", 0xBEE1, 0)
_BLOCK, _FULL, _FIRST, _MIDDLE, _LAST = 32 * 1024, 1, 2, 3, 4


def write_log(path: Path, payloads: list[bytes]) -> None:
    """The inverse of analysis.wandb_offline's reader: records cut into chunks of
    32 KiB blocks, each with a (crc, length, type) header; short block tails zeroed."""
    out = bytearray(_HEADER)
    for data in payloads:
        first = True
        while True:
            room = _BLOCK - len(out) % _BLOCK
            if room < 7:
                out += bytes(room)
                continue
            piece, data = data[:room - 7], data[room - 7:]
            kind = (_FULL if not data else _FIRST) if first else (_LAST if not data else _MIDDLE)
            crc = zlib.crc32(piece, zlib.crc32(bytes([kind])))
            out += struct.pack("<IHB", crc, len(piece), kind) + piece
            first = False
            if not data:
                break
    path.write_bytes(bytes(out))


def copy_run(log: Path, dest_root: Path, record: dict) -> None:
    """Copy a real run's log as the run of another grid point (new id and config values)."""
    from analysis.wandb_offline import iter_records

    run_id = record["run_id"]
    changes = {key: record["config"][key] for key in ("trunc", "seed", "sections", "output_dir")}
    payloads = []
    for rec in iter_records(log):
        if rec.WhichOneof("record_type") == "run":
            rec.run.run_id = rec.run.display_name = run_id
            for item in rec.run.config.update:
                if item.key in changes:
                    item.value_json = json.dumps(changes[item.key])
        payloads.append(rec.SerializeToString())
    run_dir = dest_root / run_id / "wandb" / f"offline-run-20261127_170000-{run_id}"
    run_dir.mkdir(parents=True)
    write_log(run_dir / f"run-{run_id}.wandb", payloads)


def timed(fn, repeats: int = 3) -> tuple[float, object]:
    """Median wall time of fn() over repeats, and its last result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2], result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--real", type=int, default=50, help="runs written by wandb itself")
    parser.add_argument("--keep", type=Path, help="write here and keep (default: temp dir)")
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="bench-analysis-"))
    from analysis.grid import grid_status
    from analysis.load import load
    from analysis.online import load_online
    from analysis.wandb_offline import find_runs
    from tests.analysis_records import FakeApi, FakeRun

    records = [make_record(i, *point) for i, point in enumerate(grid(args.runs))]
    start = time.perf_counter()
    write_results(root / "results", args.runs)
    print(f"wrote {args.runs} result.json in {time.perf_counter() - start:.1f} s")
    start = time.perf_counter()
    write_real_wandb(root / "real", records[:args.real])
    print(f"wandb wrote {args.real} offline runs in {time.perf_counter() - start:.1f} s")
    real_logs = find_runs(root / "real")
    for i, record in enumerate(records):
        copy_run(real_logs[i % len(real_logs)], root / "wandb", record)

    results_s, from_json = timed(lambda: load(root / "results"))
    wandb_s, from_wandb = timed(lambda: load(root / "wandb"))
    api = FakeApi([FakeRun(record) for record in records])
    online_s, from_api = timed(lambda: load_online("bench/kd", group="bench", api=api))
    grid_s, status = timed(lambda: grid_status(from_json, root / "results"))
    assert len(from_json) == len(from_wandb) == len(from_api) == args.runs
    assert from_wandb["run_id"].nunique() == args.runs, "copies must have their own ids"
    assert (status["status"] == "ok").sum() == args.runs, status["status"].value_counts()
    log_mib = sum(p.stat().st_size for p in find_runs(root / "wandb")) / 2**20
    print(f"{os.cpu_count()} CPUs; {args.runs} runs; median of 3 (s):")
    print(f"  result.json files          {results_s:6.2f}")
    print(f"  offline W&B runs           {wandb_s:6.2f}   ({log_mib:.1f} MiB of logs)")
    print(f"  online join, fake API      {online_s:6.2f}   (no network time)")
    print(f"  grid check ({len(status)} points)   {grid_s:6.2f}")
    if args.keep is None:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
