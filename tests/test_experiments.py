"""Every config file composes and validates; every experiment preset runs one tiny step with its
models and data swapped for tiny local ones (same code path as the hub: from_pretrained on files)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from kd_sweeps import run
from kd_sweeps.validation import validate
from tests.conftest import CONF, compose_config
from tests.tiny_hub import FIXTURES, build_tiny_hub_model

GROUPS = ["model", "data", "sections", "loss", "train", "eval", "logger", "launcher"]
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def preset_overrides():
    for group in GROUPS:
        for path in sorted((CONF / group).glob("*.yaml")):
            yield f"{group}={path.stem}"


def valid_companions(override: str) -> list[str]:
    """A dataset preset needs a non-embedded benchmark; the embedded default evaluates 'synthetic'."""
    if override.startswith("data=") and not override.endswith("=synthetic"):
        return ["eval=math"]
    return []


def assert_preset_applied(overrides: list[str], group: str | None, path: Path) -> None:
    """Every value the preset file sets is the composed config's value, in the file's package (the
    group's node, or the root for ``# @package _global_``): a preset whose values land elsewhere or
    are replaced by a later default fails here, where validation alone would pass other values."""
    is_global = "# @package _global_" in path.read_text()
    composed = OmegaConf.to_container(compose_config(overrides, return_hydra_config=is_global), resolve=False)
    node = composed if is_global else composed[group]
    written = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    written.pop("defaults", None)  # group choices, not values

    def compare(want, got, key):
        if isinstance(want, dict):
            assert isinstance(got, dict), (path.name, key, got)
            for name, value in want.items():
                assert name in got, (path.name, f"{key}.{name}".lstrip("."))
                compare(value, got[name], f"{key}.{name}")
        else:
            assert got == want, (path.name, key.lstrip("."), got, want)

    compare(written, node, "")


@pytest.mark.parametrize("override", list(preset_overrides()))
def test_every_preset_composes_and_validates(override, tmp_path, monkeypatch):
    if override == "model=qwen3_local":  # reads its folders from $QWEN3_DIR (the real tokenizers)
        from tests.qwen3_hub import build_qwen3_pair

        build_qwen3_pair(tmp_path)
        monkeypatch.setenv("QWEN3_DIR", str(tmp_path))
    overrides = [override, *valid_companions(override)]
    validate(compose_config(overrides))
    group, name = override.split("=")
    assert_preset_applied(overrides, group, CONF / group / f"{name}.yaml")


def test_local_qwen3_preset_without_its_folder_says_what_to_set(monkeypatch):
    monkeypatch.delenv("QWEN3_DIR", raising=False)
    with pytest.raises(ValueError, match="QWEN3_DIR"):
        validate(compose_config(["model=qwen3_local"]))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_validates(experiment):
    validate(compose_config([f"experiment={experiment}"]))
    assert_preset_applied([f"experiment={experiment}"], None, CONF / "experiment" / f"{experiment}.yaml")


@pytest.fixture(scope="module")
def tiny_hub(tmp_path_factory):
    return build_tiny_hub_model(tmp_path_factory.mktemp("hub") / "tiny-qwen3")


def tiny_swaps(name: str, tiny_hub, out) -> list[str]:
    """Keep the experiment's sweep, sections, loss and truncation; swap everything heavy."""
    benchmark_paths = {b: str(FIXTURES / "benchmarks" / f"{b}.jsonl") for b in ("aime24", "aime25", "math500")}
    return [
        f"experiment={name}", f"output_dir={out}", "logger=disabled",
        f"model.teacher.name_or_path={tiny_hub}", f"model.student.name_or_path={tiny_hub}",
        "data.source=json", f"data.path={FIXTURES / 'datasets' / 'bespoke_stratos17k.jsonl'}",
        "data.name=bespoke_stratos17k", "data.n_train=2", "data.n_val=1", "data.max_tokens=4096",
        "train.max_steps=1", "train.batch_size=1", "train.micro_batch_size=1", "train.precision=fp32",
        "eval.n_problems=1", "eval.n_samples=1", "eval.max_new_tokens=4", "eval.batch_size=1",
        "+eval.benchmark_paths=" + json.dumps(benchmark_paths).replace('"', ""),
    ]


@pytest.mark.parametrize("experiment", [e for e in EXPERIMENTS if e.startswith("paper_")])
def test_paper_experiment_runs_one_tiny_step(experiment, tiny_hub, tmp_path):
    cfg = compose_config(tiny_swaps(experiment, tiny_hub, tmp_path))
    summary = run.main(cfg)
    assert summary["tokens_trained"] > 0 and summary["train_flops"] > 0
    for bench in cfg.eval.benchmarks:
        assert summary[f"eval/{bench}/n"] == 1
    assert json.loads((tmp_path / "result.json").read_text())["status"] == "ok"
