"""Generated tokens per second: continuous batching (``kd_sweeps.generate``) vs static batches.

The static path is the evaluation engine this project had before (``model.generate`` on fixed
batches of ``eval.batch_size`` prompts: a batch runs until its longest completion ends). The
continuous engine keeps ``--slots`` rows decoding and refills a row as soon as it ends.
transformers' own continuous batching (``generate_batch``'s manager, 5.x) is measured alongside.

Completion lengths are spread widely, as at paper scale (answers of a few hundred tokens next to
traces that run to the 32k limit): every prompt gets its own cap, log-uniform in
[--min-tokens, --max-tokens], and no stop token, so each completion is exactly its cap long and
every engine generates the same tokens. Prompts are the embedded task's held-out problems; the
model is the embedded student ("base", prepared and cached as in a sweep) or, with --random, a
random-init Qwen3 of the same shape. Only greedy decoding is timed; tokens/s counts the tokens of
the completions (not the padding a static batch computes past a row's end).

    python benchmarks/bench_generation.py                  # embedded student, 2 CPU threads
    python benchmarks/bench_generation.py --threads 1 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from pathlib import Path

import torch


def load_student(random_init: bool):
    from omegaconf import OmegaConf

    from kd_sweeps import models
    from kd_sweeps.schema import ModelSpec

    cache = Path(os.environ.get("KD_SWEEPS_CACHE", "~/.cache/kd-sweeps")).expanduser()  # as cfg.cache_dir
    spec = OmegaConf.load(Path(__file__).parents[1] / "conf" / "model" / "tiny.yaml").student
    spec = models.spec_dict(OmegaConf.merge(OmegaConf.structured(ModelSpec), spec))
    tokenizer = models.embedded_tokenizer(cache)
    if random_init:
        from transformers import Qwen3ForCausalLM

        torch.manual_seed(0)
        return Qwen3ForCausalLM._from_config(models.qwen3_config(spec, tokenizer)).eval(), tokenizer, "random-init"
    prepared = models.prepare_embedded(spec, "base", tokenizer, cache, "sdpa", torch.device("cpu"))
    return prepared.model.eval(), tokenizer, f"embedded student ({prepared.path})"


def problem_set(tokenizer, n: int, low: int, high: int, seed: int):
    from kd_sweeps.evaluate import chat_prompts
    from kd_sweeps.synthetic import make_split

    records = make_split(n, seed, 2, 12, "test")
    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in chat_prompts(tokenizer, records)]
    rng = random.Random(seed)
    caps = [int(round(low * (high / low) ** rng.random())) for _ in prompts]  # log-uniform
    return prompts, caps


class _RowCaps:
    """A StoppingCriteria ending each row at its own cap (a static batch still steps until all end)."""

    def __init__(self, prompt_width: int, caps: list[int]):
        self.width, self.caps = prompt_width, torch.tensor(caps)

    def __call__(self, input_ids, scores, **kwargs):
        return (input_ids.shape[1] - self.width) >= self.caps


@torch.no_grad()
def static(model, tokenizer, prompts, caps, batch_size: int) -> int:
    from transformers import StoppingCriteriaList

    generated = 0
    tokenizer.padding_side = "left"
    for start in range(0, len(prompts), batch_size):
        batch, batch_caps = prompts[start:start + batch_size], caps[start:start + batch_size]
        enc = tokenizer.pad({"input_ids": batch}, return_tensors="pt")
        width = enc["input_ids"].shape[1]
        model.generate(**enc, do_sample=False, max_new_tokens=max(batch_caps), eos_token_id=None,
                       pad_token_id=tokenizer.pad_token_id,
                       stopping_criteria=StoppingCriteriaList([_RowCaps(width, batch_caps)]))
        generated += sum(batch_caps)
    return generated


def continuous(model, tokenizer, prompts, caps, slots: int) -> int:
    from kd_sweeps.generate import Request, Sampling, continuous_generate

    done = []
    continuous_generate(model, [Request((i,), p, max_new_tokens=c) for i, (p, c) in enumerate(zip(prompts, caps))],
                        [], Sampling(), slots, tokenizer.pad_token_id, lambda out: done.extend(out))
    assert sorted(len(g.tokens) for g in done) == sorted(caps)
    return sum(len(g.tokens) for g in done)


def transformers_cb(model, tokenizer, prompts, caps, slots: int) -> int:
    from transformers import ContinuousBatchingConfig, GenerationConfig

    config = GenerationConfig(do_sample=False, eos_token_id=-1, pad_token_id=tokenizer.pad_token_id,
                              max_new_tokens=max(caps))
    longest = max(len(p) for p in prompts) + max(caps)
    cb = ContinuousBatchingConfig(page_size=64, num_blocks=slots * (longest // 64 + 2), max_requests_per_batch=slots,
                                  max_batch_tokens=max(512, slots * 8), use_cuda_graph=False, seed=0)
    with model.continuous_batching_context_manager(generation_config=config, continuous_batching_config=cb,
                                                   warmup=False) as manager:
        for i, (prompt, cap) in enumerate(zip(prompts, caps)):
            manager.add_request(prompt, request_id=str(i), max_new_tokens=cap)
        results = [manager.get_result(timeout=600) for _ in prompts]
    return sum(len(r.generated_tokens) for r in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--problems", type=int, default=96)
    parser.add_argument("--min-tokens", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=16, help="static batch = continuous slots")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--random", action="store_true", help="random-init model of the student's shape")
    parser.add_argument("--skip-transformers-cb", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer, which = load_student(args.random)
    prompts, caps = problem_set(tokenizer, args.problems, args.min_tokens, args.max_tokens, seed=7)
    print(f"model: {which}; {len(prompts)} prompts, caps {min(caps)}-{max(caps)} (median "
          f"{statistics.median(caps):.0f}, total {sum(caps)}); batch/slots {args.batch_size}; "
          f"{args.threads} thread(s); torch {torch.__version__}")
    row_steps = sum(len(caps[i:i + args.batch_size]) * max(caps[i:i + args.batch_size])
                    for i in range(0, len(caps), args.batch_size))
    print(f"static batches step {row_steps} row-tokens for {sum(caps)} completion tokens "
          f"({sum(caps) / row_steps:.0%} useful): the most continuous batching can gain per step is "
          f"{row_steps / sum(caps):.2f}x")
    engines = {"static (old)": static, "continuous (kd_sweeps)": continuous}
    if not args.skip_transformers_cb:
        engines["transformers generate_batch"] = transformers_cb
    rates: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(args.repeats):  # interleaved, so a busy machine slows every engine alike
        for name, run in engines.items():
            started = time.perf_counter()
            tokens = run(model, tokenizer, prompts, caps, args.batch_size)
            rates[name].append(tokens / (time.perf_counter() - started))
    base = statistics.median(rates["static (old)"])
    for name, values in rates.items():
        rate = statistics.median(values)
        print(f"{name:30s} {rate:8.0f} tokens/s  ({rate / base:.2f}x static; runs: "
              f"{', '.join(f'{v:.0f}' for v in values)})")


if __name__ == "__main__":
    main()
