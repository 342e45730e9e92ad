"""Times the README's demo command cold, on the path a CPU without native bf16 takes.

    python benchmarks/bench_demo.py                    # python launch.py -m trunc=0.25,0.5,1.0, cold
    python benchmarks/bench_demo.py --keep /tmp/demo   # keep the sweep folder and the cache there

Cold means a fresh ``KD_SWEEPS_CACHE`` (the embedded teacher and base are prepared again) and a
fresh sweep folder. fp32 is forced (``train.precision=fp32`` and both models' ``prep_precision``):
that is what ``auto`` resolves to without AVX512-BF16/AMX, and a CPU that has them would otherwise
time the bf16 path. Prints the CPU's bf16 flags (from lscpu), the load average before and after
(other processes on the cores make the time longer), the wall time, the one-time preparations'
times, each point's time (start to finish: data, training, evaluation) and its training time, and
the sweep's summary table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMAND = ["launch.py", "-m", "trunc=0.25,0.5,1.0"]
FP32 = ["train.precision=fp32", "model.teacher.prep_precision=fp32", "model.student.prep_precision=fp32"]
BF16_FLAGS = ("avx512_bf16", "amx_bf16", "amx_tile")


def cpu_report() -> dict:
    """Model name, CPU count and which native-bf16 flags lscpu lists (none: bf16 is emulated)."""
    text = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    flags = fields.get("Flags", "").split()
    return {"model": fields.get("Model name", "?").strip(), "cpus": fields.get("CPU(s)", "?").strip(),
            "bf16_flags": [f for f in BF16_FLAGS if f in flags], "avx512f": "avx512f" in flags}


def stage_times(cache: Path, sweep_dir: Path) -> dict:
    """The teacher's and base's preparation times (their prep.json) and each point's times."""
    stages = {}
    for prep in sorted(cache.glob("*/prep.json")):
        info = json.loads(prep.read_text())
        stages[f"prepare {info['role']}"] = {"s": round(info["prep_time_s"], 1), "accuracy": info["accuracy"]}
    for result in sorted(sweep_dir.glob("*/result.json")):
        record = json.loads(result.read_text())
        summary = record.get("summary", {})
        wall = datetime.fromisoformat(record["finished_at"]) - datetime.fromisoformat(record["started_at"])
        stages[f"point trunc={record['config']['trunc']}"] = {
            "point_s": round(wall.total_seconds(), 1), "train_s": round(summary.get("train_time_s", float("nan")), 1),
            "accuracy": summary.get("accuracy")}
    return stages


def run(keep: Path | None) -> dict:
    work = keep or Path(tempfile.mkdtemp(prefix="kd-demo-"))
    cache, sweep_dir = work / "cache", work / "sweep"
    for path in (cache, sweep_dir):
        if path.exists() and any(path.iterdir()):
            raise SystemExit(f"{path} is not empty: a cold run needs a fresh cache and sweep folder")
    command = [sys.executable, *COMMAND, *FP32, f"hydra.sweep.dir={sweep_dir}"]
    load_before = os.getloadavg()
    started = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT, env={**os.environ, "KD_SWEEPS_CACHE": str(cache)},
                          capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    summary = (sweep_dir / "summary.md").read_text() if (sweep_dir / "summary.md").exists() else proc.stderr[-3000:]
    return {"command": " ".join(["python", *COMMAND, *FP32]), "returncode": proc.returncode,
            "wall_s": round(wall, 1), "load_before": [round(x, 2) for x in load_before],
            "load_after": [round(x, 2) for x in os.getloadavg()], "stages": stage_times(cache, sweep_dir),
            "summary": summary, "log_lines": len(proc.stderr.splitlines()) + len(proc.stdout.splitlines())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", type=Path, help="a folder to keep the cache and sweep in (default: a temp dir)")
    args = parser.parse_args()
    cpu = cpu_report()
    print(f"CPU: {cpu['model']}, {cpu['cpus']} CPUs; native bf16 flags: {', '.join(cpu['bf16_flags']) or 'none'} "
          f"(avx512f: {cpu['avx512f']}); the fp32 path is forced either way", flush=True)
    found = run(args.keep)
    print(f"{found['command']}\ncold, exit {found['returncode']}: {found['wall_s']:.0f} s "
          f"({found['wall_s'] / 60:.1f} min); load average before {found['load_before']}, after {found['load_after']}")
    for stage, numbers in found["stages"].items():
        shown = (f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in numbers.items())
        print(f"  {stage}: " + ", ".join(shown))
    print(found.pop("summary"))
    print(json.dumps({"cpu": cpu, **found}))


if __name__ == "__main__":
    main()
