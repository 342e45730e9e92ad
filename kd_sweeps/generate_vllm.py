"""Generation through vLLM (the optional ``vllm`` extra), for ``eval.engine=vllm`` or ``auto`` on CUDA.

The same prompts as the transformers path (``evaluate.chat_prompts``, tokenized without added
special tokens and handed over as token ids, so both engines start from identical tokens), the same
sampling settings, the same cut at the end token and token count (``evaluate.completion_text``),
so ``evaluate.score`` turns either engine's output into the same EvalResult.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from kd_sweeps.evaluate import chat_prompts, completion_text


def _engine(checkpoint: str, seed: int):
    from vllm import LLM

    return LLM(model=checkpoint, tokenizer=checkpoint, dtype="auto", seed=seed)  # dtype: as saved


def _free_gpu() -> None:
    """Give the engine's GPU memory back (it reserves most of the GPU): with launcher=basic the next
    grid point trains in this same process. Best effort: vLLM frees its memory when collected."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sampling_params(tokenizer, eval_cfg, seed: int):
    from vllm import SamplingParams

    greedy = eval_cfg.temperature <= 0
    return SamplingParams(n=eval_cfg.n_samples, temperature=0.0 if greedy else eval_cfg.temperature,
                          top_p=1.0 if greedy else eval_cfg.top_p, max_tokens=eval_cfg.max_new_tokens,
                          seed=seed, stop_token_ids=[tokenizer.eos_token_id], skip_special_tokens=False)


def generate_answers_vllm(checkpoint, tokenizer, records: Sequence[dict], eval_cfg,
                          seed: int = 0) -> tuple[list[list[str]], int]:
    """Completions for every record (n_samples each) and the number of generated tokens."""
    prompts = [{"prompt_token_ids": tokenizer(p, add_special_tokens=False)["input_ids"]}
               for p in chat_prompts(tokenizer, records)]
    # One engine per call (per benchmark): building it costs far less than generating at 32k tokens,
    # and nothing holds the GPU between benchmarks or grid points.
    llm = _engine(str(Path(checkpoint).resolve()), seed)
    try:
        results = llm.generate(prompts, sampling_params(tokenizer, eval_cfg, seed), use_tqdm=False)
    finally:
        del llm  # the last reference: collected below
        _free_gpu()
    outputs: list[list[str]] = []
    generated = 0
    for result in results:  # in prompt order
        samples = []
        for sample in result.outputs:
            text, count = completion_text(tokenizer, sample.token_ids)
            samples.append(text)
            generated += count
        outputs.append(samples)
    return outputs, generated
