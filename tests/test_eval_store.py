"""Resumable evaluation: completions on disk as they end, never generated twice, and a killed
evaluation relaunched gives the same per-problem results as one that ran through."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from kd_sweeps import eval_store, evaluate
from kd_sweeps.checkpoint import Preempted
from kd_sweeps.generate import Sampling
from kd_sweeps.synthetic import make_split
from kd_sweeps.tokenizer import build_tokenizer
from tests.conftest import ROOT

N_PROBLEMS = 12


class Cfg:
    max_new_tokens = 48
    batch_size = 1  # one row: no batch composition at all, so greedy runs agree bit for bit
    n_samples = 1
    temperature = 0.0
    top_p = 1.0
    top_k = 0
    engine = "transformers"


def save_tiny_checkpoint(folder) -> None:
    """A random 2-layer Qwen3 (embedded tokenizer) whose greedy completions differ by prompt."""
    from tests.helpers import random_embedded_model

    tokenizer = build_tokenizer()
    random_embedded_model(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def evaluate_checkpoint(folder, results_file, max_new_tokens: int = Cfg.max_new_tokens) -> evaluate.EvalResult:
    """What the evaluation job does for one benchmark (also run in a subprocess below)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    cfg = Cfg()
    cfg.max_new_tokens = max_new_tokens
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return evaluate.evaluate(model, tokenizer, make_split(N_PROBLEMS, seed=0), cfg, torch.device("cpu"),
                             checkpoint=folder, seed=1, results_file=results_file)


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _by_problem(path) -> dict:
    return {(r["problem"], r["sample"]): {k: r[k] for k in ("completion", "tokens", "finished", "correct")}
            for r in _rows(path)}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    save_tiny_checkpoint(folder)
    return folder


@pytest.mark.slow
def test_killed_evaluation_resumes_without_generating_anything_twice(checkpoint, tmp_path):
    through, killed = tmp_path / "through.jsonl", tmp_path / "killed.jsonl"
    # Slowed down (many more tokens per problem) so that the kill lands mid-way.
    code = ("import sys; from tests.test_eval_store import evaluate_checkpoint; "
            "evaluate_checkpoint(sys.argv[1], sys.argv[2], max_new_tokens=int(sys.argv[3]))")
    process = subprocess.Popen([sys.executable, "-c", code, str(checkpoint), str(killed), str(Cfg.max_new_tokens)],
                               cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 300
        while not (killed.exists() and len(killed.read_bytes().splitlines()) >= 3):
            assert process.poll() is None and time.monotonic() < deadline, "the evaluation ended before it was killed"
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    written = len(_rows(killed))
    assert 3 <= written < N_PROBLEMS, written  # killed mid-way

    resumed = evaluate_checkpoint(checkpoint, killed)
    assert resumed.resumed == written and resumed.n == N_PROBLEMS
    rows = _rows(killed)
    assert len(rows) == N_PROBLEMS  # the relaunch appended only what was missing
    assert len({(r["problem"], r["sample"]) for r in rows}) == N_PROBLEMS  # nothing generated twice

    uninterrupted = evaluate_checkpoint(checkpoint, through)
    assert _by_problem(killed) == _by_problem(through)
    assert (resumed.per_problem, resumed.generated_tokens, resumed.finished_rate) == \
        (uninterrupted.per_problem, uninterrupted.generated_tokens, uninterrupted.finished_rate)
    assert 0 < resumed.finished_rate < 1  # some completions stopped, others reached the limit


def test_a_torn_last_line_is_cut_and_other_settings_are_never_reused(checkpoint, tmp_path):
    results = tmp_path / "synthetic.jsonl"
    first = evaluate_checkpoint(checkpoint, results, max_new_tokens=8)
    lines = results.read_bytes().splitlines(keepends=True)
    results.write_bytes(b"".join(lines[:-1]) + lines[-1][:25])  # a kill in the middle of the last line
    again = evaluate_checkpoint(checkpoint, results, max_new_tokens=8)
    assert again.resumed == N_PROBLEMS - 1 and again.per_problem == first.per_problem
    assert len(_rows(results)) == N_PROBLEMS  # the torn line was cut, its problem generated once more

    longer = evaluate_checkpoint(checkpoint, results, max_new_tokens=9)  # another setting: another key
    assert longer.resumed == 0 and len(_rows(results)) == 2 * N_PROBLEMS
    assert len({r["key"] for r in _rows(results)}) == 2


def test_the_key_follows_the_checkpoint_bytes_and_the_sampling(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    (tmp_path / ".lock").write_bytes(b"not part of the checkpoint")
    greedy = Sampling()
    key = eval_store.results_key(tmp_path, greedy, [2], seed=0, engine="transformers")
    assert key == eval_store.results_key(tmp_path, greedy, [2], seed=0, engine="transformers")
    others = {eval_store.results_key(tmp_path, Sampling(top_k=20), [2], 0, "transformers"),
              eval_store.results_key(tmp_path, greedy, [2, 5], 0, "transformers"),
              eval_store.results_key(tmp_path, greedy, [2], 1, "transformers"),
              eval_store.results_key(tmp_path, greedy, [2], 0, "vllm")}
    (tmp_path / "model.safetensors").write_bytes(b"weightz")  # same size, other bytes
    others.add(eval_store.results_key(tmp_path, greedy, [2], seed=0, engine="transformers"))
    assert key not in others and len(others) == 5


def test_a_preemption_signal_stops_generation_with_the_finished_ones_kept(checkpoint, tmp_path, monkeypatch):
    results = tmp_path / "synthetic.jsonl"
    append = eval_store.ResultStore.append

    def append_then_signal(self, rows):  # the scheduler's warning arrives after the first completion
        append(self, rows)
        os.kill(os.getpid(), signal.SIGUSR2)

    monkeypatch.setattr(eval_store.ResultStore, "append", append_then_signal)
    previous = signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    try:
        with pytest.raises(Preempted, match="evaluation stopped by a preemption signal"):
            evaluate_checkpoint(checkpoint, results, max_new_tokens=8)
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert len(_rows(results)) == 1  # stopped before the next step
    monkeypatch.setattr(eval_store.ResultStore, "append", append)
    assert evaluate_checkpoint(checkpoint, results, max_new_tokens=8).resumed == 1
