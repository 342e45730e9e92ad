"""Every bad value is reported with its key, the value and what is allowed, all at once."""

from __future__ import annotations

import pytest

from kd_sweeps.validation import ConfigError, validate
from tests.conftest import compose_config


def problems(overrides) -> str:
    with pytest.raises(ConfigError) as info:
        validate(compose_config(overrides))
    return str(info.value)


def test_default_config_is_valid():
    cfg = compose_config()
    validate(cfg)
    # The default is the embedded demo: models and data made in code, W&B offline (no download, no account).
    assert (cfg.model.teacher.source, cfg.model.student.source, cfg.data.source) == ("embedded", "embedded",
                                                                                     "synthetic")
    assert list(cfg.eval.benchmarks) == ["synthetic"] and cfg.logger.mode == "offline"


@pytest.mark.parametrize("value", ["0", "-0.5", "1.5", "nan"])
def test_trunc_outside_unit_interval(value):
    message = problems([f"trunc={value}"])
    assert "trunc=" in message and "in (0, 1]" in message


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["sections=custom", "sections.include=[]"], "sections.include=[]: choose at least one of P, CoT, A"),
        (["sections=cot", "sections.include=[P]"], "preset 'cot' is ['CoT']; set sections.name=custom"),
        (["loss.kd_ratio=1.5"], "loss.kd_ratio=1.5: must be in [0, 1]"),
        (["loss.kd_ratio=-0.1"], "loss.kd_ratio=-0.1: must be in [0, 1]"),
        (["loss.temperature=0"], "loss.temperature=0.0: must be > 0"),
        (["loss=jsd", "loss.beta=2"], "loss.beta=2.0: must be in [0, 1]"),
        (["train.max_steps=0"], "train.max_steps=0: must be > 0"),
        (["train.batch_size=-4"], "train.batch_size=-4: must be > 0"),
        (["train.batch_size=10", "train.micro_batch_size=4"],
         "train.micro_batch_size=4: must divide train.batch_size=10"),
        (["train.max_steps=null"], "train.max_steps=None and train.epochs=None: set one"),
        (["train.betas=[0.9,1.5]"], "train.betas=[0.9, 1.5]: must be two numbers in [0, 1)"),
        (["train=paper", "train.warmup_ratio=1.0"], "train.warmup_ratio=1.0 with train.schedule=onecycle: must be < 1"),
        (["train.lr=0"], "train.lr=0.0: must be > 0"),
        (["eval.n_problems=0"], "eval.n_problems=0: must be > 0"),
        (["eval.top_p=0"], "eval.top_p=0.0: must be in (0, 1]"),
        (["eval.benchmarks=[aime99]"], "eval.benchmarks[]='aime99': must be one of synthetic"),
        (["model.teacher.hidden=130"], "model.teacher.hidden=130: must be divisible by model.teacher.heads=4"),
        (["data.source=json"], "data.path='': a json source needs a local file or folder"),
        (["data.source=hub", "data.name=mydata"], "data.name='mydata' with data.path='': name a dataset"),
        (["data.source=hub", "data.name=skyt1"], "eval.benchmarks contains 'synthetic'"),
        (["data.max_steps=20"], "data.min_steps/max_steps=2/20: need 1 <= min <= max <= 12"),
        (["train.teacher_cache=topk", "truncation.mode=middle"],
         "truncation.mode (with train.teacher_cache=topk)='middle': must be one of lead, left, random_labels"),
        (["train.teacher_cache=topk", "train.loss_impl=full"], "train.teacher_cache=topk needs train.loss_impl=chunked"),
        (["train.val_every=-1"], "train.val_every=-1: must be >= 0"),
    ],
)
def test_each_bad_value_is_named(overrides, expected):
    assert expected in problems(overrides)


@pytest.mark.parametrize("overrides, key, expected", [
        (['sections=custom', 'sections.include=[CoT,Answer]'], "sections.include", "'Answer', expected one of [P, CoT, A]"),
        (['sections.name=everything'], "sections.name", "'everything', expected one of [all, prompt_cot, cot, cot_ans, ans, prompt_ans, custom]"),
        (['loss.name=kl'], "loss.name", "'kl', expected one of [forward_kl, reverse_kl, combined_kl, jsd, tvd, skew_kl, skew_reverse_kl]"),
        (['train.schedule=linear'], "train.schedule", "'linear', expected one of [cosine, onecycle]"),
        (['loss.normalize=batch'], "loss.normalize", "'batch', expected one of [token, sequence]"),
        (['train.precision=fp8'], "train.precision", "'fp8', expected one of [auto, bf16, fp32]"),
        (['truncation.mode=tail'], "truncation.mode", "'tail', expected one of [lead, left, middle, right, random_labels]"),
        (['logger.mode=sometimes'], "logger.mode", "'sometimes', expected one of [offline, online, disabled]"),
        (['model.student.source=hub'], "model.student.source", "'hub', expected one of [embedded, pretrained]"),
        (['train.teacher_cache=disk'], "train.teacher_cache", "'disk', expected one of [none, topk]"),
        (['train.checkpoint_selection=best'], "train.checkpoint_selection", "'best', expected one of [final, best_val]"),
        (['eval.engine=sglang'], "eval.engine", "'sglang', expected one of [transformers, vllm, auto]"),
        (["eval.baselines=[student,reference]"], "eval.baselines", "'reference', expected one of [student, teacher]"),
        (["distill.mode=gkd"], "distill.mode", "'gkd', expected one of [offline, sequence, on_policy]"),
        (["data.rows=all"], "data.rows", "'all', expected one of [length, paper]"),
]
)
def test_a_bad_choice_is_refused_at_composition_with_its_key_and_the_allowed_values(overrides, key, expected):
    """Closed choices are Enums in the schema (kd_sweeps/choices.py): OmegaConf refuses another value when
    Hydra composes the config, so a bad grid point stops the launch before any point runs."""
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as info:
        compose_config(overrides)
    message = f"{info.value}\n{info.value.__cause__}"
    assert f"Invalid value {expected}" in message and f"full_key: {key}" in message, message


def test_all_problems_are_reported_at_once():
    message = problems(["trunc=2", "loss.kd_ratio=2", "train.batch_size=0", "sections.include=[]",
                        "sections.name=custom"])
    assert message.startswith("4 problem(s) in the config")
    for key in ("trunc=2.0", "loss.kd_ratio=2", "train.batch_size=0", "sections.include=[]"):
        assert key in message


def test_window_modes_accept_any_ratio():
    # Windows are defined for every ratio (left/middle/right keep max(1, int(L * trunc)) tokens).
    from kd_sweeps.sections import kept_window

    for mode in ("left", "middle", "right", "random_labels"):
        validate(compose_config([f"truncation.mode={mode}", "trunc=0.3"]))
        for length in (1, 2, 10, 101):
            start, end = kept_window(length, 0.3, mode)
            kept = length if mode == "random_labels" else max(1, int(length * 0.3))  # random_labels thins labels
            assert 0 <= start < end <= length and end - start == kept, (mode, length)


def test_unknown_key_is_rejected_by_the_schema():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as info:
        compose_config(["train.learning_rate=0.1"])
    assert "learning_rate" in str(info.value)


def test_wrong_type_is_rejected_by_the_schema():
    with pytest.raises(Exception) as info:
        compose_config(["train.max_steps=many"])
    assert "max_steps" in str(info.value)


def test_vllm_engine_without_vllm_names_the_fix(monkeypatch):
    from kd_sweeps import validation

    monkeypatch.setattr(validation, "vllm_installed", lambda: False)
    message = problems(["eval.engine=vllm"])
    assert "eval.engine='vllm': vllm is not installed" in message and "pip install '.[vllm]'" in message
    validate(compose_config(["eval.engine=auto"]))  # auto falls back to transformers
