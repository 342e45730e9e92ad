"""Generation through vLLM (the optional ``vllm`` extra), for ``eval.engine=vllm`` or ``auto`` on CUDA.

The same requests as the transformers engine (``evaluate``: one per (problem, sample), prompt token
ids from the same chat template, a seed per request), the same sampling knobs passed explicitly
(temperature, top-p, top-k with 0 = off, max new tokens; vLLM reads no generation-config default
once SamplingParams are given), the same stop set (``stop_token_ids``), and the same cut and token
count (``evaluate.cut_completion``), so either engine's completions score the same way.

Requests go to vLLM in chunks; the completions of a chunk are handed to ``on_finish`` (and so to
the results file) as soon as it ends, and the preemption check runs between chunks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from kd_sweeps.generate import Generated, Request, Sampling

# Requests per vLLM call. Larger keeps vLLM's scheduler fuller at the chunk's tail (it waits for
# the chunk's longest completion); smaller loses less work to a kill. 256 is vLLM's default
# max_num_seqs: a chunk fills the running batch once and refills it from its own queue.
CHUNK = 256


def _free_gpu() -> None:
    """Give cached CUDA memory back: before the engine starts (the training that ran in this process
    may still hold its allocator's cache, which vLLM would count as used) and after it ends (with
    launcher=basic the next grid point trains in this same process)."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _engine(checkpoint: str, seed: int):
    import torch
    from vllm import LLM

    # A trained student is saved in fp32 (its master weights); generation computes in bf16 where the
    # GPU has it, as the paper's evaluation did (vLLM's "auto" would follow the saved fp32).
    dtype = "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "auto"
    return LLM(model=checkpoint, tokenizer=checkpoint, dtype=dtype, seed=seed)


def sampling_params(request: Request, sampling: Sampling, stop_ids: Sequence[int]):
    from vllm import SamplingParams

    greedy = sampling.temperature <= 0
    return SamplingParams(n=1, temperature=0.0 if greedy else sampling.temperature,
                          top_p=1.0 if greedy else sampling.top_p,
                          top_k=-1 if greedy or sampling.top_k <= 0 else sampling.top_k,  # -1: off
                          max_tokens=request.max_new_tokens or sampling.max_new_tokens, seed=request.seed,
                          stop_token_ids=list(stop_ids), skip_special_tokens=False)


def _tokens(sample, stop_ids: Sequence[int]) -> tuple[list[int], bool]:
    """A vLLM sample's ids with the stop token it ended on (vLLM may leave it out of token_ids)."""
    tokens = list(sample.token_ids)
    stopped = sample.finish_reason == "stop"
    if stopped and not (tokens and tokens[-1] in stop_ids):
        reason = sample.stop_reason  # the stop id; None: the model's own eos (counted as the first stop id)
        tokens.append(int(reason) if isinstance(reason, int) else int(stop_ids[0]))
    return tokens, stopped


def generate_vllm(checkpoint, requests: Sequence[Request], stop_ids: Sequence[int], sampling: Sampling,
                  seed: int, on_finish: Callable[[list[Generated]], None],
                  check: Callable[[], None] = lambda: None) -> None:
    """Generate every request with vLLM from the saved ``checkpoint`` folder."""
    _free_gpu()
    # One engine per call (per benchmark): building it costs far less than generating at 32k tokens,
    # and nothing holds the GPU between benchmarks or grid points.
    llm = _engine(str(Path(checkpoint).resolve()), seed)
    try:
        for start in range(0, len(requests), CHUNK):
            check()
            chunk = requests[start:start + CHUNK]
            results = llm.generate([{"prompt_token_ids": list(r.prompt)} for r in chunk],
                                   [sampling_params(r, sampling, stop_ids) for r in chunk], use_tqdm=False)
            finished = []
            for request, result in zip(chunk, results):  # in request order
                tokens, stopped = _tokens(result.outputs[0], stop_ids)
                finished.append(Generated(request.key, tokens, stopped))
            on_finish(finished)
    finally:
        del llm  # the last reference: collected below
        _free_gpu()
