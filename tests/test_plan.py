"""The plan: Hydra's multirun expansion and composition, problems per point, token and FLOPs counts
against the data pipeline and the training loop's own cost meter, Qwen3 shapes against their sizes."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from kd_sweeps import plan as planner
from tests.conftest import CONF

SMALL = ["data.n_train=500"]  # encoding 500 sequences instead of 4,000 keeps each plan under a second


def _hydra_multirun(overrides, sweep_dir, monkeypatch, conf=CONF, config_name="config"):
    """(overrides, job config) of every job a real ``launch.py -m <overrides>`` would run."""
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    from kd_sweeps.callbacks import SweepSummary
    from kd_sweeps.schema import register_configs

    monkeypatch.setattr(SweepSummary, "on_multirun_end", lambda self, config, **kwargs: None)
    register_configs()
    jobs = []

    def record(cfg):
        jobs.append((list(HydraConfig.get().overrides.task), OmegaConf.to_container(cfg)))

    GlobalHydra.instance().clear()
    try:
        hydra = Hydra.create_main_hydra2(task_name="launch", config_search_path=create_config_search_path(str(conf)))
        hydra.multirun(config_name=config_name, task_function=record,
                       overrides=[*overrides, f"hydra.sweep.dir={sweep_dir}"], with_log_configuration=False)
    finally:
        GlobalHydra.instance().clear()
    return jobs


def test_grid_and_configs_equal_hydras_multirun(tmp_path, monkeypatch):
    grid = ["trunc=range(0.5,1.0,0.5)", "sections=custom", "sections.include=[P],[CoT,A]",
            "loss=glob(skew*)", "loss.temperature=choice(1,2)"]
    jobs = _hydra_multirun(grid, tmp_path / "sweep", monkeypatch)
    composer = planner.GridComposer(grid)
    points = composer.points()
    assert len(jobs) == 8
    assert points == [overrides for overrides, _ in jobs]
    for point, (_, job_config) in zip(points, jobs):
        assert OmegaConf.to_container(composer.compose(point)) == job_config, point
    # The in-place path used for speed leaves nothing behind between points.
    for point, (_, job_config) in zip(reversed(points), reversed(jobs)):
        with composer.composed(point) as cfg:
            assert OmegaConf.to_container(cfg) == job_config, point


def test_sweeper_params_in_a_config_are_part_of_the_grid(tmp_path, monkeypatch):
    import shutil

    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    (conf / "grid.yaml").write_text("defaults:\n  - config\n  - _self_\n"
                                    "hydra:\n  sweeper:\n    params:\n      trunc: 0.5,1.0\n")
    jobs = _hydra_multirun(["seed=1,2"], tmp_path / "sweep", monkeypatch, conf, "grid")
    points = planner.GridComposer(["seed=1,2"], "grid", conf).points()
    assert points == [overrides for overrides, _ in jobs]
    assert points == [["trunc=0.5", "seed=1"], ["trunc=0.5", "seed=2"], ["trunc=1.0", "seed=1"],
                      ["trunc=1.0", "seed=2"]]


# Hydra's command-line argument parser (no public equivalent) reads argv for the did-you-mean hints.
def _hydra_internal_imports(source: str) -> list[int]:
    """Line numbers of the imports of ``hydra._internal`` (any form) in ``source``."""
    import ast

    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            modules = [node.module or ""] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        if any(m == "hydra._internal" or m.startswith("hydra._internal.") for m in modules):
            lines.append(node.lineno)
    return lines


def test_the_library_imports_no_hydra_internals():
    """``hydra._internal`` changes without notice between Hydra releases: the plan expands and composes
    through Hydra's public API (config loader, override parser) only, and so does everything else."""
    assert _hydra_internal_imports("from hydra import _internal\nimport hydra._internal.utils as u\n"
                                   "from hydra._internal.hydra import Hydra\nfrom hydra import compose\n") == [1, 2, 3]
    package = CONF.parent / "kd_sweeps"
    found = {path.relative_to(package).as_posix(): lines for path in sorted(package.rglob("*.py"))
             if (lines := _hydra_internal_imports(path.read_text()))}
    assert found == {}


def test_every_bad_point_is_reported_with_its_overrides():
    result = planner.make_plan(["trunc=0.5,1.5", "loss.kd_ratio=0.5,2", "sections=all,nope", *SMALL])
    bad = {p.index: p for p in result.points if p.problems}
    assert len(result.points) == 8 and len(bad) == 7  # only trunc=0.5 kd_ratio=0.5 sections=all is fine
    both = next(p for p in bad.values() if "trunc=1.5" in p.overrides and "loss.kd_ratio=2" in p.overrides
                and "sections=all" in p.overrides)
    assert any(line.startswith("trunc=1.5") for line in both.problems)
    assert any(line.startswith("loss.kd_ratio=2") for line in both.problems)
    missing = next(p for p in bad.values() if "sections=nope" in p.overrides)
    assert "nope" in " ".join(missing.problems)
    text = "\n".join(result.problems)
    assert f"point {both.index} ({' '.join(both.overrides)}): trunc=1.5: must be in (0, 1]" in text
    assert all(p.flops is None for p in bad.values())


def test_a_point_without_enough_supervised_sequences_is_a_problem():
    # The first quarter of every sequence is prompt: nothing of the answer survives.
    result = planner.make_plan(["trunc=0.25", "sections=ans", *SMALL])
    assert "supervised token" in result.points[0].problems[0]


def test_the_command_line_reports_and_fails(capsys):
    assert planner.main(["-m", "trunc=0.5,1.5", *SMALL]) == 1
    out, err = capsys.readouterr()
    assert "total (2 points)" in out and "nothing was launched" in out
    assert "point 1 (trunc=1.5 data.n_train=500): trunc=1.5: must be in (0, 1]" in err
    assert planner.main(["no_such_key=1"]) == 2


@pytest.fixture(scope="module")
def half_and_full():
    return planner.make_plan(["trunc=0.5,1.0", *SMALL])


def test_half_the_sequence_costs_about_half(half_and_full):
    half, full = half_and_full.points
    assert not half.problems and not full.problems
    assert 0.45 < half.tokens / full.tokens <= 0.5  # floor(L / 2) per sequence
    # Attention grows with T^2, so half the tokens cost a little less than half the FLOPs.
    assert 0.42 < half.flops / full.flops < half.tokens / full.tokens
    assert half.peak_memory < full.peak_memory


def test_totals_add_up(half_and_full, capsys):
    points = half_and_full.points
    assert half_and_full.total("flops") == sum(p.flops for p in points)
    assert half_and_full.total("tokens") == sum(p.tokens for p in points)
    text = planner.format_plan(half_and_full)
    total_row = next(line for line in text.splitlines() if "total (2 points)" in line)
    assert f"{sum(p.flops for p in points):.3g}" in total_row
    assert len([line for line in text.splitlines() if line.lstrip()[:1].isdigit()]) == 2


@pytest.mark.parametrize("mode,cut", [("lead", False), ("middle", False), ("right", True),
                                      ("random_labels", False), ("lead", True)])
@pytest.mark.parametrize("sections", [("P", "CoT", "A"), ("CoT",), ("A",), ("P", "A")])
def test_token_counts_equal_the_data_pipeline(mode, cut, sections, encoded):
    from kd_sweeps import data

    seqs, encoded_list = encoded
    for trunc in (0.3, 0.75, 1.0):
        lengths, supervised = planner.point_tokens(seqs, trunc, mode, sections, cut)
        examples, skipped = data.training_examples(encoded_list, sections, trunc, mode, cut, seed=7)
        assert skipped == int((supervised == 0).sum())
        assert [len(e.input_ids) for e in examples] == lengths[supervised > 0].tolist()
        assert [e.n_supervised for e in examples] == supervised[supervised > 0].tolist()


@pytest.fixture(scope="module")
def encoded():
    from kd_sweeps import data
    from kd_sweeps.tokenizer import build_tokenizer

    data_cfg = OmegaConf.create({"source": "synthetic", "n_train": 120, "n_test": 10, "min_steps": 2,
                                 "max_steps": 12, "seed": 3, "max_tokens": 4096})
    encoded_list, _ = data.encode(data.load_records(data_cfg, "train"), build_tokenizer(), 4096)
    return planner.encoded_sequences(data_cfg, build_tokenizer()), encoded_list


@pytest.mark.parametrize("setting", [["trunc=0.6", "sections=cot_ans"], ["trunc=1.0", "sections=ans"],
                                     ["trunc=1.0", "sections=ans", "train.loss_impl=full"],
                                     ["trunc=0.6", "sections=cot", "train.teacher_cache=topk"]],
                         ids=["cot_ans", "ans-chunked", "ans-full-logits", "cot-cached-teacher"])
def test_flops_and_tokens_match_a_replay_of_the_training_loop(setting):
    """Replay the run's batch sampler through its CostMeter: padding included, the plan is close.
    The chunked loss runs the output layers on supervised positions only (a sparse preset such as
    ``ans`` supervises a few percent of them); a cached teacher runs no forward per step."""
    from kd_sweeps import data
    from kd_sweeps.cost import CostMeter, ModelShape
    from kd_sweeps.models import qwen3_config, spec_dict
    from kd_sweeps.tokenizer import build_tokenizer
    from tests.conftest import compose_config

    overrides = [*setting, "train.micro_batch_size=16", *SMALL]
    predicted = planner.make_plan(overrides).points[0]
    cfg = compose_config(overrides)
    tokenizer = build_tokenizer()
    encoded_list, _ = data.encode(data.load_records(cfg.data, "train"), tokenizer, cfg.data.max_tokens)
    examples, _ = data.training_examples(encoded_list, cfg.sections.include, cfg.trunc, cfg.truncation.mode,
                                         cfg.truncation.cut_after_think, cfg.seed)
    student, teacher = (ModelShape.from_config(qwen3_config(spec_dict(cfg.model[r]), tokenizer))
                        for r in ("student", "teacher"))
    meter = CostMeter(student, None if cfg.train.teacher_cache == "topk" else teacher,
                      head_on_supervised_only=cfg.train.loss_impl == "chunked")
    batches = data.length_grouped_batches([len(e.input_ids) for e in examples], cfg.train.batch_size, cfg.seed)
    micro = cfg.train.micro_batch_size
    for _ in range(cfg.train.max_steps):
        chosen = [examples[i] for i in next(batches)]
        for start in range(0, len(chosen), micro):
            part = chosen[start:start + micro]
            lengths = [len(e.input_ids) for e in part]
            meter.add_step((len(lengths), max(lengths)), lengths, sum(e.n_supervised for e in part))
    assert predicted.tokens == pytest.approx(meter.tokens_trained, rel=0.03)
    # The run also pays for padding (length-grouped batches keep it small) and draws its own sample.
    assert predicted.flops == pytest.approx(meter.flops_total, rel=0.05)


@pytest.mark.parametrize("name,total,non_embedding", [
    ("Qwen/Qwen3-0.6B-Base", 0.6e9, 0.44e9), ("Qwen/Qwen3-1.7B", 1.7e9, 1.4e9),
    ("Qwen/Qwen3-4B-Base", 4.0e9, 3.6e9), ("Qwen/Qwen3-8B", 8.2e9, 6.95e9), ("Qwen/Qwen3-8B-Base", 8.2e9, 6.95e9),
    ("Qwen/Qwen3-32B", 32.8e9, 31.2e9)])
def test_qwen3_shapes_give_the_published_parameter_counts(name, total, non_embedding):
    shape = planner.pretrained_shape(name)
    assert shape.vocab == 151_936
    embeddings = shape.vocab * shape.hidden * (1 if shape.tied_embeddings else 2)
    assert planner.parameter_count(shape) == pytest.approx(total, rel=0.03)
    assert planner.parameter_count(shape) - embeddings == pytest.approx(non_embedding, rel=0.03)


def test_a_pretrained_pair_is_planned_from_the_table_and_estimated_lengths(tmp_path):
    import json

    local = tmp_path / "my-student"
    local.mkdir()
    (local / "config.json").write_text(json.dumps({
        "num_hidden_layers": 36, "hidden_size": 2560, "num_attention_heads": 32, "num_key_value_heads": 8,
        "head_dim": 128, "intermediate_size": 9728, "vocab_size": 151936, "tie_word_embeddings": True}))
    pair = ["model.teacher.source=pretrained", "model.teacher.name_or_path=Qwen/Qwen3-8B",
            "model.student.source=pretrained", "trunc=0.5,1.0", *SMALL]
    by_name = planner.make_plan([*pair, "model.student.name_or_path=Qwen/Qwen3-4B-Base"])
    by_path = planner.make_plan([*pair, f"model.student.name_or_path={local}"])
    assert not by_name.problems and not by_name.points[0].exact_tokens
    assert [p.flops for p in by_name.points] == [p.flops for p in by_path.points]
    # bf16 weights: 8 bytes per student parameter for weights, grads and AdamW, 2 per teacher one.
    assert by_name.points[1].peak_memory > 8 * 4.0e9 + 2 * 8.2e9
    assert "estimated from characters" in planner.format_plan(by_name)


def test_unknown_model_and_mismatched_vocabularies_are_problems():
    result = planner.make_plan(["model.student.source=pretrained", "model.student.name_or_path=org/mystery",
                                "trunc=1.0", *SMALL])
    assert "no shape known" in result.problems[0]
    mixed = planner.make_plan(["model.teacher.source=pretrained", "model.teacher.name_or_path=Qwen/Qwen3-8B",
                               *SMALL])
    assert "vocabulary" in mixed.problems[0]


@pytest.mark.parametrize("tied", [True, False])
def test_parameter_count_equals_a_real_qwen3_model(tied):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from kd_sweeps.cost import ModelShape

    config = Qwen3Config(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=24, tie_word_embeddings=tied)
    model = Qwen3ForCausalLM(config)
    assert planner.parameter_count(ModelShape.from_config(config)) == sum(p.numel() for p in model.parameters())


def test_assumed_lengths_stand_in_for_data_that_cannot_be_read(tmp_path, capsys):
    grid = ["model.student.source=pretrained", "model.student.name_or_path=Qwen/Qwen3-1.7B-Base",
            "model.teacher.source=pretrained", "model.teacher.name_or_path=Qwen/Qwen3-8B", "eval=math",
            "data.name=local", "data.source=json", f"data.path={tmp_path / 'absent.jsonl'}", "trunc=0.5,1.0"]
    unread = planner.make_plan(grid)
    assert all("training data" in p.problems[0] for p in unread.points)
    half, full = planner.make_plan(grid, assumed_lengths=(100, 1000, 100)).points
    assert not half.problems and not full.problems and not full.exact_tokens
    sequences = 150 * 32  # train=tiny: max_steps x batch_size
    assert (half.tokens, full.tokens) == (sequences * 600, sequences * 1200)
    assert planner.main([*grid, "--lengths", "100,1000,100"]) == 0
    assert "ASSUMED, not measured (--lengths: P 100, CoT 1,000, A 100 tokens" in capsys.readouterr().out


# --------------------------------------------------------------------------- the cluster question

EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
PAPER = ["experiment=paper_truncation", "launcher=slurm_gpu_4b_8b"]
FIXTURE_DATA = ["data=bespoke_stratos17k", "data.source=json", "eval=math", "data.n_train=3", "data.n_val=1",
                "train.batch_size=2"]


@pytest.fixture
def plan_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KD_SWEEPS_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)  # the sweep folders (multirun/...) are looked up from here
    return tmp_path / "cache" / "plan"


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_plans_offline(experiment, plan_cache):
    """Offline (no hub dataset in the HF cache here), the paper's experiments use the data preset's
    assumed lengths, say so, and have no problem; the demo encodes its embedded data."""
    result = planner.make_plan([f"experiment={experiment}", *(["data.n_train=500"] if "demo" in experiment else [])])
    assert result.problems == []
    sources = {p.lengths for p in result.points}
    assert sources == ({"tokenized"} if experiment == "demo_tradeoff" else {"assumed"})
    if experiment != "demo_tradeoff":
        text = planner.format_plan(result)
        assert "ASSUMED, not measured (data.assumed_lengths of data=bespoke_stratos17k" in text
        assert "--lengths P,COT,A" in text and "measured and cached" in text


def test_the_documented_plan_commands_run(plan_cache, capsys):
    import re
    import shlex

    doc = (CONF.parent / "docs" / "launching.md").read_text()
    section = doc[doc.index("## The plan"):]
    commands = re.findall(r"^python -m kd_sweeps\.plan (.*experiment=.*)$", section, re.M)
    assert len(commands) >= 2
    for command in commands:
        assert planner.main(shlex.split(command)) == 0, command
    assert "Multiple values" not in capsys.readouterr().err


def test_measured_lengths_are_cached_once_and_reused(plan_cache, monkeypatch):
    from kd_sweeps import plan_lengths

    grid = [*FIXTURE_DATA, f"data.path={CONF.parent / 'tests/fixtures/datasets/bespoke_stratos17k.jsonl'}"]
    first = planner.make_plan(grid).points[0]
    assert not first.problems and first.lengths == "tokenized" and first.lengths_detail.startswith("measured here")
    files = list(plan_cache.glob("lengths-*.npz"))
    assert len(files) == 1

    def unreadable(*args, **kwargs):
        raise AssertionError("the data were read again")

    monkeypatch.setattr(plan_lengths, "encoded_sequences", unreadable)
    again = planner.make_plan(grid).points[0]
    assert again.lengths_detail == f"cached {files[0]}" and again.tokens == first.tokens
    assert list(plan_cache.glob("lengths-*.npz")) == files


def test_memory_and_time_verdicts_give_the_numbers(plan_cache):
    from kd_sweeps.plan_verdict import Hardware

    tight = planner.make_plan(PAPER, hardware=Hardware(gpu_memory_gib=20)).points[9]
    gib = tight.memory_per_rank / 2**30
    assert tight.processes == 4 and 25 < gib < 35  # docs/performance.md: 31.1 GB at 4,096 tokens
    assert tight.fit.verdict == f"no: memory {gib:.3g} GiB/rank > 20 GiB" and not tight.fit.fits
    # 2e18 FLOPs on 4 GPUs at 396 TFLOP/s: about 21 min of training, in 10-minute jobs.
    requeued = planner.make_plan([*PAPER, "hydra.launcher.timeout_min=10"]).points[9]
    assert 18 * 60 < requeued.fit.train_seconds < 24 * 60
    assert requeued.fit.verdict.startswith("fits with 2 requeues (train)") and requeued.fit.fits
    over = planner.make_plan([*PAPER, "hydra.launcher.timeout_min=4"]).points[9]
    assert over.fit.verdict.startswith("no: train ~2") and "> 4 min limit (requeues: 3)" in over.fit.verdict
    assert requeued.fit.train_gpu_hours == pytest.approx(4 * requeued.fit.train_seconds / 3600)


def test_done_points_are_marked_and_left_out_of_what_remains(plan_cache, capsys):
    import json

    before = planner.make_plan(PAPER)
    folder = before.points[9].folder
    assert folder.parent == plan_cache.parent.parent / "multirun" / "paper_truncation" or \
        str(folder.parent) == "multirun/paper_truncation"
    folder.mkdir(parents=True)
    (folder / "result.json").write_text(json.dumps({"status": "ok"}))
    after = planner.make_plan(PAPER)
    assert [p.done for p in after.points] == [""] * 9 + ["done"]
    assert after.gpu_hours("train") == before.gpu_hours("train")
    assert after.gpu_hours("train", remaining=True) == pytest.approx(
        before.gpu_hours("train") - before.points[9].fit.train_gpu_hours)
    assert after.gpu_hours("eval", remaining=True) == pytest.approx(0.9 * before.gpu_hours("eval"))
    assert "1 done" in planner.format_plan(after)


def test_point_folders_are_hydras(tmp_path, monkeypatch):
    """The folder the plan looks in is the one a real multirun names after each job's id."""
    from kd_sweeps.identity import run_id

    jobs = _hydra_multirun(["trunc=0.5,1.0"], tmp_path / "sweep", monkeypatch)
    grid = ["trunc=0.5,1.0", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    composer = planner.GridComposer(grid)
    dirs = []
    for point in composer.points():
        with composer.composed(point) as cfg:
            dirs.append(composer.point_dir(point, cfg))
    assert [d.parent for d in dirs] == [tmp_path / "sweep"] * 2
    assert [d.name for d in dirs] == [run_id(job) for _, job in jobs]


def test_the_benchmark_and_the_plan_use_one_memory_function(plan_cache):
    import importlib.util

    from kd_sweeps.plan_memory import RankLayout, memory_per_rank_bytes

    spec = importlib.util.spec_from_file_location("memory_per_rank", CONF.parent / "benchmarks" / "memory_per_rank.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    student, teacher = bench.shapes()
    assert sum(bench.per_rank(4, 4096, True).values()) * 1e9 == pytest.approx(
        memory_per_rank_bytes(student, teacher, RankLayout(4, 1, 4096, 4096)), abs=1)
    point = planner.make_plan(PAPER).points[9]  # trunc=1.0: one sequence of data.max_tokens
    assert point.layout == RankLayout(4, 1, 4096, point.layout.max_supervised, 2, 2, True, True, True)
    assert point.memory_per_rank == memory_per_rank_bytes(student, teacher, point.layout)
