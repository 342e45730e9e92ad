"""Is the embedded demo a miniature of the paper's regime? Measures, on the fp32 path (a CPU without
native bf16), before any truncated point is run:

1. token shares of P / CoT / A over the KD training set (the student's tokenizer, chat-templated
   sequences, spans where ``data.encode``/``sections.find_spans`` put them: template tokens
   included) and the spread of sequence lengths, with a text histogram;
2. the teacher and the base student on the held-out problems: accuracy, per problem length, and
   the rate of completions that end with an answer (a ``\\boxed{}`` answer, then the end of the
   turn before ``eval.max_new_tokens``), each prepared cold in a fresh cache and timed;
3. KD at trunc = 1.0 (``launch.py trunc=1.0``, reusing that cache): its accuracy, the share of
   the base-to-teacher gap it closes, and how far it moved the base's weights (relative L2).

    python benchmarks/regime.py                       # all three (2-3 minutes on 2 quiet cores, 5 on busy ones)
    python benchmarks/regime.py --shares-only         # 1 only (seconds)
    python benchmarks/regime.py --keep /tmp/regime    # keep the cache and outputs (a rerun reuses the models)
    python benchmarks/regime.py model.teacher.prep_steps=600 train.lr=3e-4   # any launch.py override

Prints one JSON line at the end (``--json`` also writes it to a file). Targets (issue 14): prompt
<= 10 %, CoT >= 75 %, answer <= 15 %, lengths spanning >= 3x; base finishes >= 90 %; KD at
trunc = 1.0 closes >= 50 % of the gap.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The path a CPU without native bf16 takes (precision=auto resolves to fp32 there): forced, so a
# machine with AVX512-BF16/AMX measures the same thing.
FP32 = ["train.precision=fp32", "model.teacher.prep_precision=fp32", "model.student.prep_precision=fp32"]


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from kd_sweeps.schema import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def percentile(sorted_values: list[int], q: float) -> int:
    """Nearest-rank percentile (q in [0, 100]) of an ascending list."""
    rank = max(1, round(q / 100 * len(sorted_values) + 0.5 - 1e-9))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def histogram(lengths: list[int], bins: int = 12, width: int = 50) -> str:
    """A text histogram of sequence lengths (tokens): one row per distinct length when there are at
    most 2 x ``bins`` of them (the embedded task's lengths are a few discrete values), else per bin."""
    distinct = sorted(set(lengths))
    if len(distinct) <= 2 * bins:
        edges = [(n, n) for n in distinct]
    else:
        low, step = distinct[0], -(-(distinct[-1] - distinct[0] + 1) // bins)
        edges = [(low + b * step, low + (b + 1) * step - 1) for b in range(bins)]
    counts = [sum(lo <= n <= hi for n in lengths) for lo, hi in edges]
    top = max(counts)
    return "\n".join(f"{f'{lo}' if lo == hi else f'{lo}-{hi}':>9} tokens {c:>5} {'#' * round(width * c / top)}"
                     for (lo, hi), c in zip(edges, counts))


def shares(cfg) -> dict:
    """Token shares of P / CoT / A over the training split and its length spread."""
    from kd_sweeps import data, models

    tokenizer = models.embedded_tokenizer(Path(cfg.cache_dir))
    encoded, _, _ = data.load_encoded(cfg.data, "train", tokenizer)
    totals = {name: sum(e.spans.of(name)[1] - e.spans.of(name)[0] for e in encoded) for name in ("P", "CoT", "A")}
    lengths = sorted(len(e.input_ids) for e in encoded)
    all_tokens = sum(totals.values())
    out = {f"share_{name}": count / all_tokens for name, count in totals.items()}
    out.update(sequences=len(lengths), tokens_mean=all_tokens / len(lengths), len_min=lengths[0],
               len_max=lengths[-1], len_p5=percentile(lengths, 5), len_p95=percentile(lengths, 95),
               spread_min_max=lengths[-1] / lengths[0], spread_p5_p95=percentile(lengths, 95) / percentile(lengths, 5))
    return out | {"histogram": histogram(lengths)}


def evaluate_model(prepared, tokenizer, cfg, folder: Path) -> dict:
    """Accuracy (overall and per problem length) and the finished-with-an-answer rate on the
    held-out problems, with the sweep's own evaluation settings (``eval.*``)."""
    from kd_sweeps import data, evaluate
    from kd_sweeps.benchmarks import last_boxed

    records = data.load_records(cfg.data, "test")
    results = folder / "eval.jsonl"
    result = evaluate.evaluate(prepared.model, tokenizer, records, cfg.eval, prepared.model.device,
                               checkpoint=prepared.path, results_file=results)
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    answered = [r["finished"] and last_boxed(r["completion"]) is not None for r in rows]
    by_length = defaultdict(list)
    for row in rows:
        by_length[records[row["problem"]]["n_steps"]].append(row["correct"])
    return {"accuracy": result.accuracy, "n": result.n, "finished_rate": result.finished_rate,
            "answered_rate": sum(answered) / len(answered), "gen_tokens_mean": result.gen_tokens_mean,
            "by_length": {n: round(sum(v) / len(v), 3) for n, v in sorted(by_length.items())}}


def prepare_pair(cfg, out_dir: Path) -> dict:
    """Prepare the teacher and the base cold (the cache is fresh), timed, then evaluate both."""
    import torch

    from kd_sweeps import models
    from kd_sweeps.precision import default_device

    torch.set_num_threads(cfg.train.num_threads or torch.get_num_threads())
    device = default_device(cfg.train.device)
    tokenizer = models.embedded_tokenizer(Path(cfg.cache_dir))
    found = {}
    for role, label in (("teacher", "teacher"), ("student", "base")):
        started = time.perf_counter()
        prepared = models.prepare_embedded(models.spec_dict(cfg.model[role]), label, tokenizer, Path(cfg.cache_dir),
                                           cfg.model.attn_implementation, device)
        found[label] = {"prep_s": round(time.perf_counter() - started, 1), "path": prepared.path,
                        "params": prepared.info.get("params"), "prep_accuracy": prepared.info.get("accuracy")}
        folder = out_dir / f"{label}-{Path(prepared.path).name}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "eval.jsonl").unlink(missing_ok=True)
        found[label].update(evaluate_model(prepared, tokenizer, cfg, folder))
    return found


def relative_change(base: Path, tuned: Path) -> float:
    """||theta_tuned - theta_base|| / ||theta_base|| over every weight (L2): how far KD moved the base."""
    from safetensors.torch import load_file

    before, after = load_file(base / "model.safetensors"), load_file(tuned / "model.safetensors")
    moved = sum(float(((after[name].double() - w.double()) ** 2).sum()) for name, w in before.items())
    return (moved / sum(float((w.double() ** 2).sum()) for w in before.values())) ** 0.5


def kd_full(overrides: list[str], cache: Path, out_dir: Path) -> dict:
    """One grid point at trunc = 1.0 through launch.py (the cached teacher and base are reused)."""
    run_dir = out_dir / f"trunc1-{time.strftime('%H%M%S')}"
    started = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "launch.py"), "trunc=1.0", "sweep=regime", "logger=disabled",
                    f"hydra.run.dir={run_dir}", *overrides], check=True, cwd=ROOT,
                   env={**os.environ, "KD_SWEEPS_CACHE": str(cache)})
    summary = json.loads((run_dir / "result.json").read_text())["summary"]
    return {"wall_s": round(time.perf_counter() - started, 1), "checkpoint": str(run_dir / "checkpoint"),
            "accuracy": summary["accuracy"],
            "finished_rate": summary.get("finished_rate"), "train_time_s": summary.get("train_time_s"),
            "teacher_accuracy": summary.get("teacher_accuracy"), "base_accuracy": summary.get("base_accuracy")}


def main() -> None:
    import logging

    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shares-only", action="store_true")
    parser.add_argument("--no-kd", action="store_true", help="stop after the teacher and the base")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--keep", type=Path, help="a folder for the cache and outputs, kept afterwards (a second "
                        "run with the same folder reuses the prepared models: its prep_s are load times)")
    parser.add_argument("overrides", nargs="*", help="launch.py overrides (the fp32 path is always forced)")
    args = parser.parse_args()
    overrides = [*FP32, *args.overrides]
    with tempfile.TemporaryDirectory(prefix="kd-regime-") as tmp:
        work = args.keep or Path(tmp)
        cache, out_dir = work / "cache", work / "out"
        cfg = compose([*overrides, f"cache_dir={cache}"])
        found = {"overrides": args.overrides, "shares": shares(cfg)}
        print(found["shares"].pop("histogram"), flush=True)
        print(json.dumps(found["shares"]), flush=True)
        if not args.shares_only:
            found.update(prepare_pair(cfg, out_dir))
            print(json.dumps({k: found[k] for k in ("teacher", "base")}), flush=True)
            if not args.no_kd:
                found["kd_trunc1"] = kd_full(overrides, cache, out_dir)
                found["kd_trunc1"]["weights_moved"] = relative_change(Path(found["base"]["path"]),
                                                                      Path(found["kd_trunc1"].pop("checkpoint")))
                base, teacher = found["base"]["accuracy"], found["teacher"]["accuracy"]
                found["gap_closed"] = (found["kd_trunc1"]["accuracy"] - base) / max(1e-9, teacher - base)
    line = json.dumps(found)
    print(line)
    if args.json:
        args.json.write_text(line + "\n")


if __name__ == "__main__":
    main()
