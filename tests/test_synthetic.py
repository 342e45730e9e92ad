"""The embedded task and tokenizer: real P/CoT/A structure in the paper's proportions, lengths that
vary several-fold, disjoint splits, exact round trips."""

from __future__ import annotations

import random

import pytest

from kd_sweeps import data
from kd_sweeps.data import marker_ids, messages
from kd_sweeps.sections import find_spans
from kd_sweeps.synthetic import (MODULUS, STEPS, Problem, extract_boxed, make_split, prompt_text, reasoning_text,
                                 sample_problem)
from kd_sweeps.tokenizer import build_tokenizer, load_or_build_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def test_problem_values_and_answer():
    assert Problem(start=3, step=7, count=3).values == [0, 7, 4]
    assert Problem(start=2, step=9, count=2).answer == 0
    assert Problem(start=4, step=3, count=9).answer == (4 + 3 * 9) % 10  # the prompt's expression, last digit


def test_running_values_stay_in_range_and_lengths_vary():
    rng = random.Random(0)
    problems = [sample_problem(rng, 2, 12) for _ in range(500)]
    assert all(0 <= v < MODULUS for p in problems for v in p.values)
    assert {p.count for p in problems} == set(range(2, 13))
    assert {p.step for p in problems} == set(STEPS)


def test_prompt_is_the_expression_and_the_trace_restates_then_works_every_step():
    problem = Problem(start=4, step=7, count=10)
    assert prompt_text(problem) == "4+7×10"
    cot, answer = reasoning_text(problem).split("</think>")
    lines = cot.removeprefix("<think>\n").split("\n")
    assert lines[-1] == ""  # the chain of thought ends with a newline, then </think>
    lines = lines[:-1]
    assert lines[0] == "4+7×10"  # a one-line restatement
    assert len(lines) == 1 + problem.count  # then one line per addition
    previous = 4
    for k, value in enumerate(problem.values, start=1):
        assert lines[k] == f"{previous}+7={previous + 7}, so {value}, {10 - k} left"
        previous = value
    assert lines[-1].endswith(f"so {(4 + 7 * 10) % 10}, 0 left")  # the last work line carries the result
    assert answer == f"\n\n\\boxed{{{problem.answer}}}"
    assert extract_boxed(answer) == str(problem.answer) == "4"


def test_records_carry_the_answer_and_length():
    record = make_split(1, seed=5, min_steps=4, max_steps=4, split="prep")[0]  # the first draw, unfiltered
    problem = sample_problem(random.Random(5), 4, 4)
    assert record == {"problem": prompt_text(problem), "reasoning": reasoning_text(problem),
                      "answer": str(problem.answer), "n_steps": 4}


def test_splits_are_seeded():
    assert make_split(20, seed=1) == make_split(20, seed=1)
    assert make_split(20, seed=1) != make_split(20, seed=2)


def test_extract_boxed_takes_the_last_box():
    assert extract_boxed(r"x \boxed{3} then \boxed{ 7 }.") == "7"
    assert extract_boxed("no box") is None


def test_tokenizer_round_trips_and_has_markers(tmp_path, tokenizer):
    record = make_split(1, seed=3, min_steps=12, max_steps=12)[0]
    text = tokenizer.apply_chat_template(messages(record), tokenize=False)
    ids = tokenizer.apply_chat_template(messages(record), tokenize=True)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.convert_tokens_to_ids("12") != tokenizer.unk_token_id  # counts are one token each
    think_id, end_id = marker_ids(tokenizer)
    spans = find_spans(ids, think_id, end_id)
    assert spans.prompt[0] == 0 and spans.answer[1] == len(ids)
    # Saved and reloaded the way a hub tokenizer is: identical ids and template.
    reloaded = load_or_build_tokenizer(tmp_path / "tok")
    reloaded = load_or_build_tokenizer(tmp_path / "tok")
    assert reloaded.apply_chat_template(messages(record), tokenize=True)["input_ids"] == ids
    assert reloaded.eos_token == "<|im_end|>"


def test_token_shares_and_length_spread_are_the_papers_regime(tokenizer):
    """On a sample of the KD training set, counted as training counts them (templated, spans from
    find_spans): prompt <= 10 %, chain of thought >= 75 %, answer <= 15 % of all tokens, and the
    longest sequence >= 3x the shortest (benchmarks/regime.py measures the whole set)."""
    encoded, _ = data.encode(make_split(400, seed=42), tokenizer, max_tokens=4096)
    tokens = {name: sum(e.spans.of(name)[1] - e.spans.of(name)[0] for e in encoded) for name in ("P", "CoT", "A")}
    total = sum(tokens.values())
    assert total == sum(len(e.input_ids) for e in encoded)
    assert tokens["P"] / total <= 0.10
    assert tokens["CoT"] / total >= 0.75
    assert tokens["A"] / total <= 0.15
    lengths = [len(e.input_ids) for e in encoded]
    assert max(lengths) / min(lengths) >= 3.0
    # The longest completion fits the evaluation's generation budget (conf/eval/synthetic.yaml: 256).
    assert max(len(e.input_ids) - e.spans.prompt[1] for e in encoded) <= 220


def test_held_out_and_validation_splits_are_disjoint_from_training():
    test = make_split(1000, seed=1, split="test")
    val = make_split(1000, seed=2, split="val")
    train = make_split(3000, seed=2)
    prep = make_split(3000, seed=3, split="prep")
    assert 100 < len(test) < 200  # a fixed ~30% of the 440 (start, step, count) combinations
    assert 25 < len(val) < 70  # a fixed ~10%
    assert len({r["problem"] for r in test}) == len(test)
    test_set, val_set = {r["problem"] for r in test}, {r["problem"] for r in val}
    assert not test_set & val_set
    assert not test_set & {r["problem"] for r in train} and not val_set & {r["problem"] for r in train}
    assert not test_set & {r["problem"] for r in prep}  # the teacher and base never see a test problem
    # Every addition a test problem needs ("6+9=15, so 5") is practised by training problems.
    def work(records):
        return {line.rsplit(", ", 1)[0] for r in records for line in r["reasoning"].splitlines() if "=" in line}

    assert work(test) <= work(train)
