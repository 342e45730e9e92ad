"""The commands of docs/cluster.md use keys, groups and flags that exist: its overrides compose and
its analysis commands parse (the cluster itself is not needed)."""

from __future__ import annotations

import re
import shlex

from tests.conftest import ROOT, compose_config

DOC = (ROOT / "docs" / "cluster.md").read_text()


def _paper_overrides(monkeypatch) -> list[str]:
    """The shell array PAPER=(...) of the doc, its variables and <placeholders> filled in."""
    monkeypatch.setenv("QWEN3_DIR", "/shared/models")
    body = re.search(r"^PAPER=\((.*?)\)$", DOC, re.S | re.M).group(1)
    text = re.sub(r"<[^>]+>", "x", body.replace("$DATA_DIR", "/shared/data"))
    return [re.sub(r"\$(\w+)", r"/shared/data/\1.parquet", word) for word in shlex.split(text)]


def test_the_docs_overrides_compose_to_the_paper_setup(monkeypatch):
    overrides = _paper_overrides(monkeypatch)
    assert "experiment=paper_truncation" in overrides and "launcher=slurm_gpu_4b_8b" in overrides
    cfg = compose_config(overrides)
    assert cfg.model.teacher.name_or_path == "/shared/models/Qwen3-8B"  # model=qwen3_local wins over the preset's
    assert cfg.model.student.name_or_path == "/shared/models/Qwen3-4B-Base"
    assert cfg.data.source == "path" and cfg.data.path == "/shared/data/Bespoke-Stratos-17k"
    assert dict(cfg.eval.benchmark_paths) == {name: f"/shared/data/{var}.parquet" for name, var in
                                             (("aime24", "AIME24_FILE"), ("aime25", "AIME25_FILE"),
                                              ("math500", "MATH500_FILE"))}
    assert set(cfg.eval.benchmark_paths) == set(cfg.eval.benchmarks) and cfg.sweep == "paper_truncation"


def test_the_docs_analysis_commands_parse():
    from analysis.cli import build_parser

    commands = re.findall(r"^python -m analysis (.+?)(?:\s+#.*)?$", DOC, re.M)
    assert len(commands) == 2
    for command in commands:
        args = build_parser().parse_args(shlex.split(command))
        assert str(args.source) == "multirun/paper_truncation" and args.command in ("paper", "tradeoff")


def test_the_docs_plan_flags_exist():
    source = (ROOT / "kd_sweeps" / "plan.py").read_text()
    flags = set(re.findall(r"`(--[a-z-]+)", DOC.split("## 4. The plan first")[1].split("## 5.")[0]))
    assert flags >= {"--lengths", "--eval-tokens", "--eval-tokens-per-s", "--csv"}
    assert all(f'"{flag}"' in source for flag in flags), flags
