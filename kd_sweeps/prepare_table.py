"""The heavy stages of ``kd_sweeps.prepare``: the row filter, formatting and tokenizing a real dataset
as ``Dataset.map`` passes (worker processes from ``PARALLEL_FROM`` rows), cached under
``<cache_dir>/<name>-<key>/`` by one process under a file lock while the others wait and load."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Callable, Optional

from kd_sweeps.sources import SourceError, SourceReport, format_row

log = logging.getLogger(__name__)
TOKENS_VERSION = 1  # bump when the rendering (chat_format.template_ids) or the span rule changes
PARALLEL_FROM = 50_000  # rows; smaller tables run in this process (no workers to start, no tokenizer to ship)
TOKEN_BATCH = 256  # rows rendered and tokenized per call (one fast-tokenizer batch)


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


def prepared_table(table, schema, row_ids, tokenizer, max_tokens, cache_dir, label, key, num_proc, build, stop):
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
