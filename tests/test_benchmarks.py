"""Math benchmarks: loading in their hub schemas, answer checking with math-verify, pass@1."""

from __future__ import annotations

import json
import math
import os
import threading
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from kd_sweeps.benchmarks import (  # noqa: E402  (offline mode must be set before datasets loads)
    BENCHMARKS,
    BenchmarkError,
    check_answer,
    last_boxed,
    load_benchmark,
    pass_at_1,
)

FIXTURES = Path(__file__).parent / "fixtures" / "benchmarks"
INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
GOLDS = {
    "aime24": ["14", "24", "11"],
    "aime25": ["28", "16", "5"],
    "math500": ["\\frac{1}{2}", "(0,1]", "\\frac{\\sqrt{2}}{2}", "\\left( 3, \\frac{\\pi}{2} \\right)"],
    "gsm8k": ["7", "60", "2000"],
    "amc23": ["10", "8", "0.75"],
}


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_every_fixture_loads(name):
    records = load_benchmark(name, path=str(FIXTURES / f"{name}.jsonl"))
    assert [r["answer"] for r in records] == GOLDS[name]
    assert len({r["id"] for r in records}) == len(records)
    for record in records:
        assert set(record) == {"problem", "answer", "id"}
        assert record["id"].startswith(f"{name}/")
        assert record["problem"].endswith("\n\n" + INSTRUCTION)


def test_ids_and_problem_text_come_from_the_real_columns():
    math500 = load_benchmark("math500", path=str(FIXTURES / "math500.jsonl"), prompt_style="none")
    assert math500[0] == {"problem": "Simplify $\\frac{2}{4}$.", "answer": "\\frac{1}{2}",
                          "id": "math500/test/prealgebra/1.json"}
    gsm8k = load_benchmark("gsm8k", path=str(FIXTURES / "gsm8k.jsonl"), n=2, prompt_style="none")
    assert [r["id"] for r in gsm8k] == ["gsm8k/0", "gsm8k/1"]
    assert gsm8k[0]["problem"].startswith("Tom has 3 apples")


def test_prompt_styles():
    path = str(FIXTURES / "aime24.jsonl")
    lighteval = load_benchmark("aime24", path=path, prompt_style="lighteval")[0]["problem"]
    assert lighteval.startswith("Solve the following math problem efficiently and clearly.")
    assert "'Therefore, the final answer is: $\\boxed{ANSWER}$. I hope it is correct'" in lighteval
    assert lighteval.endswith("\n\nFind the number of positive integers $n \\le 100$ divisible by $7$.")
    with pytest.raises(BenchmarkError, match="prompt style 'cot' is unknown"):
        load_benchmark("aime24", path=path, prompt_style="cot")


def test_unknown_benchmark_and_bad_rows(tmp_path):
    with pytest.raises(BenchmarkError, match="available: aime24, aime25, amc23, gsm8k, math500"):
        load_benchmark("aime26")
    bad = tmp_path / "aime24.jsonl"
    bad.write_text(json.dumps({"question": "q", "answer": "1"}) + "\n")
    with pytest.raises(BenchmarkError, match=r"row 0: no field\(s\) \['problem'\]"):
        load_benchmark("aime24", path=str(bad))


def test_hub_name_offline_fails_fast_with_a_clear_message():
    start = time.perf_counter()
    with pytest.raises(BenchmarkError, match=r"HuggingFaceH4/aime_2024.*offline mode is on.*path="):
        load_benchmark("aime24")
    assert time.perf_counter() - start < 5


def test_last_boxed_handles_nesting_and_edge_cases():
    assert last_boxed("so $\\boxed{\\frac{\\sqrt{2}}{2}}$.") == "\\frac{\\sqrt{2}}{2}"
    assert last_boxed("\\boxed{3} no wait \\boxed{4}") == "4"
    assert last_boxed("\\boxed {(0, 1]}") == "(0, 1]"
    assert last_boxed("\\fbox{7}") == "7"
    assert last_boxed("\\boxed{12} then cut off \\boxed{\\frac{1}{") == "12"  # unclosed box ignored
    assert last_boxed("no box here") is None


@pytest.mark.parametrize("prediction, gold, expected", [
    ("So the answer is $\\boxed{\\frac{1}{2}}$.", "0.5", True),  # fraction vs decimal
    ("$\\boxed{0.5}$", "\\frac{1}{2}", True),
    ("$\\boxed{\\frac{\\sqrt{2}}{2}}$", "\\frac{\\sqrt2}{2}", True),  # nested braces
    ("$\\boxed{\\sqrt{2}/2}$", "\\frac{\\sqrt2}{2}", True),
    ("The set is $\\boxed{(0, 1]}$", "(0,1]", True),  # interval
    ("The set is $\\boxed{(0, 1)}$", "(0,1]", False),  # open vs half-open
    ("The answer is 204", "204", True),  # no box: plain text after the thought
    ("<think>maybe it is 100</think>\n\nThe answer is 204.", "204", True),
    ("$\\boxed{205}$", "204", False),  # wrong answer
    ("First $\\boxed{3}$, no: $\\boxed{4}$", "3", False),  # the last box counts
    ("$\\boxed{(3, \\frac{\\pi}{2})}$", "\\left( 3, \\frac{\\pi}{2} \\right)", True),  # tuple
    ("$\\boxed{\\dfrac{1}{4}}$", "0.25", True),
    ("$\\boxed{2,000}$", "2000", True),
    ("", "204", False),
    (None, "204", False),
])
def test_check_answer(prediction, gold, expected):
    assert check_answer(prediction, gold) is expected


def test_check_answer_off_the_main_thread():
    results = []
    worker = threading.Thread(target=lambda: results.append(
        (check_answer("$\\boxed{\\frac{1}{2}}$", "0.5"), check_answer("$\\boxed{3}$", "0.5"))))
    worker.start()
    worker.join(timeout=30)
    assert results == [(True, False)]


def test_benchmark_solutions_verify_against_their_golds():
    rows = [json.loads(line) for line in (FIXTURES / "math500.jsonl").read_text().splitlines()]
    assert all(check_answer(row["solution"], row["answer"]) for row in rows)


def test_pass_at_1_against_hand_computed_values():
    mean, stderr = pass_at_1([[True, False], [True, True], [False, False]])
    assert mean == pytest.approx(0.5)
    # per-problem scores 0.5, 1, 0: sample variance 0.25, stderr sqrt(0.25 / 3)
    assert stderr == pytest.approx(math.sqrt(0.25 / 3))
    mean, stderr = pass_at_1([[True, True, False, True]])
    assert mean == pytest.approx(0.75) and math.isnan(stderr)
    with pytest.raises(ValueError, match="at least one problem"):
        pass_at_1([])
    with pytest.raises(ValueError, match=r"problem\(s\) \[1\] have no samples"):
        pass_at_1([[True], []])
