"""Math benchmarks: problems with gold answers, the prompt wording, answer checking, pass@1.

Every benchmark loads into records ``{"problem", "answer", "id"}``: ``problem`` is the user turn
(the benchmark's problem with the chosen instruction appended), ``answer`` the gold answer as a
string, ``id`` a stable identifier. A local JSON/JSONL/Parquet file or a saved dataset directory in
the benchmark's own hub schema stands in for the hub (nothing is downloaded in tests).

Answers are checked with math-verify: the last ``\\boxed{...}`` of the completion (nested braces
allowed) against the gold answer, both parsed first (raw strings never verify).
"""

from __future__ import annotations

import math
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from kd_sweeps.answers import last_boxed


class BenchmarkError(ValueError):
    """A benchmark that cannot be loaded, named with what is wrong and what is allowed."""


def _plain_answer(value) -> str:
    """Gold answers arrive as str, int or float (27.0 in some AMC copies): make them strings."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _after_hashes(value) -> str:
    """GSM8K's ``answer`` is a worked solution ending in ``#### 72``; the gold is what follows.
    Thousands separators are dropped so that ``1,000`` and ``1000`` are the same gold."""
    text = str(value)
    if "####" not in text:
        raise BenchmarkError(f"a GSM8K answer has no '####' line: {text[-80:]!r}")
    gold = text.rsplit("####", 1)[1].strip()
    return gold.replace(",", "") if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", gold) else gold


@dataclass(frozen=True)
class BenchmarkSpec:
    hub_id: str
    config: str | None
    split: str
    problem_field: str
    answer_field: str
    id_field: str | None  # None: the row index is the id
    gold: Callable = _plain_answer  # raw answer field -> gold answer string
    size: int | None = None  # problems in the full split, for a sanity message only


# Columns as published on each dataset card and read by lighteval's tasks (aime24, aime25,
# math_500, gsm8k); amc23 has no lighteval task: math-ai/amc23 is the copy most evaluations load.
BENCHMARKS: dict[str, BenchmarkSpec] = {
    "aime24": BenchmarkSpec("HuggingFaceH4/aime_2024", "default", "train", "problem", "answer", "id",
                            size=30),
    "aime25": BenchmarkSpec("yentinglin/aime_2025", "default", "train", "problem", "answer", "id",
                            size=30),
    "math500": BenchmarkSpec("HuggingFaceH4/MATH-500", "default", "test", "problem", "answer",
                             "unique_id", size=500),
    "gsm8k": BenchmarkSpec("openai/gsm8k", "main", "test", "question", "answer", None,
                           gold=_after_hashes, size=1319),
    "amc23": BenchmarkSpec("math-ai/amc23", "default", "test", "question", "answer", "id", size=40),
}

# The instruction appended to every problem. "boxed" is the wording DeepSeek-R1's model card
# recommends for math and Qwen's math evaluation uses; "lighteval" is the template of lighteval
# 0.10's aime24/aime25/math_500 tasks, which the paper's released evaluation script ran.
PROMPT_STYLES = {
    "boxed": "{problem}\n\nPlease reason step by step, and put your final answer within \\boxed{{}}.",
    "lighteval": ("Solve the following math problem efficiently and clearly.  The last line of your "
                  "response should be of the following format: 'Therefore, the final answer is: "
                  "$\\boxed{{ANSWER}}$. I hope it is correct' (without quotes) where ANSWER is just "
                  "the final number or expression that solves the problem. Think step by step "
                  "before answering.\n\n{problem}"),
    "none": "{problem}",
}


def format_prompt(problem: str, style: str = "boxed") -> str:
    if style not in PROMPT_STYLES:
        raise BenchmarkError(f"prompt style {style!r} is unknown; choose one of {sorted(PROMPT_STYLES)}")
    return PROMPT_STYLES[style].format(problem=problem)


def _read_rows(path: str, spec: BenchmarkSpec) -> list[dict]:
    """Rows of a local copy: JSON (a list of rows) / JSONL, Parquet, or a ``save_to_disk`` dir."""
    file = Path(path)
    if not file.exists():
        raise BenchmarkError(f"benchmark file {path!r} does not exist")
    if file.is_dir():
        import datasets

        loaded = datasets.load_from_disk(str(file))
        if isinstance(loaded, datasets.DatasetDict):
            loaded = loaded[spec.split if spec.split in loaded else next(iter(loaded))]
        return [dict(row) for row in loaded]
    if file.suffix == ".parquet":
        import datasets

        return [dict(row) for row in datasets.load_dataset("parquet", data_files=str(file), split="train")]
    from kd_sweeps.sources import SourceError, read_json_records

    try:
        return read_json_records(file)
    except SourceError as err:  # the same reader as the datasets; the benchmark's error type
        raise BenchmarkError(str(err)) from err


def _hub_rows(spec: BenchmarkSpec, name: str) -> list[dict]:
    from kd_sweeps.sources import load_from_hub

    loaded = load_from_hub(spec.hub_id, spec.config, spec.split, BenchmarkError, f"benchmark {name!r}: ",
                           "pass path= to a local copy in the same schema")
    return [dict(row) for row in loaded]


def load_benchmark(name: str, path: str | None = None, n: int | None = None,
                   prompt_style: str = "boxed") -> list[dict]:
    """Records ``{"problem", "answer", "id"}`` of a benchmark, from the hub or from ``path``.

    ``n`` keeps the first n problems (quick checks); ``prompt_style`` picks the instruction
    appended to each problem (see PROMPT_STYLES).
    """
    if name not in BENCHMARKS:
        raise BenchmarkError(f"unknown benchmark {name!r}; available: {', '.join(sorted(BENCHMARKS))}")
    format_prompt("", prompt_style)  # an unknown style fails here, before any loading
    spec = BENCHMARKS[name]
    rows = _read_rows(path, spec) if path is not None else _hub_rows(spec, name)
    if n is not None:
        rows = rows[:n]
    records = []
    for index, row in enumerate(rows):
        missing = [f for f in (spec.problem_field, spec.answer_field) if f not in row]
        if missing:
            raise BenchmarkError(f"benchmark {name!r} row {index}: no field(s) {missing}; expected "
                                 f"{spec.problem_field!r} and {spec.answer_field!r} (has {sorted(row)})")
        problem = row[spec.problem_field]
        if not isinstance(problem, str):
            raise BenchmarkError(f"benchmark {name!r} row {index}: {spec.problem_field!r} is "
                                 f"{type(problem).__name__}, expected a string")
        ident = row.get(spec.id_field) if spec.id_field else None
        records.append({"problem": format_prompt(problem, prompt_style),
                        "answer": spec.gold(row[spec.answer_field]),
                        "id": f"{name}/{ident if ident is not None else index}"})
    if not records:
        raise BenchmarkError(f"benchmark {name!r} has no problems (path={path!r}, n={n})")
    return records


def _parse(text: str, in_main_thread: bool):
    from math_verify import parse

    # math-verify's timeouts use SIGALRM, which only works in the main thread: off elsewhere.
    kwargs = {} if in_main_thread else {"parsing_timeout": None}
    return parse(text, **kwargs)


def check_answer(prediction_text: str, gold: str) -> bool:
    """Whether a completion's final answer equals the gold answer, per math-verify.

    The prediction is the last ``\\boxed{}`` of the completion; without one, math-verify extracts
    an answer from the text after the last ``</think>`` (e.g. "The answer is 204").
    """
    from math_verify import verify

    if prediction_text is None or gold is None:
        return False
    main = threading.current_thread() is threading.main_thread()
    gold = str(gold).strip()
    delimited = gold if "$" in gold or "\\boxed" in gold else f"${gold}$"
    gold_parsed = _parse(delimited, main) or _parse(gold, main)
    boxed = last_boxed(prediction_text)
    if boxed is not None:
        pred_parsed = _parse(f"${boxed}$", main) or _parse(boxed, main)
    else:
        pred_parsed = _parse(prediction_text.rsplit("</think>", 1)[-1], main)
    if not gold_parsed or not pred_parsed:
        return False
    kwargs = {} if main else {"timeout_seconds": None}
    return bool(verify(gold_parsed, pred_parsed, **kwargs))


def pass_at_1(per_problem_samples: Sequence[Sequence[bool]]) -> tuple[float, float]:
    """pass@1 estimated as the mean correctness over samples, and its standard error over problems.

    Each problem contributes the fraction of its samples that are correct; the standard error is
    the sample standard deviation of those fractions over sqrt(#problems) (NaN for one problem).
    With one sample per problem on AIME's 30 problems it is near ±9 points.
    """
    if not per_problem_samples:
        raise ValueError("pass_at_1 needs at least one problem")
    empty = [i for i, samples in enumerate(per_problem_samples) if len(samples) == 0]
    if empty:
        raise ValueError(f"pass_at_1: problem(s) {empty[:5]} have no samples")
    scores = [sum(bool(s) for s in samples) / len(samples) for samples in per_problem_samples]
    n = len(scores)
    mean = sum(scores) / n
    if n == 1:
        return mean, float("nan")
    variance = sum((s - mean) ** 2 for s in scores) / (n - 1)
    return mean, math.sqrt(variance / n)
