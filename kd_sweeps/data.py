"""Records → chat-templated token ids → P/CoT/A spans → truncation → label masks → batches.

Every source yields records ``{"problem", "reasoning", "answer"}`` where ``reasoning`` is the
assistant turn (``<think>…</think>`` then the answer). Spans are found on the full tokenized
sequence, then each grid point applies its own truncation and section choice, so one encoded
dataset serves the whole sweep.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field, replace
from typing import Iterator, Optional, Sequence

import torch

from kd_sweeps.sections import (MarkerError, Spans, drop_random_labels, find_spans, label_tensor, random_labels_seed,
                                supervised_tokens)
from kd_sweeps.chat_format import (DataError, check_tokenizer, marker_ids, messages, prompt_messages,  # noqa: F401
                                   template_ids)
from kd_sweeps.synthetic import make_split

log = logging.getLogger(__name__)
IGNORE_INDEX = -100


@dataclass
class Encoded:
    """One full (untruncated) training sequence."""

    input_ids: list[int]
    spans: Spans


@dataclass
class TrainExample:
    input_ids: torch.Tensor  # (T,) the kept window
    labels: torch.Tensor  # (T,) token id where supervised, IGNORE_INDEX elsewhere (not shifted)
    n_supervised: int
    index: int = -1  # position of the full sequence in the encoded list (teacher cache rows)
    window: tuple[int, int] = (0, 0)  # the kept [start, end) of that full sequence
    # truncation.mode=random_labels: (candidates (T,) every target of the chosen sections, trunc,
    # seed); ``labels`` is epoch 0's draw and ``for_epoch`` draws the others. None: fixed labels.
    redraw: Optional[tuple[torch.Tensor, float, int]] = None

    def for_epoch(self, epoch: int) -> "TrainExample":
        """This example as epoch ``epoch`` trains on it: random_labels draws its dropped labels again
        (as many as in every epoch, so ``n_supervised`` holds); any other mode, itself."""
        if self.redraw is None or epoch == 0:
            return self
        candidates, trunc, seed = self.redraw
        mask = drop_random_labels((candidates != IGNORE_INDEX).tolist(), trunc,
                                  random_labels_seed(seed, self.index, epoch))
        labels = torch.where(torch.tensor(mask), candidates, torch.full_like(candidates, IGNORE_INDEX))
        return replace(self, labels=labels)


@dataclass
class EncodeStats:
    kept: int = 0
    too_long: int = 0
    missing_markers: int = 0
    first_errors: list[str] = field(default_factory=list)  # a few messages, to show the user


def load_records(data_cfg, split: str, tokenizer=None, cache_dir=None) -> list[dict]:
    """The records of one split: ``train``, ``val`` (checkpoint selection) or ``test`` (the embedded
    task's held-out problems; real datasets are evaluated on benchmarks instead). A real dataset's
    rows over ``data.max_tokens`` are dropped before its split when the student's ``tokenizer`` is
    given (without it the split is drawn from every usable row); ``cache_dir``: see ``load_encoded``."""
    if data_cfg.source == "synthetic":
        # Test and validation problems are (start, step, count) combinations that training never sees.
        if split == "test":
            return make_split(data_cfg.n_test, data_cfg.seed + 1, data_cfg.min_steps, data_cfg.max_steps, "test")
        if split == "val":  # n_val None: every validation combination (about 45)
            return make_split(data_cfg.n_val or 10**6, data_cfg.seed + 2, data_cfg.min_steps, data_cfg.max_steps, "val")
        return make_split(data_cfg.n_train, data_cfg.seed, data_cfg.min_steps, data_cfg.max_steps, "train")
    from kd_sweeps.sources import records_of

    table, _ = _real_split(data_cfg, split, tokenizer, cache_dir)
    return records_of(table)


def load_encoded(data_cfg, split: str, tokenizer, cache_dir=None, build: bool = True,
                 stop=None) -> tuple[list[Encoded], EncodeStats, dict]:
    """The encoded sequences of one split, their stats and the rows kept at every stage (the run's
    ``data_rows``). A real dataset is formatted and tokenized once per (dataset, tokenizer,
    max_tokens) into ``<cache_dir>/data`` (None: in memory) and read back from there by every later
    call; ``build=False`` (ranks other than 0) waits until another process has built it, ``stop()``
    saying when that process failed."""
    if data_cfg.source == "synthetic":
        encoded, stats = encode(load_records(data_cfg, split), tokenizer, data_cfg.max_tokens)
        return encoded, stats, {"rows": "synthetic", split: stats.kept, "too_long": stats.too_long}
    table, report = _real_split(data_cfg, split, tokenizer, cache_dir, build, stop)
    columns = table.select_columns(["input_ids", "cot_start", "cot_end"])[:]
    encoded = [Encoded(ids, Spans((0, start), (start, end), (end, len(ids))))
               for ids, start, end in zip(columns["input_ids"], columns["cot_start"], columns["cot_end"])]
    if not encoded:
        raise DataError(f"no usable {split} sequence in data.name={data_cfg.name!r}: {report.summary()}; "
                        "raise data.max_tokens or check the records' <think>…</think> markers")
    stats = EncodeStats(kept=len(encoded), too_long=report.too_long or 0, missing_markers=report.missing_markers,
                        first_errors=report.first_dropped[:3])
    return encoded, stats, report.as_dict()


def _real_split(data_cfg, split: str, tokenizer, cache_dir, build: bool = True, stop=None):
    """(the prepared table of ``split``, SourceReport) of a hub / JSON / folder dataset."""
    from pathlib import Path

    from kd_sweeps.prepare import prepared_splits
    from kd_sweeps.sources import DATASETS

    if split == "test":
        raise DataError(f"data.name={data_cfg.name!r} has no test split: evaluate it on eval.benchmarks")
    train, val, report = prepared_splits(
        data_cfg.path or DATASETS[data_cfg.name].hub_id, source=data_cfg.source,
        n_train=data_cfg.n_train, n_val=data_cfg.n_val, seed=data_cfg.seed, split=data_cfg.split,
        dataset=data_cfg.name if data_cfg.name in DATASETS else None, rows=data_cfg.get("rows", "length"),
        tokenizer=tokenizer, max_tokens=data_cfg.max_tokens if tokenizer is not None else None,
        cache_dir=Path(cache_dir).expanduser() / "data" if cache_dir else None,
        num_proc=data_cfg.get("num_proc", 0), build=build, stop=stop)
    log.info("data %s: %s", data_cfg.name, report.summary())
    return (train if split == "train" else val), report


def encode(records: Sequence[dict], tokenizer, max_tokens: int) -> tuple[list[Encoded], EncodeStats]:
    """Template and tokenize every record (no cap), find spans; drop too-long or marker-less ones."""
    think_id, end_id = check_tokenizer(tokenizer)
    out, stats = [], EncodeStats()
    for index, record in enumerate(records):
        bad = [f for f in ("problem", "reasoning") if not isinstance(record.get(f), str)]
        if bad:
            raise DataError(f"record {index}: field(s) {bad} must be strings")
        ids = template_ids(tokenizer, [record])[0]
        if len(ids) > max_tokens:
            stats.too_long += 1
            continue
        try:
            spans = find_spans(ids, think_id, end_id)
        except MarkerError as err:
            stats.missing_markers += 1
            if len(stats.first_errors) < 3:
                stats.first_errors.append(f"record {index}: {err}")
            continue
        out.append(Encoded(ids, spans))
    stats.kept = len(out)
    if not out:
        raise DataError(f"no usable training sequence among {len(records)} records "
                        f"({stats.too_long} longer than data.max_tokens={max_tokens}, "
                        f"{stats.missing_markers} without both markers: {stats.first_errors}); "
                        "raise data.max_tokens or check the records' <think>…</think> markers")
    return out, stats


def training_examples(encoded: Sequence[Encoded], sections: Sequence[str], trunc: float, mode: str,
                      cut_after_think: bool, seed: int) -> tuple[list[TrainExample], int]:
    """Apply one grid point's truncation and sections. Returns examples and how many were skipped
    because no token was left to supervise (they would only add a 0/0 to the loss). With
    ``random_labels`` the labels are epoch 0's draw; ``TrainExample.for_epoch`` gives the others."""
    examples, skipped = [], 0
    for index, enc in enumerate(encoded):
        window, mask = supervised_tokens(len(enc.input_ids), enc.spans, tuple(sections), trunc, mode,
                                         cut_after_think=cut_after_think, seed=random_labels_seed(seed, index, 0))
        n_supervised = sum(mask)
        if n_supervised == 0:
            skipped += 1
            continue
        input_ids, labels = label_tensor(enc.input_ids, window, mask, IGNORE_INDEX)
        redraw = None
        if mode == "random_labels" and trunc < 1.0:  # every target of the sections: trunc 1.0 drops none
            _, every = supervised_tokens(len(enc.input_ids), enc.spans, tuple(sections), 1.0, mode,
                                         cut_after_think=cut_after_think)
            redraw = (label_tensor(enc.input_ids, window, every, IGNORE_INDEX)[1], trunc, seed)
        examples.append(TrainExample(input_ids, labels, n_supervised, index, tuple(window), redraw))
    return examples, skipped


def length_grouped_batches(lengths: Sequence[int], batch_size: int, seed: int,
                           group: int = 64) -> Iterator[list[int]]:
    """Endless batches of indices: shuffle each epoch, sort within groups of ``group`` batches by
    length (little padding), then shuffle the batches. Deterministic for a seed."""
    return (batch for _, batch in epoch_batches(lengths, batch_size, seed, group))


def epoch_batches(lengths: Sequence[int], batch_size: int, seed: int,
                  group: int = 64) -> Iterator[tuple[int, list[int]]]:
    """``length_grouped_batches`` with the epoch each batch belongs to: (epoch, indices)."""
    epoch = 0
    while True:
        rng = random.Random(seed * 7919 + epoch)
        order = list(range(len(lengths)))
        rng.shuffle(order)
        batches = []
        span = batch_size * group
        for start in range(0, len(order), span):
            chunk = sorted(order[start:start + span], key=lambda i: lengths[i])
            batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
        batches = [b for b in batches if len(b) == batch_size]  # equal batches: equal weight per step
        rng.shuffle(batches)
        yield from ((epoch, batch) for batch in batches)
        epoch += 1


def collate(examples: Sequence[TrainExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: input_ids, attention_mask, labels, each (B, T)."""
    width = max(len(e.input_ids) for e in examples)
    batch = len(examples)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((batch, width), dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex.input_ids)
        input_ids[row, :n] = ex.input_ids
        labels[row, :n] = ex.labels
        attention[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
