"""Plan a sweep before spending anything: per grid point its training tokens, FLOPs, memory per
process, time and GPU-hours, whether it fits its launcher's GPUs and time limit, and whether it is done.

    python -m kd_sweeps.plan trunc=0.25,0.5,1.0 sections=all,cot      # the overrides of launch.py -m
    python -m kd_sweeps.plan experiment=paper_truncation launcher=slurm_gpu_4b_8b

The grid is expanded by Hydra's public override parser, in its basic sweeper's order (kd_sweeps/plan_grid.py);
every point is composed as its job would be and validated, and every problem is listed with its
point. Nothing is launched, no model is built. Lengths: kd_sweeps/plan_lengths.py; FLOPs:
kd_sweeps.cost; memory: kd_sweeps/plan_memory.py; evaluation: kd_sweeps/plan_eval.py; verdicts:
kd_sweeps/plan_verdict.py; generation (distill.mode): kd_sweeps/plan_distill.py. docs/launching.md
derives each.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from kd_sweeps.cost import ModelShape, kd_step_flops
from kd_sweeps.plan_distill import GenerationCost, generation_cost, total_generation_flops
from kd_sweeps.plan_eval import (DEFAULT_TOKEN_FRACTION, DEFAULT_TOKENS_PER_S, EvalAssumptions, EvalCost, eval_cost,
                                 fit_warning)
from kd_sweeps.plan_format import format_plan, write_csv
from kd_sweeps.plan_grid import CONF_DIR, GridComposer, LauncherFacts, PlanError
from kd_sweeps.plan_lengths import (CHARS_PER_TOKEN, LengthFinder, Sequences, encoded_sequences,  # noqa: F401
                                    estimated_sequences, point_tokens)
from kd_sweeps.plan_memory import (QWEN3_SHAPES, RankLayout, memory_per_rank_bytes, parameter_count,  # noqa: F401
                                   peak_memory_bytes, pretrained_shape)
from kd_sweeps.plan_verdict import DEFAULT_GPU_MEMORY_GIB, Fit, Hardware, fit, memory_limit

__all__ = ["GridComposer", "PlanError", "Plan", "PlannedPoint", "make_plan", "format_plan", "write_csv", "main",
           "point_tokens", "encoded_sequences", "estimated_sequences", "pretrained_shape", "parameter_count",
           "peak_memory_bytes"]


@dataclass
class PlannedPoint:
    index: int
    overrides: list[str]
    problems: list[str] = field(default_factory=list)
    tokens: float | None = None  # tokens the student trains on (real, unpadded), expected
    supervised: float | None = None  # positions in the loss, expected
    flops: float | None = None  # training FLOPs, student + teacher
    generation: GenerationCost | None = None  # distill.mode's rollouts or teacher sequences
    peak_memory: int | None = None  # bytes, one process holding everything (plan_memory.peak_memory_bytes)
    memory_per_rank: int | None = None  # bytes per process with the launcher's processes (see plan_memory)
    layout: RankLayout | None = None  # what memory_per_rank was computed for
    processes: int = 1  # training processes the launcher gives the point
    exact_tokens: bool = True
    lengths: str = ""  # where the lengths come from: tokenized | characters | assumed
    lengths_detail: str = ""
    eval: EvalCost | None = None  # generation cost (kd_sweeps.plan_eval)
    fit: Fit | None = None  # time, GPU-hours, verdict (kd_sweeps.plan_verdict)
    folder: Path | None = None  # where its job writes result.json
    done: str = ""  # "done" (result.json status ok), "trained" (its evaluation job pending), else ""
    warnings: list[str] = field(default_factory=list)  # will not stop the launch, may stop the point

    @property
    def generation_flops(self) -> float | None:
        return None if self.generation is None else self.generation.flops

    def remaining_gpu_hours(self, part: str) -> float:
        """GPU-hours still to spend on ``part`` (train / eval): none for what is done."""
        if self.fit is None or self.done == "done" or (self.done == "trained" and part == "train"):
            return 0.0
        return getattr(self.fit, f"{part}_gpu_hours")


@dataclass
class Plan:
    points: list[PlannedPoint]
    seconds: float = 0.0
    assumptions: EvalAssumptions = field(default_factory=EvalAssumptions)
    hardware: Hardware = field(default_factory=Hardware)

    @property
    def problems(self) -> list[str]:
        return [f"point {p.index} ({' '.join(p.overrides) or 'no overrides'}): {issue}"
                for p in self.points for issue in p.problems]

    @property
    def warnings(self) -> list[str]:
        return [f"point {p.index} ({' '.join(p.overrides) or 'no overrides'}): {warning}"
                for p in self.points for warning in p.warnings]

    def total(self, key: str) -> float:
        return sum(getattr(p, key) or 0 for p in self.points)

    def generation_total(self) -> float:
        """Generation FLOPs of the sweep: a build of teacher sequences shared by points counted once."""
        return total_generation_flops([p.generation for p in self.points])

    def eval_total(self, key: str) -> float:
        return sum(getattr(p.eval, key) for p in self.points if p.eval is not None)

    def gpu_hours(self, part: str, remaining: bool = False) -> float:
        return sum(p.remaining_gpu_hours(part) if remaining else getattr(p.fit, f"{part}_gpu_hours")
                   for p in self.points if p.fit is not None)


@functools.lru_cache(maxsize=None)
def _sequence_flops(student: ModelShape, teacher: ModelShape, length: int) -> int:
    return kd_step_flops(student, teacher, [length])["total"]


def _done(folder: Path | None) -> str:
    from kd_sweeps.point_record import read_result

    record = read_result(folder) if folder is not None else None
    status = (record or {}).get("status")
    return "done" if status == "ok" else "trained" if status == "evaluating" else ""


class _Estimator:
    """Per-point cost; caches what many points share (sequences, model shapes)."""

    def __init__(self, assumed_lengths: tuple[int, int, int] | None = None,
                 eval_assumptions: EvalAssumptions | None = None, hardware: Hardware | None = None):
        self.lengths = LengthFinder(assumed_lengths)
        self.eval_assumptions = eval_assumptions or EvalAssumptions()
        self.hardware = hardware or Hardware()
        self._shapes: dict[str, ModelShape | None] = {}

    def shape(self, spec) -> ModelShape | None:
        key = json.dumps(OmegaConf.to_container(spec, resolve=True), sort_keys=True)
        if key not in self._shapes:
            if spec.source == "embedded":
                from kd_sweeps.models import qwen3_config, spec_dict

                tokenizer = self.lengths.embedded_tokenizer()
                self._shapes[key] = ModelShape.from_config(qwen3_config(spec_dict(spec), tokenizer))
            else:
                self._shapes[key] = pretrained_shape(spec.name_or_path)
        return self._shapes[key]

    def _shapes_of(self, point: PlannedPoint, cfg: DictConfig):
        shapes = {}
        for role in ("student", "teacher"):
            shapes[role] = self.shape(cfg.model[role])
            if shapes[role] is None:
                point.problems.append(f"model.{role}.name_or_path={cfg.model[role].name_or_path!r}: no "
                                      f"shape known; use a local checkpoint dir or one of "
                                      f"{', '.join(QWEN3_SHAPES)} (with or without -Base)")
        student, teacher = shapes["student"], shapes["teacher"]
        if student and teacher and student.vocab != teacher.vocab:
            point.problems.append(f"teacher vocabulary ({teacher.vocab}) differs from the student's "
                                  f"({student.vocab}); KD compares distributions over the same tokens")
        return student, teacher

    def fill(self, point: PlannedPoint, cfg: DictConfig, launcher: LauncherFacts) -> None:
        student, teacher = self._shapes_of(point, cfg)
        seqs = self.lengths.sequences(cfg)
        lengths, supervised = point_tokens(seqs, cfg.trunc, cfg.truncation.mode, cfg.sections.include,
                                           cfg.truncation.cut_after_think)
        kept = supervised > 0  # sequences without a target are skipped by the run
        train = cfg.train
        if kept.sum() < train.batch_size:
            point.problems.append(f"only {kept.sum()} of {len(lengths)} sequences have a supervised token "
                                  f"with these sections, trunc and truncation.mode; the run needs at "
                                  f"least train.batch_size={train.batch_size}")
        if point.problems:
            return
        lengths, supervised = lengths[kept], supervised[kept]
        steps = train.max_steps or math.ceil(train.epochs * int(kept.sum()) / train.batch_size)  # null: from epochs
        sequences = steps * train.batch_size
        point.tokens = sequences * float(lengths.mean())
        point.supervised = sequences * float(supervised.mean())
        # With the teacher's top-k cache no teacher runs per step (its one build is shared by the sweep).
        step_teacher = None if train.teacher_cache == "topk" else teacher
        distinct, counts = np.unique(lengths, return_counts=True)
        per_sequence = sum(int(c) * _sequence_flops(student, step_teacher, int(t))
                           for t, c in zip(distinct, counts))
        if train.loss_impl == "chunked":  # output layers on supervised positions only (as CostMeter counts)
            head = 3 * 2 * student.vocab * student.hidden + (
                0 if step_teacher is None else 2 * teacher.vocab * teacher.hidden)
            per_sequence -= head * float((lengths - supervised).sum())
        point.flops = sequences * per_sequence / len(lengths)
        point.generation = generation_cost(cfg, student, teacher, seqs, kept, steps, launcher.processes)
        # The job's work at the training rate (time = work / (processes x rate)): generation next to
        # training; the teacher's sequences are built on one process while the others wait, so they
        # take as long as processes x their FLOPs would shared.
        work = point.flops + point.generation.flops + (launcher.processes - 1) * point.generation.serial_flops
        point.exact_tokens, point.lengths, point.lengths_detail = seqs.exact, seqs.source, seqs.detail
        self._memory(point, cfg, student, teacher, seqs, lengths, supervised, launcher.processes)
        # Evaluation prompts as long as the training prompts (the tokens before <think>) on average.
        point.eval = eval_cost(cfg, student, float(seqs.cot_start.mean()), self.eval_assumptions,
                               launcher.timeout_min, work, launcher.processes)
        limit_gib, kind = memory_limit(launcher, self.hardware)
        point.fit = fit(point.memory_per_rank, limit_gib, kind, work, point.eval.seconds,
                        launcher.processes, self.hardware, launcher, cfg.eval)
        if not point.fit.verdict.startswith("fits with"):  # requeued and resumed: the verdict says so
            point.warnings += [w for w in [fit_warning(point.eval)] if w]

    def _memory(self, point, cfg, student, teacher, seqs, lengths, supervised, processes: int) -> None:
        """Sized for the longest kept sequence (assumed lengths: one of data.max_tokens tokens)."""
        if seqs.longest is not None:
            longest, longest_supervised = point_tokens(seqs.longest, cfg.trunc, cfg.truncation.mode,
                                                       cfg.sections.include, cfg.truncation.cut_after_think)
            max_len, max_supervised = int(longest.max()), int(longest_supervised.max())
        else:
            max_len, max_supervised = int(lengths.max()), int(supervised.max())
        train = cfg.train
        # The student's master weights are fp32 always (models.load_pair); a pretrained teacher is
        # loaded in bf16 unless the run computes in fp32 (auto: assumed bf16, a cluster GPU).
        bf16 = train.precision != "fp32"
        teacher_weights = 4 if cfg.model.teacher.source == "embedded" or not bf16 else 2
        micro = train.micro_batch_size or max(1, train.batch_size // processes)
        point.processes = processes
        point.peak_memory = peak_memory_bytes(student, teacher, 4, teacher_weights, bf16, micro, max_len,
                                              max_supervised)
        point.layout = RankLayout(processes, micro, max_len, max_supervised, 2 if bf16 else 4, teacher_weights,
                                  train.teacher_parallel == "shard", bool(train.activation_checkpointing),
                                  train.loss_impl == "chunked")
        point.memory_per_rank = point.peak_memory if processes == 1 else \
            memory_per_rank_bytes(student, teacher, point.layout)


def _one_line(err: Exception) -> str:
    return " ".join(f"{type(err).__name__}: {err}".split())


def make_plan(overrides: list[str], config_name: str = "config", config_dir: Path = CONF_DIR,
              assumed_lengths: tuple[int, int, int] | None = None,
              eval_assumptions: EvalAssumptions | None = None, hardware: Hardware | None = None) -> Plan:
    """Expand, compose, validate and cost every point of ``launch.py -m <overrides>``.
    ``assumed_lengths`` (P, CoT, A tokens) stand in for training data that cannot be read (in place of
    ``data.assumed_lengths``); ``eval_assumptions`` set the generation length and speed the
    evaluation cost assumes; ``hardware`` the GPU memory and training FLOP/s."""
    from kd_sweeps.validation import ConfigError, validate

    started = time.perf_counter()
    try:
        composer = GridComposer(overrides, config_name, config_dir)
        grid = composer.points()
    except PlanError:
        raise
    except Exception as err:  # the command line itself: unknown key, bad syntax, missing group
        raise PlanError(_one_line(err)) from err
    hardware = hardware or Hardware()
    eval_assumptions = eval_assumptions or EvalAssumptions(train_flops_per_s=hardware.train_flops_per_s)
    estimator = _Estimator(assumed_lengths, eval_assumptions, hardware)
    points = []
    for index, overrides_of_point in enumerate(grid):
        point = PlannedPoint(index, list(overrides_of_point))
        points.append(point)
        try:
            with composer.composed(point.overrides) as cfg:
                validate(cfg)
                point.folder = composer.point_dir(point.overrides, cfg)
                point.done = _done(point.folder)
                estimator.fill(point, cfg, composer.launcher(point.overrides))
        except ConfigError as err:
            point.problems += [line.strip() for line in str(err).splitlines()[1:]] or [str(err)]
        except Exception as err:
            point.problems.append(_one_line(err))
    return Plan(points, time.perf_counter() - started, eval_assumptions, hardware)


def _lengths(text: str) -> tuple[int, int, int]:
    parts = [int(x) for x in text.split(",")]
    if len(parts) != 3 or min(parts) < 1:
        raise argparse.ArgumentTypeError("expected three positive token counts: P,COT,A")
    return parts[0], parts[1], parts[2]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kd_sweeps.plan", description=__doc__.split("\n")[0])
    parser.add_argument("overrides", nargs="*", help="the overrides of launch.py -m")
    parser.add_argument("-m", "--multirun", action="store_true", help="accepted and ignored, to paste commands")
    parser.add_argument("--config-name", default="config")
    parser.add_argument("--csv", type=Path, help="also write one row per point to this CSV file")
    parser.add_argument("--lengths", type=_lengths, metavar="P,COT,A",
                        help="tokens of prompt, chain of thought and answer per sequence, assumed where "
                             "the training data cannot be read (in place of data.assumed_lengths)")
    machine = parser.add_argument_group("machines (kd_sweeps/plan_verdict.py)")
    machine.add_argument("--gpu-memory-gib", type=float, default=DEFAULT_GPU_MEMORY_GIB, metavar="GIB",
                         help=f"memory of one GPU (default {DEFAULT_GPU_MEMORY_GIB:g}: an H100 80 GB)")
    machine.add_argument("--train-flops-per-s", type=float, metavar="RATE",
                         help="sustained training FLOP/s of ONE GPU; training time = FLOPs / (processes x "
                              "RATE) (default 40%% of an H100's 989 TFLOP/s dense bf16)")
    evaluation = parser.add_argument_group("evaluation cost (kd_sweeps/plan_eval.py)")
    evaluation.add_argument("--eval-tokens", type=int, metavar="N",
                            help="generated tokens per completion to assume (e.g. a previous sweep's "
                                 "gen_tokens_mean); default: --eval-fraction x eval.max_new_tokens")
    evaluation.add_argument("--eval-fraction", type=float, default=DEFAULT_TOKEN_FRACTION, metavar="F",
                            help="share of eval.max_new_tokens a completion generates (default "
                                 f"{DEFAULT_TOKEN_FRACTION:g}: the worst case, every completion runs to the limit)")
    evaluation.add_argument("--eval-tokens-per-s", type=float, default=DEFAULT_TOKENS_PER_S, metavar="RATE",
                            help="generated tokens per second of one point's evaluation, all completions "
                                 f"together (default {DEFAULT_TOKENS_PER_S:g}; measure your engine)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        hardware = Hardware(args.gpu_memory_gib, args.train_flops_per_s or Hardware().train_flops_per_s)
        assumptions = EvalAssumptions(args.eval_tokens, args.eval_fraction, args.eval_tokens_per_s,
                                      hardware.train_flops_per_s)
        if not args.gpu_memory_gib > 0:
            raise ValueError(f"--gpu-memory-gib={args.gpu_memory_gib}: must be > 0")
    except ValueError as err:
        parser.error(str(err))
    # Planning never downloads: a hub dataset is used only if it is already in the local cache.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    if args.csv:  # before the work: a CSV that cannot be written fails now, not after the plan
        try:
            args.csv.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            print(f"--csv {args.csv}: cannot create its folder ({err})", file=sys.stderr)
            return 2
    try:
        plan = make_plan(args.overrides, args.config_name, assumed_lengths=args.lengths,
                         eval_assumptions=assumptions, hardware=hardware)
    except PlanError as err:
        print(f"cannot expand the sweep: {err}", file=sys.stderr)
        return 2
    print(format_plan(plan))
    if args.csv:
        write_csv(plan, args.csv)
    print(f"\nplanned {len(plan.points)} point(s) in {plan.seconds:.1f} s; nothing was launched")
    if plan.warnings:  # the launch may go ahead; these points would time out in their evaluation
        sys.stdout.flush()
        print(f"\n{len(plan.warnings)} warning(s):\n  " + "\n  ".join(plan.warnings), file=sys.stderr)
    if plan.problems:
        bad = sum(1 for p in plan.points if p.problems)
        sys.stdout.flush()  # the table first, then the problems, also when both go to a terminal
        print(f"\n{len(plan.problems)} problem(s) in {bad} of {len(plan.points)} point(s):\n  "
              + "\n  ".join(plan.problems), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
