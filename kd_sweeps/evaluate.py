"""Evaluation: generate answers to held-out problems, check them, report accuracy ± standard error.

Greedy by default (one sample per problem); with ``n_samples > 1`` and a temperature, accuracy is
pass@1 estimated as the mean over samples, and the standard error is taken over problems.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from kd_sweeps.data import prompt_messages


@dataclass
class EvalResult:
    accuracy: float
    stderr: float
    n: int  # problems
    generated_tokens: int  # eval cost: tokens produced (up to and including the end token)
    per_problem: list[float]  # mean correctness per problem, for paired comparisons


def answers_match(completion: str, gold: str) -> bool:
    """The last ``\\boxed{}`` of a completion against the gold answer: exact match first (fast, and
    all the embedded task needs); otherwise math-verify, which knows that 1/2, 0.5 and
    \\frac{1}{2} agree. A completion without a boxed answer is wrong: every prompt asks for one,
    and falling back to "any number in the text" lets a random model score on a 0-9 answer space."""
    from kd_sweeps.benchmarks import check_answer, last_boxed

    predicted = last_boxed(completion)
    if predicted is None:
        return False
    if predicted.strip() == str(gold).strip():
        return True
    return check_answer(completion, str(gold))


def mean_stderr(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(values) / n
    if n == 1:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


ENGINES = ("transformers", "vllm", "auto")


def resolve_engine(engine: str, device) -> str:
    """``auto``: vllm when it is installed and the run is on CUDA, else transformers."""
    if engine not in ENGINES:
        raise ValueError(f"eval.engine={engine!r}: must be one of {', '.join(ENGINES)}")
    if engine != "auto":
        return engine
    from kd_sweeps.validation import vllm_installed

    return "vllm" if torch.device(device).type == "cuda" and vllm_installed() else "transformers"


def chat_prompts(tokenizer, records: Sequence[dict]) -> list[str]:
    """The prompt of every record as generation sees it: the chat template with the assistant turn
    opened. Both engines generate from these, tokenized without added special tokens."""
    return [tokenizer.apply_chat_template(prompt_messages(r), tokenize=False, add_generation_prompt=True)
            for r in records]


def completion_text(tokenizer, ids: Sequence[int]) -> tuple[str, int]:
    """(text, generated-token count) of one completion's ids: cut after the first end token (counted:
    it was generated), padding dropped; <think>/</think> are kept, the answer is looked for after them."""
    ids = list(ids)
    if tokenizer.eos_token_id in ids:
        ids = ids[: ids.index(tokenizer.eos_token_id) + 1]
    else:
        ids = [t for t in ids if t != tokenizer.pad_token_id]
    text_ids = [t for t in ids if t not in (tokenizer.eos_token_id, tokenizer.pad_token_id)]
    return tokenizer.decode(text_ids, skip_special_tokens=False), len(ids)


@torch.no_grad()
def generate_answers(model, tokenizer, records: Sequence[dict], eval_cfg, device) -> tuple[list[list[str]], int]:
    """Completions for every record (n_samples each) and the number of generated tokens."""
    model.eval()
    tokenizer.padding_side = "left"  # generation continues from the right end of every row
    prompts = chat_prompts(tokenizer, records)
    sampling = eval_cfg.temperature > 0
    outputs: list[list[str]] = [[] for _ in records]
    generated = 0
    for _ in range(eval_cfg.n_samples):
        for start in range(0, len(prompts), eval_cfg.batch_size):
            enc = tokenizer(prompts[start:start + eval_cfg.batch_size], return_tensors="pt",
                            padding=True, add_special_tokens=False).to(device)
            kwargs = dict(do_sample=True, temperature=eval_cfg.temperature, top_p=eval_cfg.top_p) \
                if sampling else dict(do_sample=False)
            out = model.generate(**enc, max_new_tokens=eval_cfg.max_new_tokens,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                 **kwargs)
            new = out[:, enc["input_ids"].shape[1]:]  # (B, new tokens)
            for row, tokens in enumerate(new):
                text, count = completion_text(tokenizer, tokens.tolist())
                generated += count
                outputs[start + row].append(text)
    return outputs, generated


def benchmark_records(name: str, eval_cfg) -> list[dict]:
    """Problems of a math benchmark (hub, or a local copy named in eval.benchmark_paths)."""
    from kd_sweeps.benchmarks import load_benchmark

    path = (eval_cfg.benchmark_paths or {}).get(name)
    return load_benchmark(name, path=path, n=eval_cfg.n_problems, prompt_style=eval_cfg.prompt_style)


def evaluate(model, tokenizer, records: Sequence[dict], eval_cfg, device, checkpoint=None,
             seed: int = 0) -> EvalResult:
    """Generate with ``eval_cfg.engine`` (transformers on ``model``; vLLM from the saved
    ``checkpoint`` folder, with ``seed``) and score the completions."""
    engine = resolve_engine(getattr(eval_cfg, "engine", "transformers"), device)
    if engine == "vllm":
        from kd_sweeps.generate_vllm import generate_answers_vllm

        if checkpoint is None:
            raise ValueError("eval.engine=vllm generates from a saved checkpoint folder; none was given")
        completions, generated = generate_answers_vllm(checkpoint, tokenizer, records, eval_cfg, seed)
    else:
        completions, generated = generate_answers(model, tokenizer, records, eval_cfg, device)
    return score(records, completions, generated)


def score(records: Sequence[dict], completions: Sequence[Sequence[str]], generated: int) -> EvalResult:
    """Accuracy ± standard error over problems from every record's completions (either engine's)."""
    per_problem = []
    for record, samples in zip(records, completions):
        hits = [answers_match(text, record["answer"]) for text in samples]
        per_problem.append(sum(hits) / len(hits))
    accuracy, stderr = mean_stderr(per_problem)
    return EvalResult(accuracy, stderr, len(records), generated, per_problem)
