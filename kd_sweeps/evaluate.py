"""Evaluation: generate answers to held-out problems, check them, report accuracy ± standard error.

Generation stops where the assistant's turn ends: at the first token of the stop set (the
tokenizer's eos, the chat template's end-of-turn token, the model's ``generation_config`` eos ids),
in every engine; the completion is cut there and the stop token counts as generated. Sampling is
the same in every engine, every knob explicit (``eval.temperature``, ``top_p``, ``top_k``,
``n_samples``, ``max_new_tokens``); temperature 0 is greedy. With ``n_samples > 1`` accuracy is
pass@1 estimated as the mean over samples, and the standard error is taken over problems.

With a ``results_file`` the evaluation is resumable: every completion is appended to it (one
fsync'd JSON line) the moment it ends, keyed by everything that decides it (``eval_store``), and a
relaunched evaluation generates only what is not there yet.

A grid point's evaluation (``load_eval_sets`` then ``evaluate_model``) is the same in the training
job, in the evaluation job (``eval_job``) and for the references (``baselines``).
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
from omegaconf import DictConfig

from kd_sweeps.choices import Engine, values
from kd_sweeps.data import load_records, prompt_messages
from kd_sweeps.generate import Generated, Request, Sampling

log = logging.getLogger(__name__)
ENGINES = values(Engine)
_SENTINEL = "KDSWEEPSENDOFTURNPROBE"  # an assistant turn's content, to find what the template puts after it


@dataclass
class EvalResult:
    accuracy: float
    stderr: float
    n: int  # problems
    generated_tokens: int  # eval cost: tokens produced (up to and including the stop token)
    per_problem: list[float]  # mean correctness per problem, for paired comparisons
    finished_rate: float = float("nan")  # fraction of completions that ended with a stop token
    gen_tokens_mean: float = float("nan")  # generated tokens per completion
    gen_tokens_max: int = 0
    resumed: int = 0  # completions read back from the results file instead of generated


@dataclass
class Completion:
    text: str  # decoded up to (not including) the stop token; <think>/</think> kept
    tokens: int  # generated tokens, the stop token included
    finished: bool  # ended with a stop token (False: reached max_new_tokens)


def answers_match(completion: str, gold: str) -> bool:
    """The last ``\\boxed{}`` of a completion against the gold answer: exact match first (fast, and
    all the embedded task needs); otherwise math-verify, which knows that 1/2, 0.5 and
    \\frac{1}{2} agree. A completion without a boxed answer is wrong: every prompt asks for one,
    and falling back to "any number in the text" lets a random model score on a 0-9 answer space."""
    from kd_sweeps.answers import last_boxed
    from kd_sweeps.benchmarks import check_answer

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


def end_of_turn_id(tokenizer) -> Optional[int]:
    """The special token the chat template writes right after an assistant turn's content
    (``<|im_end|>`` for Qwen), read from the template itself: one turn is rendered around a sentinel
    and the first non-blank token after it is taken if it is special. None when the template writes
    none there (or cannot render an assistant turn)."""
    messages = [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": _SENTINEL}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # noqa: BLE001 - a template that refuses this conversation has no answer here
        return None
    if not isinstance(text, str) or _SENTINEL not in text:
        return None
    after = tokenizer(text.split(_SENTINEL, 1)[1], add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids)
    for token in after:
        if token in special:
            return int(token)
        if tokenizer.decode([token]).strip():  # plain text first: no end-of-turn token
            return None
    return None


def _as_ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def stop_token_ids(tokenizer, model=None, checkpoint=None) -> list[int]:
    """Where generation stops: the tokenizer's eos, the chat template's end-of-turn token, and every
    eos id of the model's generation config (``model.generation_config``, or the checkpoint folder's
    generation_config.json). First occurrence order, no repeats."""
    ids = _as_ids(tokenizer.eos_token_id) + _as_ids(end_of_turn_id(tokenizer))
    config = getattr(model, "generation_config", None)
    if config is None and checkpoint is not None and (Path(checkpoint) / "generation_config.json").exists():
        from transformers import GenerationConfig

        config = GenerationConfig.from_pretrained(checkpoint)
    if config is not None:
        ids += _as_ids(config.eos_token_id)
    return list(dict.fromkeys(ids))


def cut_completion(tokenizer, ids: Sequence[int], stop_ids: Sequence[int]) -> Completion:
    """One completion's ids → text cut before the first stop token (which is counted: it was
    generated), padding after it dropped; without a stop token, padding (if any) is dropped."""
    ids, stops = [int(t) for t in ids], set(stop_ids)
    end = next((i for i, t in enumerate(ids) if t in stops), None)
    if end is not None:
        return Completion(tokenizer.decode(ids[:end], skip_special_tokens=False), end + 1, True)
    ids = [t for t in ids if t != tokenizer.pad_token_id]
    return Completion(tokenizer.decode(ids, skip_special_tokens=False), len(ids), False)


def completion_text(tokenizer, ids: Sequence[int], stop_ids: Optional[Sequence[int]] = None) -> tuple[str, int]:
    """(text, generated-token count) of one completion; ``stop_ids`` default: the tokenizer's eos."""
    done = cut_completion(tokenizer, ids, stop_ids if stop_ids is not None else _as_ids(tokenizer.eos_token_id))
    return done.text, done.tokens


def sampling_settings(eval_cfg) -> Sampling:
    """The decoding knobs of ``eval`` (an object without ``top_k`` means top-k off)."""
    return Sampling(temperature=float(eval_cfg.temperature), top_p=float(eval_cfg.top_p),
                    top_k=int(getattr(eval_cfg, "top_k", 0) or 0), max_new_tokens=int(eval_cfg.max_new_tokens))


def request_seed(seed: int, problem: int, sample: int) -> int:
    """The sampling seed of one (problem, sample): independent of batching and of resumption."""
    digest = hashlib.sha256(f"{seed}:{problem}:{sample}".encode()).digest()
    return int.from_bytes(digest[:7], "little")  # < 2**56: valid for torch and vLLM alike


def benchmark_records(name: str, eval_cfg) -> list[dict]:
    """Problems of a math benchmark (hub, or a local copy named in eval.benchmark_paths)."""
    from kd_sweeps.benchmarks import load_benchmark

    path = (eval_cfg.benchmark_paths or {}).get(name)
    return load_benchmark(name, path=path, n=eval_cfg.n_problems, prompt_style=eval_cfg.prompt_style)


@dataclass
class _Collector:
    """Turns finished generations into scored rows, stores them, and keeps them by (problem, sample)."""

    tokenizer: object
    records: Sequence[dict]
    stop_ids: Sequence[int]
    store: object = None  # eval_store.ResultStore or None
    rows: dict = field(default_factory=dict)

    def __call__(self, finished: list[Generated]) -> None:
        new = []
        for item in finished:
            problem, sample = item.key
            done = cut_completion(self.tokenizer, item.tokens, self.stop_ids)
            new.append({"problem": problem, "sample": sample, "completion": done.text, "tokens": done.tokens,
                        "finished": done.finished,
                        "correct": answers_match(done.text, self.records[problem]["answer"])})
        if self.store is not None:
            self.store.append(new)  # on disk before anything else happens: a kill loses none of them
        self.rows.update({(row["problem"], row["sample"]): row for row in new})


def evaluate(model, tokenizer, records: Sequence[dict], eval_cfg, device, checkpoint=None, seed: int = 0,
             results_file=None) -> EvalResult:
    """Generate with ``eval_cfg.engine`` (transformers on ``model``; vLLM from the saved ``checkpoint``
    folder) and score the completions. ``results_file``: resume from / append to it (needs
    ``checkpoint``, whose files are part of the results' key)."""
    from kd_sweeps import eval_store

    engine = resolve_engine(getattr(eval_cfg, "engine", "transformers"), device)
    if engine == "vllm" and checkpoint is None:
        raise ValueError("eval.engine=vllm generates from a saved checkpoint folder; none was given")
    sampling = sampling_settings(eval_cfg)
    stop_ids = stop_token_ids(tokenizer, model, checkpoint)
    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in chat_prompts(tokenizer, records)]
    store = None
    if results_file is not None:
        if checkpoint is None:
            raise ValueError("a resumable evaluation (results_file) needs the checkpoint folder it evaluates")
        key = eval_store.results_key(checkpoint=checkpoint, sampling=sampling, stop_ids=stop_ids, seed=seed,
                                     engine=engine)
        store = eval_store.ResultStore(results_file, key, prompts, [r["answer"] for r in records])
    collect = _Collector(tokenizer, records, stop_ids, store, dict(store.load()) if store else {})
    resumed = len(collect.rows)
    todo = [Request((p, s), prompts[p], request_seed(seed, p, s)) for p in range(len(records))
            for s in range(eval_cfg.n_samples) if (p, s) not in collect.rows]
    if resumed:
        log.info("evaluation resumed from %s: %d completions done, %d to generate", results_file, resumed, len(todo))
    if todo:
        with eval_store.preemption_check() as check:
            if engine == "vllm":
                from kd_sweeps.generate_vllm import generate_vllm

                generate_vllm(checkpoint, todo, stop_ids, sampling, seed, collect, check)
            else:
                from kd_sweeps.generate import continuous_generate

                continuous_generate(model, todo, stop_ids, sampling, eval_cfg.batch_size, tokenizer.pad_token_id,
                                    collect, check)
    rows = [[collect.rows[(p, s)] for s in range(eval_cfg.n_samples)] for p in range(len(records))]
    result = summarize(rows)
    result.resumed = resumed
    return result


def summarize(rows: Sequence[Sequence[dict]]) -> EvalResult:
    """EvalResult from every problem's scored samples (dicts with correct, tokens, finished)."""
    per_problem = [sum(bool(s["correct"]) for s in samples) / len(samples) for samples in rows]
    flat = [s for samples in rows for s in samples]
    accuracy, stderr = mean_stderr(per_problem)
    counts = [int(s["tokens"]) for s in flat]
    return EvalResult(accuracy, stderr, len(rows), sum(counts), per_problem,
                      finished_rate=sum(bool(s["finished"]) for s in flat) / len(flat) if flat else float("nan"),
                      gen_tokens_mean=sum(counts) / len(counts) if counts else float("nan"),
                      gen_tokens_max=max(counts, default=0))


def score(records: Sequence[dict], completions: Sequence[Sequence[str]], generated: int) -> EvalResult:
    """Accuracy ± standard error over problems from every record's completion texts (either
    engine's); token counts and stops are not known here, so only the total is reported."""
    per_problem = []
    for record, samples in zip(records, completions):
        hits = [answers_match(text, record["answer"]) for text in samples]
        per_problem.append(sum(hits) / len(hits))
    accuracy, stderr = mean_stderr(per_problem)
    return EvalResult(accuracy, stderr, len(records), generated, per_problem)


def load_eval_sets(cfg: DictConfig) -> dict[str, list[dict]]:
    """The evaluation problems of every benchmark in ``eval.benchmarks`` (at most ``eval.n_problems``;
    a benchmark with fewer problems gives them all, and the log says so: ``eval/<bench>/n`` records it)."""
    sets = {bench: load_records(cfg.data, "test")[: cfg.eval.n_problems] if bench == "synthetic"
            else benchmark_records(bench, cfg.eval) for bench in cfg.eval.benchmarks}
    for bench, problems in sets.items():
        if len(problems) < cfg.eval.n_problems:
            log.info("eval.n_problems=%d: %s has %d problems; all of them are evaluated", cfg.eval.n_problems,
                     bench, len(problems))
    return sets


def evaluate_model(cfg: DictConfig, model, tokenizer, eval_sets: dict, device, checkpoint: Path,
                   results_dir: Path | None = None) -> dict:
    """Accuracy ± stderr per benchmark, per-problem scores, generated tokens and how many completions
    stopped at the end of their turn; and their means over benchmarks. ``model`` None: the vLLM
    engine generates from ``checkpoint`` (the same weights, saved). Every completion is appended to
    ``<point>/eval/<benchmark>.jsonl`` (``results_dir``/<benchmark>.jsonl) as it ends: a relaunched
    evaluation resumes from there."""
    summary: dict = {}
    results: dict[str, EvalResult] = {}
    for bench in cfg.eval.benchmarks:
        result = results[bench] = evaluate(
            model, tokenizer, eval_sets[bench], cfg.eval, device, checkpoint=checkpoint, seed=cfg.seed,
            results_file=(results_dir or Path(checkpoint).parent / "eval") / f"{bench}.jsonl")
        summary.update({f"eval/{bench}/accuracy": result.accuracy, f"eval/{bench}/stderr": result.stderr,
                        f"eval/{bench}/n": result.n, f"eval/{bench}/generated_tokens": result.generated_tokens,
                        f"eval/{bench}/per_problem": result.per_problem,
                        f"eval/{bench}/finished_rate": result.finished_rate,
                        f"eval/{bench}/gen_tokens_mean": result.gen_tokens_mean,
                        f"eval/{bench}/gen_tokens_max": result.gen_tokens_max})
    done = list(results.values())
    summary["accuracy"] = sum(r.accuracy for r in done) / len(done)
    summary["accuracy_stderr"] = (sum(r.stderr**2 for r in done) ** 0.5) / len(done)
    summary["finished_rate"] = sum(r.finished_rate for r in done) / len(done)
    summary["gen_tokens_mean"] = sum(r.gen_tokens_mean for r in done) / len(done)
    return summary


def reference_paths(summary: dict) -> dict[str, str]:
    """Role -> where the untrained model is (its folder or hub id), as the training recorded it."""
    return {"student": summary.get("student_init_path"), "teacher": summary.get("teacher_path")}
