"""Section spans and truncation windows for reasoning distillation.

A training sequence is split into three sections:

* ``P``   - prompt: every token before the first ``<think>`` (chat-template tokens included);
* ``CoT`` - chain of thought: the first ``<think>`` through the first ``</think>``, both markers included;
* ``A``   - answer: every token after that ``</think>``.

Spans are located on the FULL sequence before any truncation, so cutting off ``</think>``
can never make a boundary disappear or be borrowed from another example. The supervised
mask is then (chosen sections) ∩ (kept window) ∩ (positions that have a predecessor in
the window).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import torch

from kd_sweeps.choices import Section, SectionsPreset, TruncationMode, values

SECTIONS = values(Section)
SECTION_PRESETS = {  # the six section combinations compared in the paper (sections.name; or custom)
    SectionsPreset.all: ("P", "CoT", "A"),
    SectionsPreset.prompt_cot: ("P", "CoT"),
    SectionsPreset.cot: ("CoT",),
    SectionsPreset.cot_ans: ("CoT", "A"),
    SectionsPreset.ans: ("A",),
    SectionsPreset.prompt_ans: ("P", "A"),
}
TRUNCATION_MODES = values(TruncationMode)


class MarkerError(ValueError):
    """A reasoning marker is missing or the markers are out of order."""


@dataclass(frozen=True)
class Spans:
    """Half-open ``[start, end)`` token-index spans on the full (untruncated) sequence."""

    prompt: tuple[int, int]
    cot: tuple[int, int]
    answer: tuple[int, int]

    def of(self, section: str) -> tuple[int, int]:
        if section == "P":
            return self.prompt
        if section == "CoT":
            return self.cot
        if section == "A":
            return self.answer
        raise ValueError(f"unknown section {section!r}; allowed: {SECTIONS}")


def find_spans(token_ids: Sequence[int], think_id: int, end_think_id: int) -> Spans:
    """Locate P / CoT / A using the first occurrence of each marker."""
    if think_id == end_think_id:
        raise ValueError("think_id and end_think_id must differ")
    ids = list(token_ids)
    try:
        start = ids.index(think_id)
    except ValueError:
        start = -1
    try:
        end = ids.index(end_think_id)
    except ValueError:
        end = -1
    if start < 0 and end < 0:
        raise MarkerError(
            f"both markers missing: <think> (id {think_id}) and </think> (id {end_think_id})"
        )
    if start < 0:
        raise MarkerError(f"marker <think> (id {think_id}) missing")
    if end < 0:
        raise MarkerError(f"marker </think> (id {end_think_id}) missing")
    if end < start:
        raise MarkerError(
            f"marker </think> (id {end_think_id}) at token {end} comes before "
            f"<think> (id {think_id}) at token {start}"
        )
    length = len(ids)
    # CoT ends one past </think> so the closing marker itself is supervised as CoT, but
    # the first answer token is not (the reference code kept one extra token here).
    return Spans(prompt=(0, start), cot=(start, end + 1), answer=(end + 1, length))


def cut_after_think(length: int, spans: Spans) -> int:
    """New sequence length (tokens) once everything after the first ``</think>`` is dropped."""
    return min(length, spans.cot[1])


# supervised_tokens takes a flag named ``cut_after_think`` that shadows the function.
cut_after_think_fn = cut_after_think


def _check_trunc(trunc: float) -> None:
    if not (0.0 < trunc <= 1.0):  # also rejects NaN
        raise ValueError(f"trunc must be in (0, 1], got {trunc!r}")


def _check_mode(mode: str) -> None:
    if mode not in TRUNCATION_MODES:
        raise ValueError(f"unknown truncation mode {mode!r}; allowed: {TRUNCATION_MODES}")


def kept_window(length: int, trunc: float, mode: str) -> tuple[int, int]:
    """Token range ``[start, end)`` kept when ``trunc`` of ``length`` tokens survive.

    ``k = max(1, floor(length * trunc))`` tokens are kept (floor, as in the paper;
    at least one so the model always sees something). ``left`` is an alias of ``lead``.
    ``random_labels`` keeps the whole sequence; it thins the labels instead.
    """
    _check_trunc(trunc)
    _check_mode(mode)
    if length < 1:
        raise ValueError(f"length must be >= 1 token, got {length}")
    k = max(1, int(length * trunc))
    if mode in ("lead", "left"):
        return 0, k
    if mode == "middle":
        start = (length - k) // 2  # extra odd token goes to the right-hand drop
        return start, start + k
    if mode == "right":
        return length - k, length
    return 0, length  # random_labels


def _check_sections(sections: Sequence[str]) -> tuple[str, ...]:
    if isinstance(sections, str):
        # A bare string would be iterated character by character; make the caller
        # say ("CoT",) or SECTION_PRESETS["cot"] explicitly.
        raise ValueError(
            f"sections must be a sequence of names from {SECTIONS}, not the string {sections!r}; "
            f"presets: {tuple(SECTION_PRESETS)}"
        )
    chosen = tuple(sections)
    if not chosen:
        raise ValueError(f"no sections chosen; allowed: {SECTIONS}")
    for name in chosen:
        if name not in SECTIONS:
            raise ValueError(f"unknown section {name!r}; allowed: {SECTIONS}")
    return chosen


def supervised_tokens(
    length: int,
    spans: Spans,
    sections: Sequence[str],
    trunc: float,
    mode: str,
    cut_after_think: bool = False,
    seed: int = 0,
) -> tuple[tuple[int, int], list[bool]]:
    """Window to keep and, per kept token, whether it is a KD target.

    ``mask[j]`` refers to full-sequence token ``start + j``. It is True iff that token
    lies in a chosen section and ``j >= 1`` (the first kept token has no predecessor
    inside the window, so nothing predicts it).
    """
    chosen = _check_sections(sections)
    _check_trunc(trunc)
    _check_mode(mode)
    if length < 1:
        raise ValueError(f"length must be >= 1 token, got {length}")
    if cut_after_think:
        # Applied before windowing: trunc is a fraction of the shortened sequence.
        length = cut_after_think_fn(length, spans)
    start, end = kept_window(length, trunc, mode)
    ranges = [spans.of(name) for name in chosen]
    mask = [
        j >= 1 and any(lo <= i < hi for lo, hi in ranges)
        for j, i in enumerate(range(start, end))
    ]
    if mode == "random_labels":
        mask = drop_random_labels(mask, trunc, seed)
    return (start, end), mask


def random_labels_kept(n: int, trunc: float) -> int:
    """Targets ``random_labels`` keeps of ``n``: the paper's control drops ``round(r * n)`` with
    r = 1 - trunc (its ``random_mask_ratio``), so ``n - round((1 - trunc) * n)`` remain (Python's
    round, half to even, as the paper's code)."""
    return n - round((1.0 - trunc) * n)


def drop_random_labels(mask: Sequence[bool], trunc: float, seed: int) -> list[bool]:
    """Full compute, fewer labels: drop a seeded random ``round((1 - trunc) * n)`` of the ``n``
    True positions of ``mask``. The training loop draws again every epoch with
    ``random_labels_seed`` (the paper redrew at every collate), so the set changes, its size not."""
    candidates = [j for j, on in enumerate(mask) if on]
    dropped = set(random.Random(seed).sample(candidates, len(candidates) - random_labels_kept(len(candidates), trunc)))
    return [on and j not in dropped for j, on in enumerate(mask)]


def random_labels_seed(seed: int, index: int, epoch: int) -> int:
    """The draw of sequence ``index`` in ``epoch``: a pure function of the three, so a resumed run
    redraws exactly what an uninterrupted one does. Epoch 0 is ``seed * 1_000_003 + index``, the
    seed ``supervised_tokens`` is given for a sequence; each later epoch adds a stride far beyond
    any dataset's size, so no two (index, epoch) pairs share a draw."""
    return seed * 1_000_003 + index + epoch * 7_919_000_017


def label_tensor(
    token_ids: Sequence[int],
    window: tuple[int, int],
    mask: Sequence[bool],
    ignore_index: int = -100,
) -> tuple[torch.LongTensor, torch.LongTensor]:
    """``input_ids`` for the window and unshifted ``labels`` (ignore_index where masked out)."""
    start, end = window
    if not (0 <= start <= end <= len(token_ids)):
        raise ValueError(f"window {window} outside a sequence of {len(token_ids)} tokens")
    if len(mask) != end - start:
        raise ValueError(f"mask has {len(mask)} entries but the window holds {end - start} tokens")
    input_ids = torch.tensor(list(token_ids[start:end]), dtype=torch.long)
    keep = torch.tensor(list(mask), dtype=torch.bool)
    labels = torch.where(keep, input_ids, torch.full_like(input_ids, ignore_index))
    return input_ids, labels
