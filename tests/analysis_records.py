"""Records and fakes shared by the analysis tests.

They live in this non-test module so that a test file never imports another test file: that made
pytest import test modules from each other and hid which fixtures are shared. Holds the
result.json-shaped ``record`` and the small sweeps built from it (``RECORDS``,
``paper_records``, the generation-era ``RUNS``), and the fake of wandb's public API
(``FakeApi``, ``FakeRun``) that the online loader and the CLI run against.
"""

from __future__ import annotations

import copy


# ----------------------------------------------------------------------------- result.json records

def record(run_id, sections="cot", trunc=1.0, acc=0.6, status="ok", seed=42, flops=1e12,
           error=None, benchmarks=("synthetic",)):
    """A result.json-shaped record like the trainer writes."""
    summary = {
        "accuracy": acc, "accuracy_stderr": 0.034,
        "train_flops": flops, "train_flops_student": 0.75 * flops,
        "train_flops_teacher": 0.25 * flops, "train_time_s": 40.0 * trunc,
        "peak_memory_bytes": 812_000_000, "tokens_trained": 300_000,
        "tokens_supervised": int(150_000 * trunc), "tokens_padded": 9000,
        "examples_skipped": 3,
    }
    if status != "ok":
        benchmarks = ()  # a failed run gets no evaluation
    for i, bench in enumerate(benchmarks):
        summary.update({f"eval/{bench}/accuracy": acc - 0.1 * i, f"eval/{bench}/stderr": 0.034,
                        f"eval/{bench}/n": 200, f"eval/{bench}/generated_tokens": 21000 + i})
    include = {"cot": ["CoT"], "cot_ans": ["CoT", "A"], "all": ["P", "CoT", "A"]}[sections]
    config = {
        "trunc": trunc, "seed": seed,
        "truncation": {"mode": "lead", "cut_after_think": False},
        "sections": {"name": sections, "include": include},
        "loss": {"name": "forward_kl", "kd_ratio": 0.5, "temperature": 1.0},
        "model": {"name": "tiny", "teacher": {"name_or_path": "embedded-teacher"},
                  "student": {"name_or_path": "embedded-base"}},
        "data": {"name": "synthetic"}, "train": {"lr": 1e-4}, "eval": {}, "logger": {},
    }
    if status != "ok":
        summary = {}
    return {"run_id": run_id, "sweep": "demo", "status": status, "error": error,
            "overrides": [f"trunc={trunc}", f"sections={sections}"], "config": config,
            "summary": summary, "started_at": "2026-11-27T17:00:00+00:00", "finished_at": None}


RECORDS = [
    record("r_cot_050", "cot", 0.5, 0.55, flops=5e11),
    record("r_cot_100", "cot", 1.0, 0.61, benchmarks=("aime24", "math500")),
    record("r_ca_050", "cot_ans", 0.5, 0.50, flops=6e11),
    record("r_ca_100", "cot_ans", 1.0, 0.64, flops=1.2e12),
    record("r_fail", "all", 0.25, None, status="failed", error="CUDA out of memory"),
]


# ----------------------------------------------------------------------------- the paper's grid

PRESETS = ("cot_ans", "all", "cot")  # not in the paper's order, on purpose
TRUNCS = (0.25, 0.5, 1.0)


def paper_records() -> list[dict]:
    """3 presets x 3 truncs x 2 seeds on two benchmarks, plus one failed run."""
    records = []
    for p, preset in enumerate(PRESETS):
        for trunc in TRUNCS:
            for seed in (1, 2):
                acc = 0.3 + 0.1 * p + 0.3 * trunc + 0.02 * seed
                rec = record(f"{preset}-{trunc}-{seed}", preset, trunc, acc, seed=seed,
                             flops=1e12 * trunc * (1 + 0.2 * p),
                             benchmarks=("synthetic", "math500"))
                rec["summary"]["peak_memory_bytes"] = int(2e8 * (1 + trunc))
                records.append(rec)
    records.append(record("broken", "all", 0.5, None, status="failed", error="OOM"))
    return records


# ----------------------------------------------------------------------------- generation

TEACHER, BASE = 0.887, 0.254


def generation_record(run_id, sections, trunc, acc, finished, tokens, teacher=TEACHER, base=BASE,
                      seed=42):
    """A record as the trainer writes it now: generation per benchmark and over benchmarks, and
    the embedded models' accuracies (None for pretrained ones)."""
    rec = record(run_id, sections, trunc, acc, seed=seed)
    rec["config"]["eval"] = {"max_new_tokens": 256}
    rec["summary"].update({
        "eval/synthetic/finished_rate": finished, "eval/synthetic/gen_tokens_mean": tokens,
        "eval/synthetic/gen_tokens_max": 256 if finished < 1 else int(tokens) + 5,
        "finished_rate": finished, "gen_tokens_mean": tokens,
        "teacher_accuracy": teacher, "base_accuracy": base})
    return rec


RUNS = [generation_record("all-025", "all", 0.25, 0.10, 0.05, 250.0),
        generation_record("all-050", "all", 0.5, 0.30, 0.60, 140.5),
        generation_record("all-100", "all", 1.0, 0.60, 0.98, 61.0),
        generation_record("cot-050", "cot", 0.5, 0.35, 0.90, 70.0),
        generation_record("cot-100", "cot", 1.0, 0.70, 1.00, 58.0)]


# ----------------------------------------------------------------------------- fake wandb API

class FakeResponse:
    def __init__(self, status_code: int):
        self.status_code = status_code


class FakeHTTPError(Exception):
    """Shaped like requests.HTTPError: the status is on .response."""

    def __init__(self, status_code: int):
        super().__init__(f"{status_code} Client Error")
        self.response = FakeResponse(status_code)


class FakeRun:
    """One run as ``wandb.Api().runs`` yields it, made from a result.json record."""

    def __init__(self, rec: dict):
        self.id = rec["run_id"]
        self.name = rec["run_id"]
        self.group = rec["sweep"]
        self.state = {"ok": "finished", "failed": "failed"}[rec["status"]]
        self.tags = ["kd"]
        self.config = copy.deepcopy(rec["config"]) | {"_wandb": {"cli_version": "0.31.0"}}
        self.summary = dict(rec["summary"], _runtime=12.5)
        if rec["error"]:
            self.summary["error"] = rec["error"]


class FakeApi:
    """``runs(path, filters=..., per_page=...)`` with per-page requests; ``fail_at`` lists
    the request numbers (1-based, over the whole session) answered with ``error``."""

    def __init__(self, runs, fail_at=(), error=lambda: FakeHTTPError(429)):
        self.all_runs, self.fail_at, self.error = runs, set(fail_at), error
        self.calls: list[tuple] = []
        self.requests = 0

    def runs(self, path, filters=None, per_page=50):
        self.calls.append((path, filters, per_page))
        return self._pages(per_page)

    def _pages(self, per_page):
        for start in range(0, len(self.all_runs), per_page):
            self.requests += 1
            if self.requests in self.fail_at:
                raise self.error()
            yield from self.all_runs[start:start + per_page]
