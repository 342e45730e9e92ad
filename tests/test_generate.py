"""The transformers engine: continuous batching gives what one-prompt-at-a-time generation gives,
and samples exactly as ``eval`` says, whatever the model's generation config holds."""

from __future__ import annotations

import pytest
import torch

from kd_sweeps import evaluate
from kd_sweeps.generate import Request, Sampling, continuous_generate, sample_next
from kd_sweeps.synthetic import make_split
from kd_sweeps.tokenizer import build_tokenizer
from tests.qwen3_hub import QWEN3_FIXTURES, TEACHER


@pytest.fixture(scope="module")
def tiny():
    """A random 2-layer Qwen3 on the embedded tokenizer, weights widened so that its greedy
    completions differ from prompt to prompt and some end early on the eos."""
    from tests.helpers import random_embedded_model

    tokenizer = build_tokenizer()
    model = random_embedded_model(tokenizer)
    records = make_split(10, seed=0)
    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in evaluate.chat_prompts(tokenizer, records)]
    return model.eval(), tokenizer, prompts


def _run(model, tokenizer, requests, stops, sampling, slots):
    out = {}
    continuous_generate(model, requests, stops, sampling, slots, tokenizer.pad_token_id,
                        lambda done: out.update({g.key: g for g in done}))
    return out


def test_refilled_rows_match_one_prompt_at_a_time(tiny):
    model, tokenizer, prompts = tiny
    stops = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("</think>")]
    caps = [4 + 6 * i for i in range(len(prompts))]  # rows end at different steps: refills all along
    got = _run(model, tokenizer, [Request((i,), p, max_new_tokens=c) for i, (p, c) in enumerate(zip(prompts, caps))],
               stops, Sampling(), slots=3)
    stopped = 0
    for i, (prompt, cap) in enumerate(zip(prompts, caps)):
        alone = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=cap, eos_token_id=stops,
                               pad_token_id=tokenizer.pad_token_id)[0, len(prompt):].tolist()
        assert got[(i,)].tokens == alone, i
        assert got[(i,)].stopped == (alone[-1] in stops)
        stopped += got[(i,)].stopped
    assert 0 < stopped < len(prompts)  # both endings occurred


def test_a_sample_does_not_depend_on_its_batch(tiny):
    """Each request draws from its own seeded generator: the same samples with 1 slot or 4."""
    model, tokenizer, prompts = tiny
    sampling = Sampling(temperature=1.0, top_p=0.9, top_k=20, max_new_tokens=12)
    requests = [Request((i, s), prompts[i], seed=evaluate.request_seed(3, i, s)) for i in range(4) for s in range(2)]
    one, four = (_run(model, tokenizer, requests, [tokenizer.eos_token_id], sampling, slots) for slots in (1, 4))
    assert {k: g.tokens for k, g in one.items()} == {k: g.tokens for k, g in four.items()}
    assert one[(0, 0)].tokens != one[(0, 1)].tokens  # samples of one problem differ


def test_top_k_keeps_only_the_k_best_and_greedy_is_argmax():
    logits = torch.tensor([[0.0, 3.0, 2.5, 2.0, 1.0, 0.5]]).repeat(400, 1)
    generators = [torch.Generator().manual_seed(i) for i in range(400)]
    drawn = sample_next(logits, Sampling(temperature=1.0, top_k=3), generators)
    assert set(drawn.tolist()) == {1, 2, 3}
    assert sample_next(logits[:2], Sampling(temperature=0.0), generators[:2]).tolist() == [1, 1]


def test_no_generation_config_default_leaks_into_sampling(tiny):
    """Qwen3-8B's generation_config.json samples with top_k 20 and temperature 0.6, and transformers'
    own default is top_k 50: with eval.top_k=0 a flat distribution over the embedded vocabulary
    must show more than 50 distinct tokens (of the embedded tokenizer's 54)."""
    from transformers import GenerationConfig

    model, tokenizer, prompts = tiny
    model = type(model)(model.config).eval()
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every next token equally likely
    model.generation_config = GenerationConfig.from_pretrained(QWEN3_FIXTURES / TEACHER)
    assert (model.generation_config.top_k, model.generation_config.temperature) == (20, 0.6)
    requests = [Request((s,), prompts[0], seed=evaluate.request_seed(0, 0, s)) for s in range(6)]
    got = _run(model, tokenizer, requests, [], Sampling(temperature=1.0, max_new_tokens=100), slots=6)
    distinct = {t for g in got.values() for t in g.tokens}
    assert len(distinct) > 50, len(distinct)  # top-k 50 would allow 50 at most, top-k 20 only 20
