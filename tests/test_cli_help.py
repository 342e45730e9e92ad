"""`python launch.py --help` shows the groups, their choices and every key with its schema comment;
an unknown key or choice gets the closest names."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kd_sweeps.cli_help import command_line_overrides, did_you_mean, key_help, schema_choices, schema_keys, suggestions
from tests.conftest import ROOT, compose_config


def test_every_schema_key_is_listed_with_its_comment_and_composed_value():
    cfg = compose_config(["train.lr=0.0005", "sections=cot"])
    lines = key_help(cfg).splitlines()
    keys = [line.split(" = ", 1)[0].strip() for line in lines]
    assert "train.lr" in keys and "model.teacher.name_or_path" in keys and "train" not in keys  # leaves only
    assert set(keys) <= set(schema_keys()) and len(keys) == len(set(keys))
    by_key = dict(zip(keys, lines))
    assert by_key["train.lr"].split() == ["train.lr", "=", "0.0005", "#", "peak", "learning", "rate"]
    assert "= [CoT]" in by_key["sections.include"] and "= null" in by_key["train.epochs"]
    # A comment block above a field stands for it, first sentence only.
    assert by_key["train.max_steps"].endswith("# Optimizer steps, the same for every trunc; null: derived from "
                                              "epochs over the rows actually kept, …")


def test_unknown_keys_and_choices_get_the_closest_names():
    lines = suggestions(["train.lrr=1", "lr=2", "sections=cott", "trunc=0.5", "+extra.note=x", "hydra.verbose=true",
                         "loss=forward_kl,jsd", "model.teacher.layer=2"])
    assert lines[0].startswith("train.lrr: no such key; did you mean `train.lr`?")
    assert lines[1].startswith("lr: no such key; did you mean `train.lr`?")
    assert lines[2].startswith("sections=cott: no such choice; did you mean `sections=cot` or `sections=cot_ans`?")
    assert lines[3].startswith("model.teacher.layer: no such key; did you mean `model.teacher.layers`")
    assert len(lines) == 4  # known keys, free-form extra.*, hydra.* and sweeps of valid choices pass


def test_a_value_outside_a_closed_choice_gets_the_closest_values():
    assert schema_choices()["loss.name"][0] == "forward_kl" and schema_choices()["eval.baselines"] == ("student",
                                                                                                      "teacher")
    lines = suggestions(["loss.name=forwrd_kl", "train.precision=bf16,fp8", "eval.baselines=[student,techer]",
                         "loss.name=jsd", "distill.mode=on_policy"])
    assert lines[0].startswith("loss.name=forwrd_kl: not a choice; did you mean `loss.name=forward_kl`")
    assert lines[0].endswith("choices: forward_kl, reverse_kl, combined_kl, jsd, tvd, skew_kl, skew_reverse_kl")
    assert lines[1].startswith("train.precision=fp8: not a choice; did you mean `train.precision=fp32`?")
    assert lines[2].startswith("eval.baselines=techer: not a choice; did you mean `eval.baselines=teacher`?")
    assert len(lines) == 3


def test_overrides_are_told_from_hydra_options():
    argv = ["-m", "--config-name=config", "-cn", "config", "trunc=0.5,1.0", "+extra.note=x", "~eval.baselines",
            "--cfg", "job"]
    assert command_line_overrides(argv) == ["trunc=0.5,1.0", "+extra.note=x", "~eval.baselines"]


def test_hints_follow_a_failed_launch_only(capsys):
    with pytest.raises(SystemExit):
        with did_you_mean(["-m", "train.lrr=1"]):
            raise SystemExit(1)
    assert "did you mean `train.lr`?" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        with did_you_mean(["train.lrr=1"]):
            raise SystemExit(0)
    assert capsys.readouterr().err == ""


@pytest.mark.slow
def test_launch_help_lists_groups_choices_and_keys():
    proc = subprocess.run([sys.executable, "launch.py", "--help", "experiment=paper_truncation"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "sections: all, ans, cot, cot_ans, custom, prompt_ans, prompt_cot" in out
    assert "experiment: demo_tradeoff, paper_sections, paper_truncation, paper_windows" in out
    assert "  train.lr = " in out and "# peak learning rate" in out
    assert "  sweep = paper_truncation " in out  # the values of the composition asked for
    assert "powered by Hydra" not in out
