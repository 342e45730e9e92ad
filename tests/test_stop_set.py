"""Generation stops where the assistant's turn ends, with the paper's REAL tokenizers.

Qwen3-4B-Base's tokenizer has eos ``<|endoftext|>`` while every trained turn ends with
``<|im_end|>``: stopping at eos alone scores whatever the model writes after its turn.
"""

from __future__ import annotations

import pytest
import torch

from kd_sweeps import evaluate
from kd_sweeps.tokenizer import build_tokenizer
from tests.qwen3_hub import STUDENT, TEACHER, build_qwen3_folder

ENDOFTEXT, IM_END = 151643, 151645
# A turn that answers 7, then a made-up next turn whose answer is 9.
ANSWER = "<think>\nThree plus four is seven.\n</think>\n\nThe answer is \\boxed{7}."
RAMBLE = ("\n<|im_start|>user\nAnd with two more?<|im_end|>\n<|im_start|>assistant\n<think>\n7 + 2 = 9\n"
          "</think>\n\n\\boxed{9}<|im_end|>")


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen3")
    return {which: build_qwen3_folder(root / which, which) for which in (STUDENT, TEACHER)}


def _tokenizer(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("which, expected", [(STUDENT, [ENDOFTEXT, IM_END]), (TEACHER, [IM_END, ENDOFTEXT])])
def test_stop_set_of_the_real_tokenizers(qwen3, which, expected):
    tokenizer = _tokenizer(qwen3[which])
    assert evaluate.end_of_turn_id(tokenizer) == IM_END  # read from the chat template, not assumed
    assert evaluate.stop_token_ids(tokenizer, checkpoint=qwen3[which]) == expected


@pytest.mark.parametrize("which", [STUDENT, TEACHER])
def test_a_completion_is_cut_at_the_end_of_its_turn(qwen3, which):
    tokenizer = _tokenizer(qwen3[which])
    ids = tokenizer(ANSWER + "<|im_end|>" + RAMBLE, add_special_tokens=False)["input_ids"]
    answer_tokens = len(tokenizer(ANSWER, add_special_tokens=False)["input_ids"])
    assert (len(ids), answer_tokens) == (51, 18)  # the real tokenizer's counts for this text
    done = evaluate.cut_completion(tokenizer, ids, evaluate.stop_token_ids(tokenizer, checkpoint=qwen3[which]))
    assert done.tokens == answer_tokens + 1 == 19  # up to and including <|im_end|>
    assert done.finished and done.text == ANSWER
    assert evaluate.answers_match(done.text, "7") and not evaluate.answers_match(done.text, "9")
    if which == STUDENT:  # what stopping at the tokenizer's eos alone scored: the made-up turn's 9, 51 tokens
        text, count = evaluate.completion_text(tokenizer, ids)
        assert count == 51 and evaluate.answers_match(text, "9")


def test_embedded_tokenizer_ends_its_turn_with_its_eos():
    tokenizer = build_tokenizer()
    assert evaluate.end_of_turn_id(tokenizer) == tokenizer.eos_token_id
    assert evaluate.stop_token_ids(tokenizer) == [tokenizer.eos_token_id]


def test_a_template_without_an_end_of_turn_token_adds_none():
    tokenizer = build_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    assert evaluate.end_of_turn_id(tokenizer) is None


def _chain_model(vocab: int, chain: dict[int, int]):
    """A one-layer Qwen3 whose next token is a function of the current one: attention and MLP
    outputs are zeroed (the residual stream is the current token's embedding) and the output row
    of ``chain[t]`` holds t's embedding direction (summed over its sources), every other row zero."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config).eval()
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight.zero_()
        model.model.layers[0].mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        embed = model.model.embed_tokens.weight
        for current, following in chain.items():
            model.lm_head.weight[following] += 10 * embed[current] / embed[current].norm()  # a row may have two sources
    return model


class GreedyCfg:
    max_new_tokens = 20
    batch_size = 4
    n_samples = 1
    temperature = 0.0
    top_p = 1.0
    top_k = 0


def test_generation_stops_at_im_end_with_the_base_tokenizer(qwen3):
    """The model answers \\boxed{7}<|im_end|> and would go on (the chain loops back to its answer);
    the transformers engine stops at <|im_end|> although the tokenizer's eos is <|endoftext|>."""
    from transformers import GenerationConfig

    tokenizer = _tokenizer(qwen3[STUDENT])
    record = {"problem": "What is 3 + 4?", "answer": "7"}
    prompt = tokenizer(evaluate.chat_prompts(tokenizer, [record])[0], add_special_tokens=False)["input_ids"]
    answer = tokenizer("\\boxed{7}", add_special_tokens=False)["input_ids"]
    path = [prompt[-1], *answer, IM_END, answer[0]]
    assert len(set(path[:-1])) == len(path) - 1  # every step of the chain is a distinct token
    model = _chain_model(len(tokenizer), dict(zip(path[:-1], path[1:])))
    model.generation_config = GenerationConfig.from_pretrained(qwen3[STUDENT])  # eos_token_id: <|endoftext|> only

    result = evaluate.evaluate(model, tokenizer, [record], GreedyCfg(), torch.device("cpu"))
    assert (result.accuracy, result.generated_tokens, result.finished_rate) == (1.0, len(answer) + 1, 1.0)

    from kd_sweeps.generate import Request, Sampling, continuous_generate

    out = []  # stopping at the tokenizer's eos alone: the turn never ends
    continuous_generate(model, [Request((0, 0), prompt)], [tokenizer.eos_token_id], Sampling(max_new_tokens=20), 1,
                        tokenizer.pad_token_id, out.extend)
    assert len(out[0].tokens) == 20 and not out[0].stopped and IM_END in out[0].tokens
