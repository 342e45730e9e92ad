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
import os
import time
from pathlib import Path
from typing import Callable, Optional

from kd_sweeps.sources import (DATASETS, SourceError, SourceReport, format_row, infer_schema, read_rows,
                               records_of)

log = logging.getLogger(__name__)

ROW_CHOICES = ("length", "paper")
PAPER_ROWS = Path(__file__).parent / "paper_rows"
PAPER_COUNTS = {"bespoke_stratos17k": 9_354, "open_thoughts114k": 42_010, "skyt1": 9_299}  # published lists
FORMAT_VERSION = 1  # bump when formatting changes: caches of the old rows are then not reused
TOKENS_VERSION = 1  # bump when the rendering (chat_format.template_ids) or the span rule changes
PARALLEL_FROM = 50_000  # rows; smaller tables run in this process (no workers to start, no tokenizer to ship)
TOKEN_BATCH = 256  # rows rendered and tokenized per call (one fast-tokenizer batch)


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


def worker_count(num_proc: int, rows: int) -> Optional[int]:
    """Processes for a map over ``rows`` rows: ``num_proc`` if set, else one per CPU (up to 16) for
    large tables; None (this process) for small ones."""
    if num_proc:
        return num_proc if num_proc > 1 else None
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(cpus, 16) if rows >= PARALLEL_FROM and cpus > 1 else None


def _equals(column, value):
    import pyarrow.compute as pc

    return pc.equal(column, value)  # one vectorized compare per Arrow batch


def filter_rows(rows, row_filter, report: SourceReport):
    """Keep the rows the dataset's row filter selects: a column compare over Arrow batches for a
    Dataset. A local copy without the filter's column is taken to be filtered already."""
    if row_filter is None:
        return rows
    column, value = row_filter
    if isinstance(rows, list):
        kept = [r for r in rows if r.get(column) == value] if any(column in r for r in rows) else rows
    elif column in rows.column_names:
        # One vectorized compare per Arrow batch of the one column: workers would only add their start-up.
        kept = rows.with_format("arrow").filter(
            _equals, batched=True, input_columns=[column], fn_kwargs={"value": value}, keep_in_memory=True,
            desc=f"row filter {column}={value}").with_format(None)
    else:
        kept = rows
    report.filtered_out = len(rows) - len(kept)
    return kept


def _formatted_features():
    from datasets import Features, Value

    return Features({"row": Value("int64"), "problem": Value("string"), "reasoning": Value("string"),
                     "answer": Value("string"), "dropped": Value("string"), "think_restored": Value("bool")})


def _token_features():
    from datasets import Features, List, Value

    return Features({"n_tokens": Value("int32"), "input_ids": List(Value("int32")), "cot_start": Value("int32"),
                     "cot_end": Value("int32"), "token_problem": Value("string")})


def format_rows(items, schema: str) -> dict[str, list]:
    """(row number, raw row) pairs -> the formatted table's columns; a dropped row keeps its reason
    in ``dropped`` and empty text."""
    out: dict[str, list] = {name: [] for name in _formatted_features()}
    for row, raw in items:
        record, reason, restored = format_row(raw, schema, row)
        record = record or {"problem": "", "reasoning": "", "answer": ""}
        out["row"].append(row)
        for key in ("problem", "reasoning", "answer"):
            out[key].append(record[key])
        out["dropped"].append(reason or "")
        out["think_restored"].append(restored)
    return out


def _format_batch(batch: dict, indices: list[int], schema: str, row_ids) -> dict[str, list]:
    columns = list(batch)
    rows = (dict(zip(columns, values)) for values in zip(*(batch[c] for c in columns)))
    return format_rows(((int(row_ids[i]) if row_ids is not None else i, raw) for i, raw in zip(indices, rows)), schema)


def _tokenize_batch(batch: dict, tokenizer, max_tokens: int, markers: tuple[int, int]) -> dict[str, list]:
    """Token ids and CoT bounds of each usable formatted row; ids are kept only for rows of at most
    ``max_tokens`` tokens (``n_tokens`` is kept for every usable row: the length stage's count)."""
    from kd_sweeps import chat_format
    from kd_sweeps.sections import MarkerError, find_spans

    n = len(batch["dropped"])
    out = {"n_tokens": [0] * n, "input_ids": [[] for _ in range(n)], "cot_start": [0] * n, "cot_end": [0] * n,
           "token_problem": [""] * n}
    usable = [i for i, why in enumerate(batch["dropped"]) if not why]
    records = [{"problem": batch["problem"][i], "reasoning": batch["reasoning"][i]} for i in usable]
    for i, ids in zip(usable, chat_format.template_ids(tokenizer, records) if records else []):
        out["n_tokens"][i] = len(ids)
        if len(ids) > max_tokens:
            continue
        try:
            out["cot_start"][i], out["cot_end"][i] = find_spans(ids, *markers).cot
        except MarkerError as err:  # the chat template moved or removed a marker
            out["token_problem"][i] = f"markers lost in the chat template ({err})"
            continue
        out["input_ids"][i] = ids
    return out


def _cache_args(folder: Optional[Path], name: str, key: str) -> dict:
    if folder is None:  # the library's default: beside an Arrow source's own cache files, else in memory
        return {}
    return {"cache_file_name": str(folder / f"{name}.arrow"), "new_fingerprint": f"{name}-{key}",
            "load_from_cache_file": True}


def _formatted(table, schema: str, row_ids, folder: Optional[Path], key: str, num_proc: int):
    import numpy as np
    from datasets import Dataset

    if isinstance(table, list):  # a JSON file, read without column typing: formatted here
        ids = row_ids if row_ids is not None else range(len(table))
        return Dataset.from_dict(format_rows(zip(ids, table), schema), features=_formatted_features())
    row_ids = None if row_ids is None else np.asarray(row_ids, dtype=np.int64)  # hashed by bytes, not pickled
    return table.map(_format_batch, batched=True, with_indices=True, fn_kwargs={"schema": schema, "row_ids": row_ids},
                     remove_columns=table.column_names, features=_formatted_features(),
                     num_proc=worker_count(num_proc, len(table)), desc="format rows",
                     **_cache_args(folder, "formatted", key))


def token_file(tokenizer, max_tokens: int) -> str:
    """Name of the token table of ``tokenizer`` (the datasets library's fingerprint of it: vocabulary,
    template, special tokens, its folder's name) at ``max_tokens``."""
    from datasets.fingerprint import Hasher

    return f"tokens-{Hasher.hash(tokenizer)}-{max_tokens}-v{TOKENS_VERSION}"


def _build(table, schema, row_ids, tokenizer, max_tokens, folder, key, token_name, num_proc):
    """The formatted table, with the token columns beside it when a tokenizer is given."""
    formatted = _formatted(table, schema, row_ids, folder, key, num_proc)
    if tokenizer is None:
        return formatted
    from datasets import concatenate_datasets

    from kd_sweeps import chat_format

    markers = chat_format.check_tokenizer(tokenizer)
    tokens = formatted.map(_tokenize_batch, batched=True, batch_size=TOKEN_BATCH, remove_columns=formatted.column_names,
                           fn_kwargs={"tokenizer": tokenizer, "max_tokens": max_tokens, "markers": markers},
                           features=_token_features(), num_proc=worker_count(num_proc, len(formatted)),
                           desc="tokenize rows", **_cache_args(folder, token_name, key))
    return concatenate_datasets([formatted, tokens], axis=1)


def _lock(folder: Path):
    from filelock import FileLock

    folder.mkdir(parents=True, exist_ok=True)
    # flock(2): released by the kernel when its holder dies, so a killed build never blocks the next one
    return FileLock(str(folder) + ".lock")


def _wait_ready(ready: Path, stop: Optional[Callable[[], bool]], poll_s: float = 1.0) -> None:
    """Another process (rank 0) prepares these tables: wait for its marker. Polled, not a collective:
    tokenizing a large dataset can outlast a process group's timeout."""
    while not ready.exists():
        if stop is not None and stop():
            raise SourceError(f"the process preparing {ready.parent} stopped before it finished ({ready.name})")
        time.sleep(poll_s)


def _prepared_table(table, schema, row_ids, tokenizer, max_tokens, cache_dir, label, key, num_proc, build, stop):
    """(formatted [+ token] table, whether this process built it). With a cache_dir the tables are
    built once under a lock and read back by everyone else; ``build=False`` waits for a builder."""
    token_name = token_file(tokenizer, max_tokens) if tokenizer is not None else "formatted"
    if cache_dir is None:
        return _build(table, schema, row_ids, tokenizer, max_tokens, None, key, token_name, num_proc), True
    folder = Path(cache_dir).expanduser() / f"{label}-{key}"
    ready = folder / f"{token_name}.ready"
    if not build:
        _wait_ready(ready, stop)
    with _lock(folder):
        fresh, started = not ready.exists(), time.perf_counter()
        prepared = _build(table, schema, row_ids, tokenizer, max_tokens, folder, key, token_name, num_proc)
        if fresh:
            seconds = time.perf_counter() - started
            ready.write_text(json.dumps({"rows": len(prepared), "seconds": seconds, "pid": os.getpid()}))
            log.info("prepared %d rows into %s in %.1f s", len(prepared), folder, seconds)
    return prepared, fresh


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
    prepared, report.prepared_here = _prepared_table(table, schema, row_ids, tokenizer, max_tokens, cache_dir,
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
