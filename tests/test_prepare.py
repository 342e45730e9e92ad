"""The paper's rows: length filter before the split, the authors' published rows and split, every
stage counted, formatting and tokenizing done once and read back from the datasets library's cache."""

from __future__ import annotations

import gzip
import json
import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from kd_sweeps import data, prepare  # noqa: E402  (offline mode must be set before datasets loads)
from kd_sweeps.sources import SourceError, format_record  # noqa: E402
from tests.qwen3_hub import QWEN3_FIXTURES, STUDENT, TOKENIZER_FILES  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "datasets"
NAMES = ("bespoke_stratos17k", "open_thoughts114k", "skyt1", "synthetic1", "nemotron")
SCHEMA = {"bespoke_stratos17k": "conversations", "open_thoughts114k": "conversations", "skyt1": "conversations",
          "synthetic1": "synthetic1", "nemotron": "nemotron"}
LIMIT = 74  # tokens: drops a few rows of four of the five fixtures with the real Qwen3 tokenizer


@pytest.fixture(scope="module")
def qwen3_tokenizer(tmp_path_factory):
    """Qwen3-4B-Base's real tokenizer files (no weights: only token counts matter here)."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("qwen3") / STUDENT
    folder.mkdir()
    for path in [*(QWEN3_FIXTURES / "shared").iterdir(), *(QWEN3_FIXTURES / STUDENT / f for f in TOKENIZER_FILES)]:
        if path.exists():
            shutil.copy(path, folder / path.name)
    return AutoTokenizer.from_pretrained(folder)


def fixture_rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (FIXTURES / f"{name}.jsonl").read_text().splitlines()]


def conversation(i: int, usable: bool = True) -> dict:
    thought = f"<|begin_of_thought|>\n\nstep {i}\n\n<|end_of_thought|>" if usable else f"no thought {i}"
    return {"system": "s", "conversations": [
        {"from": "user", "value": f"problem {i}"},
        {"from": "assistant", "value": f"{thought}\n\n<|begin_of_solution|>\n\n\\boxed{{{i}}}\n\n<|end_of_solution|>"}]}


def test_published_lists_have_the_papers_lengths():
    for name, count in {"bespoke_stratos17k": 9_354, "skyt1": 9_299, "open_thoughts114k": 42_010}.items():
        rows = prepare.published_rows(name)
        assert len(rows) == count == prepare.PAPER_COUNTS[name]
        assert rows == sorted(set(rows)) and rows[0] >= 0
        with gzip.open(prepare.PAPER_ROWS / f"{name}.json.gz", "rt") as f:
            meta = json.load(f)
        assert meta["count"] == count and "weiruichen01/distilling-the-essence" in meta["source"]
    assert (prepare.PAPER_ROWS / "LICENSE").read_text().startswith("BSD 2-Clause License")


def test_paper_rows_are_the_authors_select_then_split(tmp_path):
    """rows=paper on a Bespoke-sized table: the rows are those of the authors' calls, and rows whose
    markers are unusable are dropped from the split (counted), not replaced."""
    from datasets import Dataset

    raw = Dataset.from_list([conversation(i, usable=i % 997 != 0) for i in range(16_710)])
    raw.save_to_disk(str(tmp_path / "bespoke"))
    listed = prepare.published_rows("bespoke_stratos17k")
    parts = raw.select(listed).train_test_split(test_size=100, seed=42)  # the authors' calls
    want_train = [c[0]["value"] for c in parts["train"].select(range(500))["conversations"]]
    want_val = [c[0]["value"] for c in parts["test"]["conversations"]]

    train, val, report = prepare.prepared_splits(str(tmp_path / "bespoke"), source="path", dataset="bespoke_stratos17k",
                                                 rows="paper", n_train=500, n_val=100, seed=42)
    unusable = {f"problem {i}" for i in range(0, 16_710, 997)}
    assert train["problem"] == [p for p in want_train if p not in unusable]
    assert val["problem"] == [p for p in want_val if p not in unusable]
    dropped = len(unusable & set(want_train + want_val))
    assert dropped > 0 and report.dropped == {"no </think>": dropped}
    assert (report.rows, report.selected, report.kept) == (16_710, 9_354, 600 - dropped)
    assert train["row"] == [int(p.split()[1]) for p in train["problem"]]  # the raw table's row numbers


def test_split_is_the_librarys_train_test_split():
    from datasets import Dataset

    table = Dataset.from_dict({"x": list(range(50))})
    train, val = prepare.split_rows(table, n_train=30, n_val=7, seed=3)
    direct = table.train_test_split(test_size=7, seed=3)
    assert train["x"] == direct["train"]["x"][:30] and val["x"] == direct["test"]["x"]
    train, val = prepare.split_rows(table, n_train=None, n_val=0, seed=3)  # no validation: the same permutation
    assert train["x"] == table.shuffle(seed=3)["x"] and len(val) == 0


def _reference_lengths(name: str, tokenizer) -> dict[int, int]:
    """Row -> token count, computed row by row with format_record and the chat template."""
    rows = fixture_rows(name)
    if name == "synthetic1":
        rows = [r for r in rows if r["task_type"] == "verifiable_math"]
    lengths = {}
    for i, raw in enumerate(rows):
        record = format_record(raw, SCHEMA[name], i)
        if record is not None:
            lengths[i] = len(tokenizer.apply_chat_template(data.messages(record), tokenize=True,
                                                           return_dict=True)["input_ids"])
    return lengths


@pytest.mark.parametrize("name", NAMES)
def test_length_filter_comes_before_the_split(name, qwen3_tokenizer, tmp_path):
    lengths = _reference_lengths(name, qwen3_tokenizer)
    short = sorted(i for i, n in lengths.items() if n <= LIMIT)
    train, val, report = prepare.prepared_splits(
        str(FIXTURES / f"{name}.jsonl"), source="json", dataset=name, n_train=len(short) - 1, n_val=1, seed=42,
        tokenizer=qwen3_tokenizer, max_tokens=LIMIT, cache_dir=tmp_path)
    assert report.too_long == len(lengths) - len(short) and report.kept == len(short)
    assert sorted(train["row"][:] + val["row"][:]) == short  # every short row, none of the long ones
    assert len(val) == 1 and len(train) == len(short) - 1
    assert all(lengths[r] == n for r, n in zip(train["row"], train["n_tokens"]))
    assert [len(ids) for ids in train["input_ids"]] == train["n_tokens"][:]


def test_a_row_of_exactly_max_tokens_is_kept(qwen3_tokenizer):
    lengths = _reference_lengths("bespoke_stratos17k", qwen3_tokenizer)
    exact = lengths[0]
    kept = {limit: prepare.prepared_splits(str(FIXTURES / "bespoke_stratos17k.jsonl"), source="json", n_train=None,
                                           n_val=0, tokenizer=qwen3_tokenizer, max_tokens=limit)[0]["row"]
            for limit in (exact, exact - 1)}
    assert 0 in kept[exact] and 0 not in kept[exact - 1]


def test_too_few_rows_name_the_keys_and_the_counts(qwen3_tokenizer):
    with pytest.raises(SourceError, match=r"2 usable records, fewer than n_val=1 \+ n_train=3 \(data.n_val \+ "
                                          r"data.n_train\).*2 longer than max_tokens=74"):
        prepare.prepared_splits(str(FIXTURES / "bespoke_stratos17k.jsonl"), source="json", n_train=3, n_val=1,
                                tokenizer=qwen3_tokenizer, max_tokens=LIMIT)


def test_a_second_grid_point_reads_the_cache_without_tokenizing(qwen3_tokenizer, tmp_path, monkeypatch):
    path = str(FIXTURES / "open_thoughts114k.jsonl")
    args = dict(source="json", dataset="open_thoughts114k", n_train=2, n_val=1, tokenizer=qwen3_tokenizer,
                max_tokens=4096, cache_dir=tmp_path)
    first = prepare.prepared_splits(path, **args)
    files = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("tokens-*.arrow")}  # (split index files may be rewritten)
    assert first[2].prepared_here and files

    def no_tokenizing(*_):
        raise AssertionError("tokenized again")

    from kd_sweeps import chat_format

    monkeypatch.setattr(chat_format, "template_ids", no_tokenizing)
    again = prepare.prepared_splits(path, **args)
    assert not again[2].prepared_here
    assert again[0]["input_ids"] == first[0]["input_ids"] and again[1]["row"] == first[1]["row"]
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("tokens-*.arrow")} == files
    with pytest.raises(AssertionError, match="tokenized again"):  # another limit is another token table
        prepare.prepared_splits(path, **{**args, "max_tokens": 100})


def test_other_ranks_wait_for_the_builder_then_read_its_tables(qwen3_tokenizer, tmp_path, monkeypatch):
    """Rank 1 (build=False) starts first and waits; rank 0 builds; only rank 0 tokenizes."""
    import threading

    path = str(FIXTURES / "skyt1.jsonl")
    args = dict(source="json", dataset="skyt1", n_train=2, n_val=1, tokenizer=qwen3_tokenizer, max_tokens=4096,
                cache_dir=tmp_path)
    with pytest.raises(SourceError, match="stopped before it finished"):  # rank 0 failed before building
        prepare.prepared_splits(path, **args, build=False, stop=lambda: True)
    from kd_sweeps import chat_format

    calls, tokenize = [], chat_format.template_ids
    monkeypatch.setattr(chat_format, "template_ids", lambda *a: calls.append(threading.current_thread().name) or tokenize(*a))
    waited = {}
    rank1 = threading.Thread(target=lambda: waited.update(out=prepare.prepared_splits(path, **args, build=False)),
                             name="rank1")
    rank1.start()
    rank1.join(timeout=1.5)
    assert rank1.is_alive() and not calls  # still waiting: nothing was built yet
    built = prepare.prepared_splits(path, **args)
    rank1.join(timeout=30)
    assert calls == ["MainThread"]  # one batch, tokenized by rank 0 alone
    assert built[2].prepared_here and not waited["out"][2].prepared_here
    assert waited["out"][0]["input_ids"] == built[0]["input_ids"] and waited["out"][1]["row"] == built[1]["row"]


def test_paper_rows_need_a_published_list(tmp_path):
    with pytest.raises(SourceError, match=r"no published row list for data.name='nemotron'.*data.rows=length"):
        prepare.prepared_splits(str(FIXTURES / "nemotron.jsonl"), source="json", dataset="nemotron", rows="paper",
                                n_val=1)
    with pytest.raises(SourceError, match=r"data.n_val=1000 \+ data.n_train=9000 is more than the 9299 rows"):
        prepare.prepared_splits("skyt1", source="hub", rows="paper", n_train=9000)
    with pytest.raises(SourceError, match=r"numbers rows up to 16682, but .* has 6 rows"):  # not the hub's copy
        prepare.prepared_splits(str(FIXTURES / "bespoke_stratos17k.jsonl"), source="json",
                                dataset="bespoke_stratos17k", rows="paper", n_train=2, n_val=1)


def test_validation_refuses_paper_rows_it_cannot_select(compose):
    from kd_sweeps.validation import ConfigError, validate

    with pytest.raises(ConfigError) as err:
        validate(compose(["data=nemotron", "data.rows=paper"]))
    assert "data.rows=paper with data.name='nemotron'" in str(err.value)
    with pytest.raises(ConfigError, match="data.n_train=9000 \\+ data.n_val=1000: more than the 9354 rows"):
        validate(compose(["data=bespoke_stratos17k", "data.rows=paper", "data.n_train=9000"]))
    validate(compose(["data=skyt1", "data.rows=paper", "eval=math"]))


def test_load_encoded_gives_what_encode_gives(qwen3_tokenizer, tmp_path):
    from omegaconf import OmegaConf

    from kd_sweeps.schema import DataConfig

    data_cfg = OmegaConf.structured(DataConfig(name="skyt1", source="json", path=str(FIXTURES / "skyt1.jsonl"),
                                               n_train=3, n_val=1, max_tokens=4096))
    for split in ("train", "val"):
        encoded, stats, rows = data.load_encoded(data_cfg, split, qwen3_tokenizer, tmp_path)
        plain, _ = data.encode(data.load_records(data_cfg, split, qwen3_tokenizer), qwen3_tokenizer, 4096)
        assert [(e.input_ids, e.spans) for e in encoded] == [(e.input_ids, e.spans) for e in plain]
        assert stats.kept == len(encoded) and (rows["read"], rows["kept"], rows["train"], rows["val"]) == (5, 4, 3, 1)
        assert rows["dropped_by_reason"] == {"no </think>": 1} and rows["too_long"] == 0


def test_a_large_source_is_filtered_and_formatted_by_worker_processes(tmp_path):
    """SYNTHETIC-1's task-type filter as an Arrow column compare, formatting in 2 worker processes:
    the same rows as in one process."""
    from datasets import Dataset

    rows = [{"prompt": f"q{i}", "llm_response": f"t{i}</think>\\boxed{{{i}}}" if i % 5 else f"t{i}",
             "task_type": "verifiable_math" if i % 3 else "code_output_prediction"} for i in range(600)]
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "s1"))
    results = [prepare.prepared_splits(str(tmp_path / "s1"), source="path", dataset="synthetic1", n_train=300,
                                       n_val=20, num_proc=procs, cache_dir=tmp_path / f"cache{procs}")
               for procs in (1, 2)]
    (train1, val1, report1), (train2, val2, report2) = results
    assert report1.filtered_out == 200 and report1.dropped == {"no </think>": 80} and report1.think_restored == 320
    assert train1["problem"] == train2["problem"] and val1["problem"] == val2["problem"]
    assert [p.name for p in sorted((tmp_path / "cache2").rglob("formatted*.arrow"))] == \
        ["formatted_00000_of_00002.arrow", "formatted_00001_of_00002.arrow"]  # two workers wrote them
    assert report1.as_dict() == report2.as_dict()


def test_duplicated_records_are_counted_and_kept_out_of_validation(tmp_path):
    """Rows 0-9 distinct, then rows 0-4 again: 5 duplicates, counted; the training split keeps them
    (as the source has them), and no validation row equals a training row."""
    rows = [conversation(i) for i in range(10)] + [conversation(i) for i in range(5)]
    path = tmp_path / "dup.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train, val, report = prepare.prepared_splits(str(path), source="json", schema="conversations",
                                                 n_train=None, n_val=6, seed=0)
    assert report.duplicates == 5
    train_problems = set(train["problem"])
    assert not set(val["problem"]) & train_problems
    assert report.val_overlap == 6 - len(val) and report.val_overlap > 0  # seed 0 puts some repeats in val
    assert report.as_dict()["val_overlap_removed"] == report.val_overlap
    assert "5 duplicated" in report.summary() and "removed from val" in report.summary()
    distinct = tmp_path / "distinct.jsonl"
    distinct.write_text("".join(json.dumps(conversation(i)) + "\n" for i in range(10)))
    _, val, report = prepare.prepared_splits(str(distinct), source="json", schema="conversations",
                                             n_train=None, n_val=3, seed=0)
    assert report.duplicates == 0 and report.val_overlap == 0 and len(val) == 3
