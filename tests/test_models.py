"""Embedded models: real Qwen3 checkpoints, prepared once per config hash even under concurrency."""

from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path

import torch

from kd_sweeps import models

SPEC = {"source": "embedded", "name_or_path": "t", "layers": 1, "hidden": 32, "heads": 2, "prep_steps": 2,
        "prep_lr": 1e-3, "prep_batch_size": 4, "prep_min_steps": 2, "prep_max_steps": 3,
        "prep_examples": 16, "prep_eval_problems": 4}


def _prepare_in_child(cache_dir: str, queue) -> None:
    torch.set_num_threads(1)
    tokenizer = models.embedded_tokenizer(Path(cache_dir))
    prepared = models.prepare_embedded(SPEC, "teacher", tokenizer, Path(cache_dir), "sdpa", torch.device("cpu"))
    queue.put((prepared.path, prepared.info["built_by_pid"]))


def test_parallel_points_prepare_the_model_once(tmp_path):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    children = [ctx.Process(target=_prepare_in_child, args=(str(tmp_path), queue)) for _ in range(2)]
    for child in children:
        child.start()
    for child in children:
        child.join(timeout=300)
        assert child.exitcode == 0
    (path_a, pid_a), (path_b, pid_b) = queue.get(), queue.get()
    assert path_a == path_b and pid_a == pid_b  # one builder; the other waited and loaded
    assert len([p for p in tmp_path.glob("teacher-*") if p.is_dir()]) == 1
    assert not list(tmp_path.glob("*.tmp*"))


def test_prepared_model_reloads_with_identical_logits(tmp_path):
    tokenizer = models.embedded_tokenizer(tmp_path)
    first = models.prepare_embedded(SPEC, "base", tokenizer, tmp_path, "sdpa", torch.device("cpu"))
    again = models.prepare_embedded(SPEC, "base", tokenizer, tmp_path, "sdpa", torch.device("cpu"))
    ids = torch.tensor([tokenizer("3+7×2\n3+7=10, so 0, 1 left")["input_ids"]])  # the embedded task's text
    with torch.no_grad():
        assert torch.equal(first.model(ids).logits, again.model(ids).logits)
    info = json.loads((Path(first.path) / "prep.json").read_text())
    assert 0.0 <= info["accuracy"] <= 1.0 and info["params"] > 0
    assert (Path(first.path) / "model.safetensors").exists()
    assert type(first.model).__name__ == "Qwen3ForCausalLM"


def test_cache_key_changes_with_the_spec():
    assert models.embedded_key(SPEC, "teacher") != models.embedded_key({**SPEC, "hidden": 64}, "teacher")
    assert models.embedded_key(SPEC, "teacher") != models.embedded_key(SPEC, "base")
    assert models.embedded_key(SPEC, "teacher") == models.embedded_key(dict(SPEC), "teacher")


def test_a_one_time_preparation_says_what_why_where_and_how_long(tmp_path, caplog):
    import logging

    tokenizer = models.embedded_tokenizer(tmp_path)
    with caplog.at_level(logging.INFO, logger="kd_sweeps.models"):
        prepared = models.prepare_embedded(SPEC, "teacher", tokenizer, tmp_path, "sdpa", torch.device("cpu"))
    announced = [r.getMessage() for r in caplog.records if r.getMessage().startswith("preparing the embedded")]
    assert len(announced) == 1, [r.getMessage() for r in caplog.records]
    line = announced[0]
    resolved = models.resolved_spec(SPEC, "cpu")["prep_precision"]
    assert f"teacher model (1 layers, hidden 32; 2 CE steps of 4 sequences in {resolved})" in line
    assert "the teacher every grid point distils from" in line and f"reused from {prepared.path}" in line
    assert "About 0m 0" in line and "ms per step, timed now" in line  # 2 steps of a 1-layer model: seconds
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="kd_sweeps.models"):
        models.prepare_embedded(SPEC, "teacher", tokenizer, tmp_path, "sdpa", torch.device("cpu"))
    assert not any(r.getMessage().startswith("preparing") for r in caplog.records)  # cached: nothing to announce
