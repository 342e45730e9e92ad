"""The embedded task and tokenizer: real P/CoT/A structure, varied lengths, exact round trips."""

from __future__ import annotations

from kd_sweeps.data import marker_ids, messages
from kd_sweeps.sections import find_spans
from kd_sweeps.synthetic import MODULUS, Problem, extract_boxed, make_split, sample_problem
from kd_sweeps.tokenizer import build_tokenizer, load_or_build_tokenizer


def test_problem_values_and_answer():
    assert Problem(start=3, step=7, count=3).values == [0, 7, 4]
    assert Problem(start=2, step=-5, count=2).answer == 2


def test_running_values_stay_in_range_and_lengths_vary():
    import random

    rng = random.Random(0)
    problems = [sample_problem(rng, 2, 12) for _ in range(500)]
    assert all(0 <= v < MODULUS for p in problems for v in p.values)
    assert {p.count for p in problems} == set(range(2, 13))
    assert {p.step > 0 for p in problems} == {True, False}


def test_trace_restates_the_problem_and_works_every_step():
    record = make_split(1, seed=5, min_steps=4, max_steps=4, split="prep")[0]  # the first draw, unfiltered
    problem = sample_problem(__import__("random").Random(5), 4, 4)
    reasoning = record["reasoning"]
    assert reasoning.startswith("<think>\n") and "\n</think>\n\n" in reasoning
    cot, answer = reasoning.split("</think>")
    assert record["problem"].replace(" What is the result?", "") in cot  # restated
    sign = "+" if problem.step > 0 else "-"
    previous = problem.start
    for k, value in enumerate(problem.values, start=1):
        assert f"\n{k}: {previous}{sign}{abs(problem.step)}={value}\n" in cot
        previous = value
    assert extract_boxed(answer) == record["answer"] == str(problem.answer)


def test_splits_are_seeded():
    assert make_split(20, seed=1) == make_split(20, seed=1)
    assert make_split(20, seed=1) != make_split(20, seed=2)


def test_extract_boxed_takes_the_last_box():
    assert extract_boxed(r"x \boxed{3} then \boxed{ 7 }.") == "7"
    assert extract_boxed("no box") is None


def test_tokenizer_round_trips_and_has_markers(tmp_path):
    tokenizer = build_tokenizer()
    record = make_split(1, seed=3)[0]
    text = tokenizer.apply_chat_template(messages(record), tokenize=False)
    ids = tokenizer.apply_chat_template(messages(record), tokenize=True)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert tokenizer.unk_token_id not in ids
    think_id, end_id = marker_ids(tokenizer)
    spans = find_spans(ids, think_id, end_id)
    assert spans.prompt[0] == 0 and spans.answer[1] == len(ids)
    # Saved and reloaded the way a hub tokenizer is: identical ids and template.
    reloaded = load_or_build_tokenizer(tmp_path / "tok")
    reloaded = load_or_build_tokenizer(tmp_path / "tok")
    assert reloaded.apply_chat_template(messages(record), tokenize=True)["input_ids"] == ids
    assert reloaded.eos_token == "<|im_end|>"


def test_sequence_lengths_vary_several_fold():
    tokenizer = build_tokenizer()
    lengths = [len(tokenizer.apply_chat_template(messages(r), tokenize=True)["input_ids"])
               for r in make_split(300, seed=0)]
    assert max(lengths) / min(lengths) > 1.7


def test_held_out_split_is_disjoint_from_training():
    test = make_split(1000, seed=1, split="test")
    train = make_split(3000, seed=2)
    assert 100 < len(test) < 200  # a fixed ~30% of the 440 (start, step, count) combinations
    assert len({r["problem"] for r in test}) == len(test)
    assert not {r["problem"] for r in test} & {r["problem"] for r in train}
    # Every line a test problem needs (digit, step) is practised by training problems.
    lines = {line for r in train for line in r["reasoning"].splitlines() if "=" in line}
    needed = {line.split(": ", 1)[1] for r in test for line in r["reasoning"].splitlines() if "=" in line}
    assert needed <= {line.split(": ", 1)[1] for line in lines}
