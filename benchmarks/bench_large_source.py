"""A large source's row filter + formatting: rows/s and peak memory, today's path vs the old one.

    python benchmarks/bench_large_source.py --rows 1000000 --schema synthetic1
    python benchmarks/bench_large_source.py --rows 1000000 --schema nemotron --num-proc 2

Generates a local parquet file of the dataset's published columns (SYNTHETIC-1: prompt,
llm_response, task_type and its metadata, task types mixed; Nemotron SFT: input as chat messages,
output, reasoning, system_prompt and its metadata), then measures, each in a fresh process:

- ``convert``: the parquet file into the datasets library's Arrow cache (``load_dataset``, once; a hub
  download does the same), which both paths then read memory-mapped;
- ``new``: ``prepare.prepared_splits`` (source=path): the row filter as an Arrow column compare (``Dataset.filter``,
  batched, ``input_columns``), formatting as a batched ``Dataset.map`` in ``--num-proc``
  workers written to the cache, the drop counts in Arrow compute, the split; then the same call
  again (a later grid point: everything read back from the cache);
- ``old``: the code this replaced (kd_sweeps/sources.py before the change): the filter as a
  per-row ``Dataset.filter`` on the column, then one Python loop formatting row by row into a list.

Formatting and filtering are what every rank did per run before, so they are compared without a
tokenizer; ``--tokenize`` adds the rendering and tokenizing a run does once per (dataset,
tokenizer, max_tokens) with the real Qwen3-4B-Base tokenizer (new path only; the old path
tokenized later, in ``data.encode``, per rank).
Peak memory is ru_maxrss: the process's resident peak (memory-mapped Arrow pages it touched count)
and, for ``new``, the largest worker's. Response texts are ~1-2 KB, much shorter than the real
datasets' (tens of KB): real rows cost more per row in both paths.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TASKS = [("verifiable_math", 0.5), ("verifiable_coding_problems", 0.2), ("code_output_prediction", 0.15),
         ("llm_judgeable_groundtruth_similarity", 0.15)]  # a mix, not SYNTHETIC-1's real proportions


def _thought(rng: random.Random, i: int) -> str:
    steps = "\n".join(f"Step {k}: {rng.randint(1, 999)} + {rng.randint(1, 999)} carries into term {k}."
                      for k in range(rng.randint(10, 30)))
    return f"Let me work through problem {i} carefully.\n{steps}\nSo the value is {i % 97}."


def synthetic1_rows(n: int, seed: int = 0) -> dict[str, list]:
    rng = random.Random(seed)
    tasks, weights = zip(*TASKS)
    cols: dict[str, list] = {k: [] for k in ("response_id", "problem_id", "source", "task_type", "in_source_id",
                                             "prompt", "gold_standard_solution", "verification_info", "metadata",
                                             "llm_response", "score", "verification_result_info")}
    for i in range(n):
        closed = rng.random() > 0.05  # 5 % never close the thought: dropped, counted
        response = _thought(rng, i) + ("\n</think>\n\n" if closed else "\n\n") + f"Final Answer: \\boxed{{{i % 97}}}"
        values = (f"r{i}", f"p{i}", "synthetic_math", rng.choices(tasks, weights)[0], str(i),
                  f"Problem {i}: compute the sum of the terms below.\n\nReturn your final response as 'Final Answer: "
                  "\\boxed{<answer>}'.", str(i % 97), json.dumps({"ground_truth": str(i % 97)}), "{}", response,
                  1.0, "")
        for key, value in zip(cols, values):
            cols[key].append(value)
    return cols


def nemotron_rows(n: int, seed: int = 0) -> dict[str, list]:
    rng = random.Random(seed)
    cols: dict[str, list] = {k: [] for k in ("input", "output", "category", "license", "reasoning", "generator",
                                             "used_in_training", "version", "system_prompt")}
    for i in range(n):
        on = rng.random() > 0.1
        body = f"<think>\n{_thought(rng, i)}\n</think>\n\n" if on else ""
        values = ([{"role": "user", "content": f"Solve problem {i}. Put the answer inside \\boxed{{}}."}],
                  body + f"The answer is \\boxed{{{i % 97}}}.", "math", "cc-by-4.0", "on" if on else "off",
                  "DeepSeek-R1", "Ultra, Nano", "v1.1", f"detailed thinking {'on' if on else 'off'}")
        for key, value in zip(cols, values):
            cols[key].append(value)
    return cols


def generate(folder: Path, schema: str, rows: int, chunk: int = 100_000) -> Path:
    """A parquet file of ``rows`` rows, written in chunks (the generator's memory stays small)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = folder / "dataset" / "data" / "train.parquet"
    if path.exists() and pq.ParquetFile(path).metadata.num_rows == rows:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    make = synthetic1_rows if schema == "synthetic1" else nemotron_rows
    writer = None
    for start in range(0, rows, chunk):
        table = pa.Table.from_pydict(make(min(chunk, rows - start), seed=start))
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
    writer.close()
    return path


def _peak_mib() -> tuple[float, float]:
    """(this process, its largest finished child) resident peaks, MiB (ru_maxrss is KiB on Linux)."""
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)


def qwen3_tokenizer(folder: Path):
    """Qwen3-4B-Base's real tokenizer from the test fixtures (tests/fixtures/qwen3), no weights."""
    from transformers import AutoTokenizer

    fixtures = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "qwen3"
    target = folder / "qwen3-tokenizer"
    target.mkdir(exist_ok=True)
    for path in [*(fixtures / "shared").iterdir(), *(fixtures / "Qwen3-4B-Base").iterdir()]:
        if path.name != "config.json":
            shutil.copy(path, target / path.name)
    return AutoTokenizer.from_pretrained(target)


def run_new(folder: Path, schema: str, num_proc: int, tokenize: bool) -> dict:
    from kd_sweeps.prepare import prepared_splits

    dataset = "synthetic1" if schema == "synthetic1" else "nemotron"
    args = dict(source="path", dataset=dataset, split="train", n_train=None, n_val=1000, cache_dir=folder / "cache",
                num_proc=num_proc, tokenizer=qwen3_tokenizer(folder) if tokenize else None,
                max_tokens=4096 if tokenize else None)
    shutil.rmtree(folder / "cache", ignore_errors=True)  # a first run formats everything
    started = time.perf_counter()
    train, _, report = prepared_splits(str(folder / "dataset"), **args)
    first = time.perf_counter() - started
    started = time.perf_counter()
    prepared_splits(str(folder / "dataset"), **args)
    again = time.perf_counter() - started
    return {"seconds": first, "cached_seconds": again, "report": report.as_dict(), "train": len(train)}


def run_old(folder: Path, schema: str) -> dict:
    import datasets

    from kd_sweeps.sources import DATASETS, format_row

    started = time.perf_counter()
    rows = datasets.load_dataset(str(folder / "dataset"), split="train")
    column, value = DATASETS["synthetic1"].row_filter
    if schema == "synthetic1":
        rows = rows.filter(lambda v: v == value, input_columns=[column])
    records, dropped = [], 0
    for index, raw in enumerate(rows):
        record, _, _ = format_row(dict(raw), schema, index)
        if record is None:
            dropped += 1
        else:
            records.append(record)
    order = list(range(len(records)))
    random.Random(42).shuffle(order)
    return {"seconds": time.perf_counter() - started, "kept": len(records), "dropped": dropped}


def run_convert(folder: Path) -> dict:
    """parquet -> the datasets library's Arrow cache, once (what a hub download does before either path)."""
    import datasets

    started = time.perf_counter()
    datasets.load_dataset(str(folder / "dataset"), split="train")
    return {"seconds": time.perf_counter() - started}


def measure(args) -> dict:
    folder = Path(args.folder)
    os.environ["HF_DATASETS_CACHE"] = str(folder / "hf-cache")  # both paths read the same converted Arrow files
    paths = {"convert": lambda: run_convert(folder),
             "new": lambda: run_new(folder, args.schema, args.num_proc, args.tokenize),
             "old": lambda: run_old(folder, args.schema)}
    import datasets  # noqa: F401  (imports are not what is measured: a run has them loaded already)

    import kd_sweeps.data  # noqa: F401
    import kd_sweeps.prepare  # noqa: F401

    result = paths[args.path]()
    result["peak_mib"], result["largest_worker_mib"] = _peak_mib()
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--schema", choices=("synthetic1", "nemotron"), default="synthetic1")
    parser.add_argument("--num-proc", type=int, default=0, help="workers of the new path (0: automatic)")
    parser.add_argument("--paths", nargs="+", choices=("new", "old"), default=["new", "old"])
    parser.add_argument("--tokenize", action="store_true", help="new path: also render and tokenize with the real "
                        "Qwen3-4B-Base tokenizer (max_tokens 4096), as a run does")
    parser.add_argument("--folder", help="where the parquet file and caches go (default: a temporary folder)")
    parser.add_argument("--path", help=argparse.SUPPRESS)  # internal: measure one path in this process
    args = parser.parse_args(argv)
    if args.path:
        print(json.dumps(measure(args)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.folder or tmp)
        started = time.perf_counter()
        parquet = generate(folder, args.schema, args.rows)
        print(f"{args.rows:,} {args.schema} rows, {parquet.stat().st_size / 2**20:,.0f} MiB parquet "
              f"(generated in {time.perf_counter() - started:.0f} s)")
        for path in ["convert", *args.paths]:
            out = subprocess.run([sys.executable, __file__, "--path", path, "--folder", str(folder), "--schema",
                                  args.schema, "--num-proc", str(args.num_proc)] + ["--tokenize"] * args.tokenize,
                                 capture_output=True, text=True)
            if out.returncode:
                print(out.stderr[-3000:])
                return out.returncode
            result = json.loads(out.stdout.strip().splitlines()[-1])
            extra = f", again from the cache {result['cached_seconds']:.1f} s" if path == "new" else ""
            print(f"{path}: {result['seconds']:.1f} s, {args.rows / result['seconds']:,.0f} rows/s{extra}; "
                  f"peak RSS {result['peak_mib']:,.0f} MiB (largest worker {result['largest_worker_mib']:,.0f} MiB)")
            if path != "convert":
                print(f"    {json.dumps(result.get('report') or {k: result[k] for k in ('kept', 'dropped')})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
