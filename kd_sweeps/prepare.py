"""A real dataset's rows on their way to training: read → row filter → (the authors' rows) → format →
tokenize → length filter → split, every stage counted, the heavy stages cached by the datasets library.

``data.rows`` chooses the rows:

- ``length`` (default): every row is formatted (``sources.format_record``) and rendered with the
  student's chat template (``chat_format.template_ids``, the ids training sees); rows longer than
  ``data.max_tokens`` tokens are dropped (a row of exactly ``max_tokens`` fits the training window
  untruncated and is kept), and only then is the rest split. This rebuilds the authors' "rows under
  4k tokens" from the data, for any tokenizer and limit.
- ``paper``: the authors' published row numbers (``kd_sweeps/paper_rows``) are selected and split as
  they split them, then formatted and tokenized; rows dropped for their markers or length are
  counted, never replaced by others.

The split is the library's ``Dataset.train_test_split(test_size=n_val, seed=seed)``, training the first
``n_train`` rows of its train part: the authors' own calls, so a seed picks the same rows.

Cache: the formatted table and the token table are ``Dataset.map`` outputs (Arrow files, memory-mapped
when read) under ``<cache_dir>/<name>-<key>/``; ``key`` hashes what the formatted rows depend on (the
source's fingerprint or file hash, schema, row filter, chosen rows, format version), and the token file
is named by the tokenizer's fingerprint and ``max_tokens``. One process builds them under a file lock;
other processes and grid points with the same key load them without formatting or tokenizing again.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
from pathlib import Path
from typing import Callable, Optional

from kd_sweeps.choices import Rows, values
from kd_sweeps.prepare_table import filter_rows, prepared_table
from kd_sweeps.sources import DATASETS, SourceError, SourceReport, infer_schema, read_rows, records_of

log = logging.getLogger(__name__)

ROW_CHOICES = values(Rows)
PAPER_ROWS = Path(__file__).parent / "paper_rows"
PAPER_COUNTS = {"bespoke_stratos17k": 9_354, "open_thoughts114k": 42_010, "skyt1": 9_299}  # published lists
FORMAT_VERSION = 1  # bump when formatting changes: caches of the old rows are then not reused


def published_rows(name: str) -> list[int]:
    """The authors' row numbers for DATASETS ``name`` (0-based rows of its train split)."""
    if name not in PAPER_COUNTS:
        raise SourceError(f"data.rows=paper: no published row list for data.name={name!r}; the authors' "
                          f"lists exist for {', '.join(PAPER_COUNTS)} (those of SYNTHETIC-1 and Nemotron "
                          "are not in their repository); use data.rows=length")
    with gzip.open(PAPER_ROWS / f"{name}.json.gz", "rt", encoding="utf-8") as f:
        return json.load(f)["rows"]


def split_rows(table, n_train: Optional[int], n_val: int, seed: int):
    """The authors' split of ``table`` (a Dataset): ``train_test_split(test_size=n_val, seed=seed)``,
    then the first ``n_train`` rows of its train part (all of it for None). n_val=0 shuffles with the
    same permutation (the library refuses test_size=0). The parts are index mappings onto ``table``
    (for a cached table the library keeps them beside it, named by fingerprint), not copies."""
    if n_val == 0:
        train, val = table.shuffle(seed=seed, keep_in_memory=True), table.select([], keep_in_memory=True)
    else:
        parts = table.train_test_split(test_size=n_val, seed=seed)
        train, val = parts["train"], parts["test"]
    return (train.select(range(n_train), keep_in_memory=True) if n_train is not None else train), val


def _usable(table, report: SourceReport, max_tokens: Optional[int], tokens: bool):
    """The rows of ``table`` that train: drops (by reason) and rows over ``max_tokens`` are counted
    into ``report``. Arrow compute over a few columns; the token ids are not read."""
    import pyarrow.compute as pc

    names = ["row", "dropped", "think_restored"] + (["n_tokens", "token_problem"] if tokens else [])
    cols = table.select_columns(names).with_format("arrow")[:]
    reason = cols["dropped"]
    report.think_restored += pc.sum(pc.filter(cols["think_restored"], pc.equal(reason, ""))).as_py() or 0
    if tokens:
        reason = pc.if_else(pc.equal(reason, ""), cols["token_problem"], reason)
    usable = pc.equal(reason, "")
    keep = usable
    if tokens:
        too_long = pc.and_(usable, pc.greater(cols["n_tokens"], max_tokens))
        report.too_long = (report.too_long or 0) + (pc.sum(too_long).as_py() or 0)
        keep = pc.and_(usable, pc.invert(too_long))
    bad = pc.invert(usable)
    for item in pc.value_counts(pc.filter(reason, bad)).to_pylist():
        report.dropped[item["values"]] += item["counts"]
    first = pc.indices_nonzero(bad).to_pylist()[: max(0, 5 - len(report.first_dropped))]
    report.first_dropped += [f"record {cols['row'][i].as_py()}: {reason[i].as_py()}" for i in first]
    return table.select(pc.indices_nonzero(keep).to_numpy().astype("int64"), keep_in_memory=True)


def _format_key(source_id: str, schema: str, row_filter, rows: str, row_ids) -> str:
    listed = hashlib.sha256(json.dumps(row_ids).encode()).hexdigest() if row_ids is not None else None
    fields = {"source": source_id, "schema": schema, "row_filter": row_filter, "rows": rows, "row_ids": listed,
              "format": FORMAT_VERSION}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def _check_request(name_or_path, source, dataset, schema, rows, n_train, n_val):
    """(spec, n_train, n_val) with the dataset's published sizes filled in; raises before any read."""
    from kd_sweeps.sources import SCHEMAS

    if source not in ("hub", "json", "path"):
        raise SourceError(f"source={source!r}; choose 'hub', 'json' or 'path'")
    if dataset is not None and dataset not in DATASETS:
        raise SourceError(f"unknown dataset {dataset!r}; known: {', '.join(DATASETS)}")
    if schema is not None and schema not in SCHEMAS:
        raise SourceError(f"unknown schema {schema!r}; known: {', '.join(SCHEMAS)}")
    if rows not in ROW_CHOICES:
        raise SourceError(f"data.rows={rows!r}: must be one of {', '.join(ROW_CHOICES)}")
    # A hub name outside DATASETS is read as a raw hub id, its schema inferred from its columns.
    name = dataset or (name_or_path if source == "hub" else None)
    spec = DATASETS.get(name or "")
    n_val = n_val if n_val is not None else (spec.n_val if spec else None)
    n_train = n_train if n_train is not None else (spec.n_train if spec else None)
    if n_val is None:
        raise SourceError(f"{name_or_path!r}: no validation size is published for this dataset; pass n_val")
    if n_val < 0 or (n_train is not None and n_train < 0):
        raise SourceError(f"n_train={n_train} and n_val={n_val} must not be negative")
    if rows == "paper":
        count = len(published_rows(name or ""))  # a clear error for a dataset without a list
        if n_val + (n_train or 1) > count:
            raise SourceError(f"data.rows=paper: data.n_val={n_val} + data.n_train={n_train} is more than the "
                              f"{count} rows the authors published for {name}")
    return spec, n_train, n_val, name


def _select_published(table, name: str, report: SourceReport, where: str):
    row_ids = published_rows(name)
    if row_ids[-1] >= len(table):  # sorted: the last is the largest
        raise SourceError(f"data.rows=paper: the authors' list for {name} numbers rows up to {row_ids[-1]}, but "
                          f"{where} has {len(table)} rows after the row filter; it numbers the rows of "
                          f"{DATASETS[name].hub_id} (split train): use that copy, or data.rows=length")
    report.selected = len(row_ids)
    if isinstance(table, list):
        return [table[i] for i in row_ids], row_ids
    import numpy as np

    chosen = table.select(np.asarray(row_ids, dtype=np.int64), keep_in_memory=True)
    return chosen, row_ids


def _read(name_or_path: str, source: str, spec, split, schema):
    """(raw rows, their schema, an id of their content for the cache key)."""
    table = read_rows(name_or_path, source, spec, split)
    if len(table) == 0:
        raise SourceError(f"{name_or_path!r} ({source}) holds no rows: point data.path at a file or folder "
                          "with records")
    columns = table.column_names if hasattr(table, "column_names") else {k for r in table[:100] for k in r}
    schema = schema or (spec.schema if spec else infer_schema(columns))
    # A Dataset's fingerprint is the library's hash of its content (files, or saved state); a JSON file's, its bytes'.
    source_id = hashlib.sha256(Path(name_or_path).read_bytes()).hexdigest() if isinstance(table, list) \
        else table._fingerprint
    return table, schema, source_id


def prepared_splits(name_or_path: str, *, source: str = "hub", n_train: Optional[int] = None,
                    n_val: Optional[int] = None, seed: int = 42, split: Optional[str] = None,
                    dataset: Optional[str] = None, schema: Optional[str] = None, rows: str = "length",
                    tokenizer=None, max_tokens: Optional[int] = None, cache_dir=None, num_proc: int = 0,
                    build: bool = True, stop: Optional[Callable[[], bool]] = None):
    """(train, val, SourceReport): two Datasets with columns row, problem, reasoning, answer (and,
    with a tokenizer, input_ids, n_tokens, cot_start, cot_end), the rows of ``data.rows``, split.

    Arguments as ``load_reasoning_dataset``, and: rows ("length" | "paper"); tokenizer (the
    student's; None: formatting only, no length stage); max_tokens (the length limit, kept when
    ``<=``); cache_dir (where the tables are cached; None: not shared); num_proc (map workers, 0:
    automatic); build=False waits for another process to build the cache; ``stop`` says when to
    give up waiting (that process failed).
    """
    spec, n_train, n_val, name = _check_request(name_or_path, source, dataset, schema, rows, n_train, n_val)
    if tokenizer is not None and max_tokens is None:
        raise SourceError("a tokenizer was given without max_tokens (data.max_tokens)")
    table, schema, source_id = _read(name_or_path, source, spec, split, schema)
    report = SourceReport(source=spec.hub_id if spec and source == "hub" else name_or_path, schema=schema,
                          choice=rows, rows=len(table), max_tokens=max_tokens if tokenizer is not None else None)
    # A local SYNTHETIC-1 copy gets SYNTHETIC-1's filter even when not named: the schema says what it is.
    row_filter = spec.row_filter if spec else (DATASETS["synthetic1"].row_filter if schema == "synthetic1" else None)
    table = filter_rows(table, row_filter, report)
    row_ids = None
    if rows == "paper":
        table, row_ids = _select_published(table, name, report, name_or_path)
    key = _format_key(source_id, schema, row_filter, rows, row_ids)
    prepared, report.prepared_here = prepared_table(table, schema, row_ids, tokenizer, max_tokens, cache_dir,
                                                     name or "data", key, num_proc, build, stop)
    tokens = tokenizer is not None
    if rows == "paper":  # the authors' split of their rows, then the drops (counted, not replaced)
        train, val = split_rows(prepared, n_train, n_val, seed)
        train, val = _usable(train, report, max_tokens, tokens), _usable(val, report, max_tokens, tokens)
        report.kept = len(train) + len(val)
    else:  # the drops and the length filter first, then the split of what is left
        kept = _usable(prepared, report, max_tokens, tokens)
        report.kept = len(kept)
        if report.kept < n_val + (n_train if n_train is not None else 1):
            raise SourceError(f"{name_or_path!r}: {report.kept} usable records, fewer than n_val={n_val} + n_train="
                              f"{n_train if n_train is not None else 'at least 1'} (data.n_val + data.n_train). "
                              + report.summary())
        train, val = split_rows(kept, n_train, n_val, seed)
    val = _without_duplicates(train, val, report)
    report.n_train, report.n_val = len(train), len(val)
    return train, val, report


def _record_keys(table, batch: int = 4096):
    """A key per row from its problem and reasoning (what a duplicate repeats), read a batch of rows
    at a time: the text of a large source is never all in memory. Python's string hash is salted per
    process, so the keys are compared within this call only."""
    if isinstance(table, list):
        yield from (hash((r["problem"], r["reasoning"])) for r in table)
        return
    for start in range(0, len(table), batch):
        rows = table.select_columns(["problem", "reasoning"])[start:start + batch]
        yield from map(hash, zip(rows["problem"], rows["reasoning"]))


def _without_duplicates(train, val, report: SourceReport):
    """Count the usable rows that repeat an earlier one (a dataset's duplicates train as the source
    has them: the paper's runs saw them too), and take out of ``val`` the rows equal to a training
    row, so that the validation loss is not measured on what the student trained on."""
    seen, in_train = set(), set()
    for key in _record_keys(train):
        report.duplicates += key in seen
        seen.add(key)
        in_train.add(key)
    overlap = []
    for index, key in enumerate(_record_keys(val)):
        report.duplicates += key in seen
        seen.add(key)
        if key in in_train:
            overlap.append(index)
    report.val_overlap = len(overlap)
    if not overlap:
        return val
    log.warning("%d validation row(s) repeat a training row: removed from the validation split", len(overlap))
    gone = set(overlap)
    keep = [i for i in range(len(val)) if i not in gone]
    return [val[i] for i in keep] if isinstance(val, list) else val.select(keep, keep_in_memory=True)


def load_reasoning_dataset(name_or_path: str, *, source: str = "hub", n_train: int | None = None,
                           n_val: int | None = None, seed: int = 42, split: str | None = None,
                           dataset: str | None = None, schema: str | None = None, **options):
    """Load a reasoning dataset, format it, drop marker-less records, split it.

    name_or_path: a name in DATASETS or a hub id (source="hub"), a JSON/JSONL file
        (source="json"), or a dataset directory from ``save_to_disk`` or of data files
        (source="path").
    dataset: for a local copy, the DATASETS name it is a copy of (its schema, row filter and
        default sizes); schema: force a schema (otherwise the dataset's, or inferred from columns).
    n_train, n_val: sizes; default to the paper's for the named dataset. n_train=None with no
        paper size keeps every record not used for validation.
    split: the split of a hub dataset or directory (default: the dataset's own, "math" for
        Nemotron, else "train"); a JSON file is one split.
    options: ``rows``, ``tokenizer``, ``max_tokens``, ``cache_dir``, ``num_proc`` of
        ``prepared_splits`` (the length filter needs the student's tokenizer).

    The split is ``Dataset.train_test_split(test_size=n_val, seed=seed)``; training takes the first
    n_train rows of its train part. Returns (train_records, val_records, SourceReport).
    """
    train, val, report = prepared_splits(name_or_path, source=source, n_train=n_train, n_val=n_val, seed=seed,
                                         split=split, dataset=dataset, schema=schema, **options)
    return records_of(train), records_of(val), report
