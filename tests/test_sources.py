"""Reasoning datasets in their published schemas -> records; marker-less records dropped and counted."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from kd_sweeps.sources import (  # noqa: E402  (offline mode must be set before datasets loads)
    DATASETS,
    SourceError,
    format_record,
    infer_schema,
)
from kd_sweeps.prepare import load_reasoning_dataset  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "datasets"
RAW_MARKERS = ("<|begin_of_thought|>", "<|end_of_thought|>", "<|begin_of_solution|>", "<|end_of_solution|>")

# Per fixture: rows, rows removed by the task filter, drop reasons, records with <think> restored.
EXPECTED = {
    "bespoke_stratos17k": (6, 0, {"no </think>": 1, "</think> before <think>": 1}, 0),
    "open_thoughts114k": (5, 0, {"no <think>": 1}, 0),
    "skyt1": (5, 0, {"no </think>": 1}, 0),
    "synthetic1": (6, 1, {"no </think>": 1}, 3),
    "nemotron": (5, 0, {"no </think>": 2}, 0),
}


def write_jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def conversation(problem, assistant, system="You are a careful solver."):
    return {"system": system, "conversations": [{"from": "user", "value": problem},
                                                {"from": "assistant", "value": assistant}]}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_fixture_loads_and_formats(name):
    rows, filtered, reasons, restored = EXPECTED[name]
    kept = rows - filtered - sum(reasons.values())
    raw_rows = [json.loads(line) for line in (FIXTURES / f"{name}.jsonl").read_text().splitlines()]
    systems = {r["system"] for r in raw_rows if "system" in r}

    train, val, report = load_reasoning_dataset(str(FIXTURES / f"{name}.jsonl"), source="json",
                                                n_train=kept - 1, n_val=1)
    assert (report.rows, report.filtered_out, dict(report.dropped)) == (rows, filtered, reasons)
    assert report.missing_markers == sum(reasons.values())
    assert report.think_restored == restored
    assert (report.kept, report.n_train, report.n_val) == (kept, kept - 1, 1)
    assert len(train) == kept - 1 and len(val) == 1
    assert not {r["problem"] for r in train} & {r["problem"] for r in val}
    for record in train + val:
        assert set(record) == {"problem", "reasoning", "answer"}
        text = record["reasoning"]
        assert text.count("<think>") == 1 and text.count("</think>") == 1
        assert text.index("<think>") < text.index("</think>")
        assert not any(marker in text or marker in record["problem"] for marker in RAW_MARKERS)
        assert not any(s in text or s in record["problem"] for s in systems)  # system prompt dropped
        assert isinstance(record["answer"], str)


def test_bespoke_record_is_formatted_exactly():
    row = json.loads((FIXTURES / "bespoke_stratos17k.jsonl").read_text().splitlines()[0])
    record = format_record(row, "conversations")
    assert record == {
        "problem": "Return your final response within \\boxed{}. What is $2+3$?",
        "reasoning": "<think>\n\nOkay, I add 2 and 3.\n\nThat gives 5.\n\n</think>\n\n"
                     "Adding, $2+3=5$.\n\nThe answer is $\\boxed{5}$.",
        "answer": "5",
    }


def test_answers_are_the_last_box_after_the_thought():
    rows = [json.loads(line) for line in (FIXTURES / "bespoke_stratos17k.jsonl").read_text().splitlines()]
    assert format_record(rows[1], "conversations")["answer"] == "\\frac{1}{2}"  # nested braces
    assert format_record(rows[5], "conversations")["answer"] == ""  # no box in the solution
    record = format_record(conversation("q", "<|begin_of_thought|>\n\ntry \\boxed{1}\n\n<|end_of_thought|>"
                                             "\n\n<|begin_of_solution|>\n\nno box\n\n<|end_of_solution|>"),
                           "conversations")
    assert record["answer"] == ""  # a box inside the thought is not the answer


def test_solution_wrappers_with_other_whitespace_are_removed():
    text = ("<|begin_of_thought|>\nx\n<|end_of_thought|>\n"
            "<|begin_of_solution|>\n\\boxed{2}\n<|end_of_solution|>")
    record = format_record(conversation("q", text), "conversations")
    assert record["reasoning"] == "<think>\nx\n</think>\n\\boxed{2}"


def test_synthetic1_restores_the_prefilled_think_and_filters_task_type():
    train, val, report = load_reasoning_dataset(str(FIXTURES / "synthetic1.jsonl"), source="json",
                                                dataset="synthetic1", n_train=3, n_val=1)
    records = train + val
    assert report.filtered_out == 1 and report.think_restored == 3
    assert all(r["reasoning"].startswith("<think>") for r in records)
    assert not any("def f" in r["reasoning"] for r in records)  # the coding row is gone
    assert sorted(r["answer"] for r in records) == ["1", "15", "25", "7"]


def test_nemotron_v1_templated_string_input():
    raw = {"input": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\ndetailed thinking on"
                    "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nWhat is $2+2$?<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n",
           "output": "<think>\n2+2=4\n</think>\n\n\\boxed{4}<|eot_id|>", "reasoning": "on"}
    assert format_record(raw, "nemotron") == {"problem": "What is $2+2$?",
                                             "reasoning": "<think>\n2+2=4\n</think>\n\n\\boxed{4}",
                                             "answer": "4"}
    raw["input"] = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                    {"role": "user", "content": "c"}]
    assert format_record(raw, "nemotron") is None  # multi-turn prompt: not a single problem


def test_non_string_field_names_record_and_problem(tmp_path):
    rows = [conversation("What is 1+1?", "<|begin_of_thought|>\n\n2\n\n<|end_of_thought|>\n\n\\boxed{2}"),
            conversation("What is 2+2?", 4)]
    with pytest.raises(SourceError, match=r"record 1 \(problem: 'What is 2\+2\?'\).*int, expected a string"):
        load_reasoning_dataset(write_jsonl(tmp_path / "bad.jsonl", rows), source="json", n_train=1, n_val=0)
    with pytest.raises(ValueError, match=r"record 7 .*field prompt is NoneType"):
        format_record({"prompt": None, "llm_response": "x</think>y"}, "synthetic1", index=7)


def test_wrong_schema_is_an_error_naming_the_record():
    with pytest.raises(SourceError, match=r"record 3 .*no field\(s\) \['conversations'\]"):
        format_record({"problem": "p", "reasoning": "r"}, "conversations", index=3)
    with pytest.raises(SourceError, match=r"role\(s\) \['robot'\]"):
        format_record({"conversations": [{"from": "robot", "value": "x"}]}, "conversations", index=0)
    with pytest.raises(SourceError, match="unknown schema"):
        format_record({}, "sharegpt")
    with pytest.raises(SourceError, match="cannot tell the schema"):
        infer_schema(["question", "response"])


def test_split_is_deterministic_and_sized(tmp_path):
    rows = [{"problem": f"p{i}", "reasoning": f"<think>t{i}</think>\\boxed{{{i}}}", "answer": str(i)}
            for i in range(40)]
    path = write_jsonl(tmp_path / "records.jsonl", rows)
    a = load_reasoning_dataset(path, source="json", n_train=30, n_val=5, seed=42)
    b = load_reasoning_dataset(path, source="json", n_train=30, n_val=5, seed=42)
    c = load_reasoning_dataset(path, source="json", n_train=30, n_val=5, seed=7)
    assert a[0] == b[0] and a[1] == b[1]
    assert [r["problem"] for r in a[0]] != [r["problem"] for r in c[0]]
    assert len(a[0]) == 30 and len(a[1]) == 5
    assert len(load_reasoning_dataset(path, source="json", n_val=5)[0]) == 35  # n_train=None: the rest
    with pytest.raises(SourceError, match="40 usable records, fewer than n_val=5 \\+ n_train=36"):
        load_reasoning_dataset(path, source="json", n_train=36, n_val=5)
    with pytest.raises(SourceError, match="no validation size is published.*pass n_val"):
        load_reasoning_dataset(path, source="json")


def test_paper_sizes_are_the_defaults():
    assert (DATASETS["bespoke_stratos17k"].n_train, DATASETS["bespoke_stratos17k"].n_val) == (8000, 1000)
    assert (DATASETS["open_thoughts114k"].n_train, DATASETS["open_thoughts114k"].n_val) == (40000, 1000)
    assert (DATASETS["skyt1"].n_train, DATASETS["skyt1"].n_val) == (8000, 1000)
    assert DATASETS["nemotron"].config == "SFT" and DATASETS["nemotron"].split == "math"


def test_saved_dataset_directory_loads(tmp_path):
    import datasets

    rows = [json.loads(line) for line in (FIXTURES / "skyt1.jsonl").read_text().splitlines()]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "skyt1"))
    train, val, report = load_reasoning_dataset(str(tmp_path / "skyt1"), source="path",
                                                dataset="skyt1", n_train=3, n_val=1)
    assert report.kept == 4 and len(train) == 3 and len(val) == 1


def test_hub_name_offline_fails_fast_with_a_clear_message():
    start = time.perf_counter()
    with pytest.raises(SourceError, match=r"offline mode is on.*source='json'") as err:
        load_reasoning_dataset("bespoke_stratos17k", source="hub")
    assert time.perf_counter() - start < 5
    assert "bespokelabs/Bespoke-Stratos-17k" in str(err.value)
