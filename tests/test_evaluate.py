"""Answer checking and accuracy with its standard error."""

from __future__ import annotations

import importlib.util
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


def test_both_engines_share_prompts_token_counts_and_scoring():
    tokenizer = build_tokenizer()
    records = make_split(2, seed=0)
    prompts = evaluate.chat_prompts(tokenizer, records)
    assert prompts[0].endswith("<|im_start|>assistant\n") and records[0]["problem"] in prompts[0]
    answer = tokenizer("<think>\n2+1×1\n2+1=3, so 3, 0 left\n</think>\n\n\\boxed{3}", add_special_tokens=False)["input_ids"]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    text, count = evaluate.completion_text(tokenizer, answer + [eos, 7, 8])  # cut after the end token
    assert count == len(answer) + 1 and text.startswith("<think>") and text.endswith("\\boxed{3}")
    assert evaluate.completion_text(tokenizer, answer + [pad, pad]) == (text, len(answer))  # unfinished, padded
    result = evaluate.score([{"answer": "3"}, {"answer": "4"}], [[text, "no answer"], [text, text]], 9)
    assert (result.accuracy, result.n, result.generated_tokens, result.per_problem) == (0.25, 2, 9, [0.5, 0.0])


def test_engine_choice():
    assert evaluate.resolve_engine("transformers", "cuda") == "transformers"
    assert evaluate.resolve_engine("auto", "cpu") == "transformers"  # vLLM serves CUDA only here
    assert evaluate.resolve_engine("vllm", "cpu") == "vllm"
    with pytest.raises(ValueError, match="eval.engine='fast'"):
        evaluate.resolve_engine("fast", "cpu")


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None or not torch.cuda.is_available(),
                    reason="needs the optional vllm extra (pip install '.[vllm]') and a CUDA GPU")
def test_vllm_path_gives_the_same_results_format(tmp_path):
    """vLLM generates from the saved checkpoint and reports like transformers does. (Greedy outputs
    of a random model are not compared token for token: the engines' kernels round differently.)"""
    tokenizer = build_tokenizer()
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(0)
    model = Qwen3ForCausalLM._from_config(models.qwen3_config({"layers": 1, "hidden": 64, "heads": 2}, tokenizer))
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    records = make_split(6, seed=0)

    class Vllm(EvalCfg):
        engine = "vllm"

    result = evaluate.evaluate(None, tokenizer, records, Vllm(), torch.device("cuda"), checkpoint=tmp_path, seed=1)
    assert result.n == 6 and len(result.per_problem) == 6
    assert 0 < result.generated_tokens <= 6 * Vllm.n_samples * Vllm.max_new_tokens


class _FakeVllm:
    """Stands in for the ``vllm`` module (not installable on a CPU box): records what the engine
    is asked and answers each request with a fixed completion."""

    def __init__(self, tokenizer):
        self.tokenizer, self.calls = tokenizer, []
        fake = self

        class SamplingParams:
            def __init__(self, **kwargs):
                self.__dict__.update(kwargs)

        class LLM:
            def __init__(self, **kwargs):
                fake.engine_kwargs = kwargs

            def generate(self, prompts, params, use_tqdm=False):
                fake.calls.append((prompts, params))
                return [fake.answer(p) for p in params]

        self.SamplingParams, self.LLM = SamplingParams, LLM

    def answer(self, params):
        from types import SimpleNamespace

        boxed = self.tokenizer("\\boxed{3}", add_special_tokens=False)["input_ids"]
        if params.seed % 2:  # ran to the limit
            out = SimpleNamespace(token_ids=(boxed * 20)[: params.max_tokens], finish_reason="length", stop_reason=None)
        else:  # ended on the eos, which vLLM leaves out of token_ids
            out = SimpleNamespace(token_ids=boxed, finish_reason="stop", stop_reason=None)
        return SimpleNamespace(outputs=[out])


def test_vllm_engine_gets_the_same_requests_sampling_and_stop_set(tmp_path, monkeypatch):
    import sys

    from kd_sweeps import generate_vllm

    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    fake = _FakeVllm(tokenizer)
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setattr(generate_vllm, "CHUNK", 3)  # 5 requests: two chunks
    records = [{**r, "answer": "3"} for r in make_split(5, seed=0)]

    class Sampled(EvalCfg):
        engine, n_samples, top_k = "vllm", 1, 0

    result = evaluate.evaluate(None, tokenizer, records, Sampled(), torch.device("cpu"), checkpoint=tmp_path, seed=5,
                               results_file=tmp_path / "eval" / "synthetic.jsonl")
    assert [len(prompts) for prompts, _ in fake.calls] == [3, 2]
    prompts = [p["prompt_token_ids"] for chunk, _ in fake.calls for p in chunk]
    assert prompts == [tokenizer(p, add_special_tokens=False)["input_ids"]
                       for p in evaluate.chat_prompts(tokenizer, records)]
    params = [p for _, chunk in fake.calls for p in chunk]
    assert {(p.temperature, p.top_p, p.top_k, p.max_tokens, p.n) for p in params} == {(0.7, 0.95, -1, 12, 1)}
    assert [p.seed for p in params] == [evaluate.request_seed(5, i, 0) for i in range(5)]
    assert all(p.stop_token_ids == [tokenizer.eos_token_id] and not p.skip_special_tokens for p in params)
    stopped = [p.seed % 2 == 0 for p in params]
    assert result.accuracy == 1.0 and result.finished_rate == sum(stopped) / 5
    assert result.generated_tokens == sum(6 if s else 12 for s in stopped)  # 5 answer tokens + the eos; or the limit
    again = evaluate.evaluate(None, tokenizer, records, Sampled(), torch.device("cpu"), checkpoint=tmp_path, seed=5,
                              results_file=tmp_path / "eval" / "synthetic.jsonl")
    assert again.resumed == 5 and len(fake.calls) == 2  # read back: vLLM was not started again
