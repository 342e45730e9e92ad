import itertools
import math

import pytest
import torch

from kd_sweeps.sections import (
    SECTION_PRESETS,
    SECTIONS,
    TRUNCATION_MODES,
    MarkerError,
    Spans,
    cut_after_think,
    find_spans,
    kept_window,
    label_tensor,
    supervised_tokens,
)

THINK, END = 100, 101

# 4 prompt tokens, <think>, 10 reasoning tokens, </think>, 5 answer tokens: 21 tokens.
# At trunc 0.5 a lead window keeps 10 tokens, so </think> (index 15) is cut off.
PROMPT = [1, 2, 3, 4]
REASONING = list(range(10, 20))
ANSWER = [50, 51, 52, 53, 54]
SEQ = PROMPT + [THINK] + REASONING + [END] + ANSWER
THINK_AT, END_AT = 4, 15


def brute_labels(ids):
    """Per-token section by a left-to-right scan, independent of find_spans."""
    labels, state = [], "P"
    for tok in ids:
        if state == "P" and tok == THINK:
            state = "CoT"
        labels.append(state)
        if state == "CoT" and tok == END:
            state = "A"
    return labels


def brute_window(length, trunc, mode):
    k = max(1, math.floor(length * trunc))
    return {
        "lead": (0, k),
        "left": (0, k),
        "middle": ((length - k) // 2, (length - k) // 2 + k),
        "right": (length - k, length),
        "random_labels": (0, length),
    }[mode]


# ---------------------------------------------------------------- find_spans


def test_find_spans_exact():
    spans = find_spans(SEQ, THINK, END)
    assert spans == Spans(prompt=(0, 4), cot=(4, 16), answer=(16, 21))
    # Both markers belong to CoT; the first answer token does not.
    lo, hi = spans.of("CoT")
    assert SEQ[lo] == THINK and SEQ[hi - 1] == END
    assert spans.of("P") == spans.prompt and spans.of("A") == spans.answer
    with pytest.raises(ValueError, match="CoT"):
        spans.of("cot")


def test_find_spans_matches_scan():
    spans = find_spans(SEQ, THINK, END)
    labels = brute_labels(SEQ)
    for name in SECTIONS:
        lo, hi = spans.of(name)
        assert [i for i, lab in enumerate(labels) if lab == name] == list(range(lo, hi))


def test_find_spans_first_occurrence_only():
    ids = [1, THINK, 7, END, 8, THINK, 9, END, 10]
    assert find_spans(ids, THINK, END) == Spans((0, 1), (1, 4), (4, 9))


def test_find_spans_edge_sections_empty():
    # No prompt, no answer: P and A are empty spans, CoT is the whole sequence.
    assert find_spans([THINK, 5, END], THINK, END) == Spans((0, 0), (0, 3), (3, 3))


@pytest.mark.parametrize(
    "ids, pattern",
    [
        ([1, 2, END, 3], "<think>"),
        ([1, THINK, 2, 3], "</think>"),
        ([1, 2, 3], "both"),
        ([1, END, 2, THINK, 3], "before"),
        ([], "both"),
    ],
)
def test_find_spans_marker_errors(ids, pattern):
    with pytest.raises(MarkerError, match=pattern):
        find_spans(ids, THINK, END)


def test_marker_error_is_value_error():
    assert issubclass(MarkerError, ValueError)


def test_cut_after_think():
    spans = find_spans(SEQ, THINK, END)
    assert cut_after_think(len(SEQ), spans) == 16
    assert SEQ[cut_after_think(len(SEQ), spans) - 1] == END


# ---------------------------------------------------------------- kept_window


@pytest.mark.parametrize(
    "length, expected",
    [
        (10, {"lead": (0, 5), "left": (0, 5), "middle": (2, 7), "right": (5, 10),
              "random_labels": (0, 10)}),
        # k = floor(3.5) = 3; middle drops 2 on the left, 2 on the right.
        (7, {"lead": (0, 3), "left": (0, 3), "middle": (2, 5), "right": (4, 7),
             "random_labels": (0, 7)}),
    ],
)
def test_kept_window_half(length, expected):
    for mode in TRUNCATION_MODES:
        assert kept_window(length, 0.5, mode) == expected[mode], mode


@pytest.mark.parametrize("mode", TRUNCATION_MODES)
def test_kept_window_full_and_tiny(mode):
    assert kept_window(10, 1.0, mode) == (0, 10)
    start, end = kept_window(10, 0.01, mode)
    if mode == "random_labels":
        assert (start, end) == (0, 10)
    else:
        assert end - start == 1


def test_kept_window_tiny_positions():
    assert kept_window(10, 0.01, "lead") == (0, 1)
    assert kept_window(10, 0.01, "middle") == (4, 5)
    assert kept_window(10, 0.01, "right") == (9, 10)


@pytest.mark.parametrize("trunc", [0.0, -0.5, 1.0001, 2.0, float("nan")])
def test_kept_window_bad_trunc(trunc):
    with pytest.raises(ValueError, match="trunc"):
        kept_window(10, trunc, "lead")


def test_kept_window_bad_mode():
    with pytest.raises(ValueError, match="random_labels"):
        kept_window(10, 0.5, "centre")


# ---------------------------------------------------------- supervised_tokens


@pytest.mark.parametrize("preset", sorted(SECTION_PRESETS))
@pytest.mark.parametrize("mode", TRUNCATION_MODES)
@pytest.mark.parametrize("cut", [False, True])
@pytest.mark.parametrize("trunc", [0.1, 0.25, 0.5, 1.0])
def test_supervised_tokens_grid(preset, mode, cut, trunc):
    spans = find_spans(SEQ, THINK, END)
    chosen = SECTION_PRESETS[preset]
    window, mask = supervised_tokens(len(SEQ), spans, chosen, trunc, mode,
                                     cut_after_think=cut, seed=3)
    labels = brute_labels(SEQ)
    length = END_AT + 1 if cut else len(SEQ)
    start, end = window
    assert window == brute_window(length, trunc, mode)
    assert 0 <= start < end <= length
    assert len(mask) == end - start
    assert mask[0] is False
    for j, on in enumerate(mask):
        if on:
            assert labels[start + j] in chosen
    # Brute-force count: tokens in the window, after its first, in a chosen section.
    eligible = sum(1 for i in range(start + 1, end) if labels[i] in chosen)
    if mode == "random_labels":
        assert sum(mask) == eligible - round((1 - trunc) * eligible)  # the paper drops round(r * n), r = 1 - trunc
    else:
        assert sum(mask) == eligible
    # Every input id is recoverable through label_tensor.
    input_ids, lab = label_tensor(SEQ, window, mask)
    assert input_ids.tolist() == SEQ[start:end]
    assert int((lab != -100).sum()) == sum(mask)


def test_cot_full_excludes_first_answer_token():
    spans = find_spans(SEQ, THINK, END)
    window, mask = supervised_tokens(len(SEQ), spans, SECTION_PRESETS["cot"], 1.0, "lead")
    assert window == (0, len(SEQ))
    on = [i for i, m in enumerate(mask) if m]
    assert on == list(range(THINK_AT, END_AT + 1))  # both markers included
    assert mask[END_AT] is True and mask[END_AT + 1] is False  # reference code's off-by-one


def test_cot_lead_half_cut_off_end_marker():
    spans = find_spans(SEQ, THINK, END)
    window, mask = supervised_tokens(len(SEQ), spans, ("CoT",), 0.5, "lead")
    assert window == (0, 10)
    assert [i for i, m in enumerate(mask) if m] == list(range(THINK_AT, 10))


@pytest.mark.parametrize("mode", ["lead", "left", "middle"])
def test_answer_cut_off_gives_empty_mask(mode):
    spans = find_spans(SEQ, THINK, END)
    window, mask = supervised_tokens(len(SEQ), spans, SECTION_PRESETS["ans"], 0.5, mode)
    assert len(mask) == window[1] - window[0]
    assert not any(mask)


def test_answer_with_cut_after_think_is_empty():
    spans = find_spans(SEQ, THINK, END)
    for mode in TRUNCATION_MODES:
        window, mask = supervised_tokens(len(SEQ), spans, ("A",), 1.0, mode, cut_after_think=True)
        assert window[1] <= END_AT + 1 and not any(mask)


def test_right_window_first_token_not_supervised():
    spans = find_spans(SEQ, THINK, END)
    window, mask = supervised_tokens(len(SEQ), spans, SECTION_PRESETS["all"], 0.5, "right")
    assert window == (11, 21)
    assert mask == [False] + [True] * 9


def test_random_labels_count_and_determinism():
    spans = find_spans(SEQ, THINK, END)
    chosen = SECTION_PRESETS["all"]
    window, full = supervised_tokens(len(SEQ), spans, chosen, 1.0, "random_labels")
    assert window == (0, 21) and sum(full) == 20  # every target but token 0
    masks = [supervised_tokens(len(SEQ), spans, chosen, 0.5, "random_labels", seed=s)[1]
             for s in range(5)]
    for m in masks:
        assert sum(m) == 10 and not m[0]
        assert all(full[j] for j, on in enumerate(m) if on)  # subset of section targets
    again = supervised_tokens(len(SEQ), spans, chosen, 0.5, "random_labels", seed=0)[1]
    assert again == masks[0]
    assert any(a != b for a, b in itertools.combinations(masks, 2))
    assert masks[0] != masks[1]


def test_supervised_tokens_bad_arguments():
    spans = find_spans(SEQ, THINK, END)
    with pytest.raises(ValueError, match="CoT"):
        supervised_tokens(len(SEQ), spans, ("cot",), 0.5, "lead")
    with pytest.raises(ValueError, match="CoT"):
        supervised_tokens(len(SEQ), spans, "CoT", 0.5, "lead")  # bare string
    with pytest.raises(ValueError, match="CoT"):
        supervised_tokens(len(SEQ), spans, (), 0.5, "lead")
    with pytest.raises(ValueError, match="random_labels"):
        supervised_tokens(len(SEQ), spans, ("A",), 0.5, "tail")
    with pytest.raises(ValueError, match="trunc"):
        supervised_tokens(len(SEQ), spans, ("A",), 0.0, "random_labels")


# --------------------------------------------------------------- label_tensor


def test_label_tensor():
    ids = [7, 8, 9, 10, 11]
    input_ids, labels = label_tensor(ids, (1, 4), [False, True, False], ignore_index=-1)
    assert input_ids.dtype == torch.long and labels.dtype == torch.long
    assert input_ids.tolist() == [8, 9, 10]
    assert labels.tolist() == [-1, 9, -1]  # aligned with input_ids, not shifted
    _, default = label_tensor(ids, (0, 2), [False, True])
    assert default.tolist() == [-100, 8]


def test_label_tensor_mask_length_mismatch():
    with pytest.raises(ValueError, match="mask"):
        label_tensor([1, 2, 3], (0, 3), [True, False])


def test_the_presets_are_the_schema_choices_but_custom():
    from kd_sweeps.choices import SectionsPreset, values

    assert [*SECTION_PRESETS, "custom"] == list(values(SectionsPreset))
    assert all(set(included) <= set(SECTIONS) for included in SECTION_PRESETS.values())
