"""Answer checking and accuracy with its standard error."""

from __future__ import annotations

import math

import pytest
import torch

from kd_sweeps import evaluate, models
from kd_sweeps.synthetic import make_split
from kd_sweeps.tokenizer import build_tokenizer


@pytest.mark.parametrize("pred, gold, expected", [
    ("7", "7", True), (" 7 ", "7", True), ("8", "7", False),
    ("0.5", "\\frac{1}{2}", True), ("1/2", "0.5", True), ("\\frac{2}{4}", "\\frac12", True),
    ("2", "3", False),
])
def test_answers_match(pred, gold, expected):
    assert evaluate.answers_match(f"<think>x</think> so \\boxed{{{pred}}}.", gold) is expected


def test_no_boxed_answer_is_wrong():
    assert evaluate.answers_match("<think>7</think> I do not know", "7") is False


def test_mean_stderr_by_hand():
    mean, stderr = evaluate.mean_stderr([1, 0, 1, 1])
    assert mean == 0.75
    assert stderr == pytest.approx(math.sqrt((3 * 0.25**2 + 0.75**2) / 3 / 4))


class EvalCfg:
    max_new_tokens = 12
    batch_size = 3
    n_samples = 2
    temperature = 0.7
    top_p = 0.95


def test_generation_counts_tokens_and_scores_each_problem():
    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    from transformers import Qwen3ForCausalLM

    model = Qwen3ForCausalLM._from_config(models.qwen3_config({"layers": 1, "hidden": 32, "heads": 2}, tokenizer))
    records = make_split(5, seed=0)
    result = evaluate.evaluate(model, tokenizer, records, EvalCfg(), torch.device("cpu"))
    assert result.n == 5 and len(result.per_problem) == 5
    assert 0 < result.generated_tokens <= 5 * 2 * EvalCfg.max_new_tokens
    assert result.accuracy == 0.0  # a random model never writes a boxed answer in 12 tokens
