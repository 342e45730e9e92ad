"""Load: a many-point sweep of the tiny default through submitit_local, every point accounted for.

    python benchmarks/load_sweep.py [--points 50] [--batch 10] [--keep DIR]

Runs ``launch.py -m seed=0..N-1 launcher=local`` with cheap settings (embedded models prepared with
a few steps once, in a temporary cache; 2 training steps, 4 eval problems per point), ``--batch``
points at a time (hydra.sweeper.max_batch_size: each point is a process importing torch, and 50 at
once would take ~20 GB), then loads the sweep with the analysis package and checks that every point
has its result.json and that ok + failed = N. Prints the wall time and the counts; exits non-zero
when a point is missing.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHEAP = [
    "model.teacher.prep_steps=8", "model.teacher.prep_examples=256", "model.teacher.prep_eval_problems=8",
    "model.student.prep_steps=4", "model.student.prep_examples=256", "model.student.prep_eval_problems=8",
    "data.n_train=64", "data.n_test=8", "train.max_steps=2", "train.batch_size=8",
    "eval.n_problems=4", "eval.max_new_tokens=48", "train.num_threads=1", "logger=offline",
]


def run_sweep(points: int, batch: int, work: Path) -> tuple[float, subprocess.CompletedProcess]:
    env = {**os.environ, "KD_SWEEPS_CACHE": str(work / "cache"), "WANDB_MODE": "offline",
           "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    args = [sys.executable, str(ROOT / "launch.py"), "-m", f"seed=range(0,{points})", "sweep=load",
            f"hydra.sweep.dir={work / 'sweep'}", "launcher=local", f"hydra.sweeper.max_batch_size={batch}",
            *CHEAP]
    started = time.perf_counter()
    proc = subprocess.run(args, cwd=work, env=env, capture_output=True, text=True)
    return time.perf_counter() - started, proc


def account(sweep_dir: Path, points: int) -> dict:
    from analysis.load import load_results

    frame = load_results(sweep_dir)
    folders = [p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
    counts = frame["status"].value_counts().to_dict() if len(frame) else {}
    return {"points": points, "folders": len(folders), "results": len(frame),
            "ok": counts.get("ok", 0), "failed": counts.get("failed", 0),
            "other": {k: v for k, v in counts.items() if k not in ("ok", "failed")},
            "distinct_seeds": frame["seed"].nunique() if "seed" in frame else None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=50)
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--keep", type=Path, help="run in this folder and keep it")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="kd-load-"))
    work.mkdir(parents=True, exist_ok=True)
    wall, proc = run_sweep(args.points, args.batch, work)
    report = account(work / "sweep", args.points)
    summary_line = next((line for line in proc.stdout.splitlines() if "grid point(s):" in line), "")
    print(f"{args.points} points through submitit_local, {args.batch} at a time: {wall:.0f} s "
          f"(exit {proc.returncode}), {wall / args.points:.1f} s per point")
    print(f"accounted for: {report}")
    print(f"sweep summary: {summary_line}")
    complete = report["results"] == report["folders"] == args.points and \
        report["ok"] + report["failed"] == args.points
    if not complete:
        print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n")
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main())
