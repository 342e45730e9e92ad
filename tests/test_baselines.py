"""References (eval.baselines): the untrained student and the teacher, evaluated as the grid points
are, once per model and evaluation, cached and read by the next point."""

from __future__ import annotations

import json

import pytest

from kd_sweeps import baselines, run
from tests.conftest import compose_config
from tests.helpers import FAST

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(tmp_path, *extra):
    cfg = compose_config([*FAST, "train.max_steps=1", f"cache_dir={tmp_path / 'cache'}",
                          "eval.baselines=[student,teacher]", *extra])
    cfg.output_dir = str(tmp_path / "point")
    return cfg


def test_references_are_measured_once_as_the_points_are_and_read_back(tmp_path):
    summary = run.main(_cfg(tmp_path))
    assert summary["sequences_trained"] == 8 and summary["examples_trained_on"] == 64  # 1 step of 8; the data
    folders = {role: baselines.baseline_folder(_cfg(tmp_path), role, summary[path])
               for role, path in (("student", "student_init_path"), ("teacher", "teacher_path"))}
    for role, prefix in (("student", "base"), ("teacher", "teacher")):
        stored = json.loads((folders[role] / "summary.json").read_text())
        assert summary[f"{prefix}_accuracy"] == stored["accuracy"]
        assert summary[f"{prefix}/synthetic/accuracy"] == stored["eval/synthetic/accuracy"]
        # the same problems as the point: one completion per problem, in the reference's own folder
        completions = (folders[role] / "eval" / "synthetic.jsonl").read_text().splitlines()
        assert len(completions) == summary["eval/synthetic/n"] == 8
    before = {role: (f / "summary.json").stat().st_mtime_ns for role, f in folders.items()}
    again = run.main(_cfg(tmp_path, "trunc=0.5"))  # another point: the references are read, not measured
    assert {role: (f / "summary.json").stat().st_mtime_ns for role, f in folders.items()} == before
    assert again["base_accuracy"] == summary["base_accuracy"]
    assert again["teacher_accuracy"] == summary["teacher_accuracy"]
    other = baselines.baseline_folder(_cfg(tmp_path, "eval.max_new_tokens=40"), "teacher", summary["teacher_path"])
    assert other != folders["teacher"]  # another evaluation: another reference
    assert baselines.baseline_folder(_cfg(tmp_path, "eval.separate_job=true"), "teacher",
                                     summary["teacher_path"]) == folders["teacher"]


def test_a_reference_being_measured_elsewhere_is_not_waited_for(tmp_path):
    from filelock import FileLock

    cfg = _cfg(tmp_path, "eval.baselines=[teacher]")
    stand_in = str(tmp_path / "some-teacher")
    with FileLock(str(baselines.baseline_folder(cfg, "teacher", stand_in)) + ".lock"):
        found = baselines.reference_summary(cfg, {"teacher": stand_in}, None, "cpu", {})
    assert found == {}


def test_without_references_the_embedded_preparation_accuracies_remain(tmp_path):
    summary = run.main(_cfg(tmp_path, "eval.baselines=[]"))
    assert not (tmp_path / "cache" / "baselines").exists()
    assert 0.0 <= summary["base_accuracy"] <= 1.0 and "base/synthetic/accuracy" not in summary


def test_a_hub_reference_is_read_from_the_local_cache_and_a_missing_one_does_not_fail_the_point(tmp_path,
                                                                                               monkeypatch):
    """A hub id is evaluated from its snapshot in the local Hugging Face cache (the run loaded it from
    there); one that is not there is named in the record and the point's own result stands."""
    from tests.tiny_hub import build_tiny_hub_model

    snapshot = tmp_path / "hub" / "models--org--tiny" / "snapshots" / ("a" * 40)
    build_tiny_hub_model(snapshot)
    (tmp_path / "hub" / "models--org--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--tiny" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert baselines.local_folder("org/tiny") == snapshot
    with pytest.raises(FileNotFoundError, match="'org/absent' is neither a local folder nor in the local"):
        baselines.local_folder("org/absent")
    cfg = _cfg(tmp_path, "eval.baselines=[teacher]")
    found = baselines.reference_summary(cfg, {"teacher": "org/absent"}, None, "cpu", {})
    assert list(found) == ["teacher_reference_error"] and "org/absent" in found["teacher_reference_error"]
    # A new revision of the same id is another reference, not the cached one of the old weights.
    before = baselines.baseline_folder(cfg, "teacher", "org/tiny")
    build_tiny_hub_model(snapshot.parent / ("b" * 40))
    (tmp_path / "hub" / "models--org--tiny" / "refs" / "main").write_text("b" * 40)
    assert baselines.local_folder("org/tiny") == snapshot.parent / ("b" * 40)
    assert baselines.baseline_folder(cfg, "teacher", "org/tiny") != before


def test_a_local_model_saved_again_is_another_reference(tmp_path):
    """A reference of a local folder is keyed by its weight files too: the same path holding other
    weights (saved again) is measured again, not read from the old weights' cache."""
    import os

    from tests.tiny_hub import build_tiny_hub_model

    folder = tmp_path / "model"
    build_tiny_hub_model(folder)
    cfg = _cfg(tmp_path, "eval.baselines=[student]")
    first = baselines.baseline_folder(cfg, "student", str(folder))
    assert baselines.baseline_folder(cfg, "student", str(folder)) == first  # stable while the files are
    weights = next(folder.glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert baselines.baseline_folder(cfg, "student", str(folder)) != first
