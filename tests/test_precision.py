"""train.precision=auto picks bf16 only where the device computes it natively; the student's master
weights are fp32 whatever the compute precision, so fine-tuning updates at lr 4e-6 reach them."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from kd_sweeps import models, precision
from kd_sweeps.schema import LossConfig, TrainConfig
from tests.conftest import ROOT

FLAGS = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f {extra}\nbogomips\t: 4000\n"


@pytest.mark.parametrize("extra, expected", [("avx512_bf16", "bf16"), ("amx_bf16 amx_tile", "bf16"),
                                             ("avx512_vnni", "fp32"), ("", "fp32")])
def test_auto_on_a_cpu_follows_its_flags(tmp_path, monkeypatch, extra, expected):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(FLAGS.format(extra=extra))
    monkeypatch.setattr(precision, "CPUINFO", cpuinfo)
    assert precision.resolve("auto", "cpu") == expected
    assert precision.resolve("bf16", "cpu") == "bf16" and precision.resolve("fp32", "cpu") == "fp32"  # as asked


def test_auto_without_cpuinfo_is_fp32(tmp_path, monkeypatch):
    monkeypatch.setattr(precision, "CPUINFO", tmp_path / "absent")  # macOS, Windows: nothing to read
    assert precision.resolve("auto", torch.device("cpu")) == "fp32"


@pytest.mark.parametrize("available, native, expected", [(True, True, "bf16"), (True, False, "fp32"),
                                                         (False, True, "fp32")])
def test_auto_on_cuda_asks_for_native_bf16(monkeypatch, available, native, expected):
    asked = {}

    def is_bf16_supported(including_emulation=True):
        asked["including_emulation"] = including_emulation
        return native

    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    assert precision.resolve("auto", "cuda") == expected
    assert asked.get("including_emulation", False) is False  # an emulated bf16 GPU counts as none


def test_bad_precision_is_named():
    with pytest.raises(ValueError, match="precision='fp8': must be one of auto, bf16, fp32"):
        precision.resolve("fp8", "cpu")


@pytest.mark.parametrize("native", [True, False])
def test_embedded_cache_key_holds_the_resolved_precision(monkeypatch, native):
    """A model prepared in fp32 is never reused for bf16 and vice versa; auto shares the key of the
    precision it resolves to (so this machine's bf16 caches stay valid)."""
    monkeypatch.setattr(precision, "native_bf16", lambda device: native)
    spec = {"layers": 1, "hidden": 32, "heads": 2, "prep_steps": 2, "prep_precision": "auto"}
    resolved = "bf16" if native else "fp32"
    other = "fp32" if native else "bf16"
    key = models.embedded_key(spec, "teacher", "cpu")
    assert key == models.embedded_key({**spec, "prep_precision": resolved}, "teacher", "cpu")
    assert key != models.embedded_key({**spec, "prep_precision": other}, "teacher", "cpu")
    assert models.resolved_spec(spec, "cpu")["prep_precision"] == resolved


@pytest.mark.parametrize("native", [True, False])
def test_the_loop_autocasts_to_bf16_only_where_auto_resolves_to_it(monkeypatch, native):
    from kd_sweeps import batch_loss, train
    from tests.helpers import tiny_setup

    tokenizer, examples, student, _ = tiny_setup(16)
    monkeypatch.setattr(precision, "native_bf16", lambda device: native)
    seen = []
    real = batch_loss.step_losses

    def spy(*args, **kwargs):
        seen.append(args[5])  # autocast
        return real(*args, **kwargs)

    monkeypatch.setattr(batch_loss, "step_losses", spy)
    settings = TrainConfig(max_steps=1, batch_size=4, precision="auto")
    train.train_loop(student, None, examples, tokenizer.pad_token_id, settings, LossConfig(kd_ratio=0.0),
                     torch.device("cpu"))
    assert seen == [native]
    assert all(p.dtype == torch.float32 for p in student.parameters())  # the weights stay fp32 either way


@pytest.fixture(scope="module")
def weights_moved():
    spec = importlib.util.spec_from_file_location("weights_moved", ROOT / "benchmarks" / "weights_moved.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_fp32_master_weights_take_every_update_at_the_papers_lr(weights_moved, qwen3_dir, monkeypatch):
    """The real Qwen3 tokenizer, weights of scale 0.02, model=qwen3_local loaded by models.load_pair,
    train=paper (2 steps at lr 4e-6, bf16 compute): every weight element moves; with the student's
    weights in bf16 most updates round away (what load_pair did before)."""
    monkeypatch.setattr(precision, "native_bf16", lambda device: True)  # the paper's GPUs
    fp32 = weights_moved.moved_fraction(qwen3_dir, "fp32", [], sequences=8)
    assert fp32["dtype"] == "float32"
    assert fp32["moved"] >= 0.99 and fp32["norms_moved"] >= 0.99, fp32
    bf16 = weights_moved.moved_fraction(qwen3_dir, "bf16", [], sequences=8)
    assert bf16["moved"] < 0.5 and bf16["norms_moved"] == 0.0, bf16
