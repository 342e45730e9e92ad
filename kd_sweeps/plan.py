"""Plan a sweep before spending anything: each grid point's training tokens, FLOPs and peak memory.

    python -m kd_sweeps.plan trunc=0.25,0.5,1.0 sections=all,cot      # the overrides of launch.py -m

The grid is expanded by Hydra's own override parser and basic sweeper (``a,b``, ``range()``,
``choice()``, ``glob()``, list values, ``hydra.sweeper.params``); every point is composed as its job
would be and validated, and every problem is listed with its point. Nothing is launched, no model is
built. Tokens come from encoding the training data (embedded student) or from a character estimate
(pretrained student: its tokenizer would be a download); FLOPs from ``kd_sweeps.cost``; peak memory
from the analytic estimate of ``peak_memory_bytes``. docs/launching.md derives each.
"""

from __future__ import annotations

import argparse
import copy
import csv
import functools
import json
import math
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np

# Hydra's own multirun machinery (hydra-core is pinned below 1.4, where these modules live): the
# grid and each point's config must come out exactly as ``launch.py -m`` makes them.
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra._internal.config_repository import CachingConfigRepository
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra._internal.defaults_list import Overrides
from hydra._internal.utils import create_config_search_path
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

from kd_sweeps.cost import ModelShape, kd_step_flops
from kd_sweeps.plan_eval import (DEFAULT_TOKEN_FRACTION, DEFAULT_TOKENS_PER_S, EvalAssumptions, EvalCost,
                                 duration, eval_cost, fit_warning)

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
CHARS_PER_TOKEN = 3.5  # length estimate for pretrained tokenizers (see estimated_sequences)
TEMPLATE_TOKENS_BEFORE, TEMPLATE_TOKENS_AFTER = 8, 2  # Qwen3 chat template around the two turns
LOSS_BYTES_PER_LOGIT = 24  # fp32 loss intermediates per supervised logit (see peak_memory_bytes)

# (layers, hidden, heads, kv_heads, head_dim, intermediate, tied embeddings); vocabulary 151,936.
# From each checkpoint's config.json; -Base checkpoints share their model's shape.
QWEN3_SHAPES = {
    "qwen3-0.6b": (28, 1024, 16, 8, 128, 3072, True),
    "qwen3-1.7b": (28, 2048, 16, 8, 128, 6144, True),
    "qwen3-4b": (36, 2560, 32, 8, 128, 9728, True),
    "qwen3-8b": (36, 4096, 32, 8, 128, 12288, False),
    "qwen3-32b": (64, 5120, 64, 8, 128, 25600, False),
}
QWEN3_VOCAB = 151_936


class PlanError(ValueError):
    """The sweep cannot be expanded at all (bad command line, unsupported sweeper)."""


# --------------------------------------------------------------------------- grid and composition


class GridComposer:
    """Expands and composes grid points as ``launch.py -m <overrides>`` would."""

    def __init__(self, overrides: list[str], config_name: str = "config", config_dir: Path = CONF_DIR):
        from kd_sweeps.schema import register_configs

        register_configs()
        Plugins.instance()  # registers the launcher plugins' configs (hydra/launcher=submitit_*)
        self.loader = ConfigLoaderImpl(config_search_path=create_config_search_path(str(config_dir)))
        self.master = self.loader.load_configuration(config_name, list(overrides), run_mode=RunMode.MULTIRUN)
        self.parser = OverridesParser.create(config_loader=self.loader)  # glob() lists config groups
        self._repo = CachingConfigRepository(self.loader.repository)
        self._bases: dict[tuple[str, ...], tuple[DictConfig, DictConfig]] = {}
        self._timeouts: dict[tuple[str, ...], float | None] = {}  # hydra.launcher.timeout_min
        self._parsed: dict = {}

    def _parse(self, line: str):
        # A grid repeats each override string across many points (100 truncs x 10 sections: 110
        # strings, 1,000 points); parsing each once saves the grammar's ~0.3 ms per string and point.
        if line not in self._parsed:
            self._parsed[line] = self.parser.parse_overrides([line])[0]
        return self._parsed[line]

    def points(self) -> list[list[str]]:
        """Every point's overrides, in the order the basic sweeper launches them."""
        sweeper = self.master.hydra.sweeper
        if not str(sweeper._target_).endswith("BasicSweeper"):
            raise PlanError(f"hydra.sweeper is {sweeper._target_}; the plan expands basic-sweeper grids")
        params = [f"{key}={value}" for key, value in (sweeper.params or {}).items()]
        task = OmegaConf.to_container(self.master.hydra.overrides.task, resolve=False)
        parsed = self.parser.parse_overrides(params + list(task))
        return [point for batch in BasicSweeper.split_arguments(parsed, sweeper.max_batch_size)
                for point in batch]

    def compose(self, point: list[str]) -> DictConfig:
        """The job config of one point (no ``hydra`` node), as its job would receive it."""
        with self.composed(point) as cfg:
            return copy.deepcopy(cfg)

    def _split(self, point: list[str]):
        """(config-value overrides, group choices) of a point, by Hydra's own split: the overrides
        the defaults list consumes vs those applied to config values."""
        parsed = [self._parse(line) for line in point]
        values = Overrides(self._repo, parsed).config_overrides
        value_ids = {id(o) for o in values}
        return values, tuple(o.input_line for o in parsed if id(o) not in value_ids)

    def _base(self, choices: tuple[str, ...]) -> tuple[DictConfig, DictConfig]:
        if choices not in self._bases:
            base = self.loader.load_sweep_config(self.master, list(choices))
            # The launcher (a group choice, e.g. launcher=slurm_gpu_4b_8b) sets the job's time limit;
            # the basic launcher has none.
            self._timeouts[choices] = OmegaConf.select(base, "hydra.launcher.timeout_min", default=None)
            with open_dict(base):
                del base["hydra"]
            self._bases[choices] = (base, copy.deepcopy(base))
        return self._bases[choices]

    def launcher_timeout_min(self, point: list[str]) -> float | None:
        """The point's job time limit in minutes (``hydra.launcher.timeout_min``; None: no limit)."""
        choices = self._split(point)[1]
        self._base(choices)
        return self._timeouts[choices]

    @contextmanager
    def composed(self, point: list[str]):
        """Like ``compose``, valid only inside the ``with`` block: the shared composition of the point's
        group choices is updated in place and restored afterwards, which is several times faster
        than copying a whole config per point."""
        values, choices = self._split(point)
        work, pristine = self._base(choices)
        if any(o.is_add() or o.is_force_add() or o.is_delete() for o in values):
            work = copy.deepcopy(pristine)  # keys appear or vanish: restoring is not worth it
        touched = {o.key_or_group.split(".")[0] for o in values}
        try:
            ConfigLoaderImpl._apply_overrides_to_config(values, work)
            yield work
        finally:
            for key in touched & set(pristine.keys()):
                work[key] = pristine._get_node(key)  # assigning a node copies it


# --------------------------------------------------------------------------- sequences


@dataclass
class Sequences:
    """Full (untruncated) training sequences of one data config: token lengths and span bounds."""

    length: np.ndarray  # (N,) templated length
    cot_start: np.ndarray  # (N,) first <think> = end of the prompt P
    cot_end: np.ndarray  # (N,) one past the first </think> = start of the answer A
    exact: bool  # encoded with the real tokenizer (True) or estimated from characters


def encoded_sequences(data_cfg, tokenizer) -> Sequences:
    from kd_sweeps import data

    encoded, _, _ = data.load_encoded(data_cfg, "train", tokenizer)  # a real dataset: length-filtered, then split
    length = np.array([len(e.input_ids) for e in encoded], dtype=np.int64)
    cot = np.array([e.spans.cot for e in encoded], dtype=np.int64).reshape(-1, 2)
    return Sequences(length, cot[:, 0], cot[:, 1], exact=True)


def estimated_sequences(data_cfg) -> Sequences:
    """Lengths from characters: ``CHARS_PER_TOKEN`` = 3.5 for Qwen3's 151k BPE on English math reasoning
    (~4 on prose, fewer where digits split one per token: expect +-25%), each marker one token, plus
    the chat template's 8 tokens before the answer turn and 2 after it."""
    from kd_sweeps import data

    def tokens(text: str) -> int:
        return math.ceil(len(text) / CHARS_PER_TOKEN)

    rows = []
    for record in data.load_records(data_cfg, "train"):
        reasoning = record["reasoning"]
        start, end = reasoning.find("<think>"), reasoning.find("</think>")
        if start < 0 or end < start:
            continue  # no markers: data.encode drops these too
        prompt = TEMPLATE_TOKENS_BEFORE + tokens(record["problem"]) + tokens(reasoning[:start])
        cot_end = prompt + 2 + tokens(reasoning[start + len("<think>"):end])  # markers: one token each
        length = cot_end + tokens(reasoning[end + len("</think>"):]) + TEMPLATE_TOKENS_AFTER
        if length <= data_cfg.max_tokens:
            rows.append((length, prompt, cot_end))
    if not rows:
        raise ValueError(f"no training sequence with both markers within data.max_tokens={data_cfg.max_tokens}")
    table = np.array(rows, dtype=np.int64)
    return Sequences(table[:, 0], table[:, 1], table[:, 2], exact=False)


def point_tokens(seqs: Sequences, trunc: float, mode: str, sections, cut_after_think: bool):
    """(kept length, supervised tokens) per sequence: ``sections.supervised_tokens`` in closed form."""
    length = np.minimum(seqs.length, seqs.cot_end) if cut_after_think else seqs.length
    keep = np.maximum(1, (length * trunc).astype(np.int64))  # floor, at least one token
    if mode in ("lead", "left"):
        start, end = np.zeros_like(length), keep
    elif mode == "middle":
        start = (length - keep) // 2
        end = start + keep
    elif mode == "right":
        start, end = length - keep, length
    else:  # random_labels: every token kept, n - round((1 - trunc) * n) of the labels
        start, end = np.zeros_like(length), length
    bounds = {"P": (0, seqs.cot_start), "CoT": (seqs.cot_start, seqs.cot_end), "A": (seqs.cot_end, seqs.length)}
    first = start + 1  # the first kept token has no predecessor in the window: never a target
    supervised = sum(np.clip(np.minimum(hi, end) - np.maximum(lo, first), 0, None)
                     for lo, hi in (bounds[s] for s in dict.fromkeys(sections)))
    if mode == "random_labels":
        supervised = supervised - np.round((1.0 - trunc) * supervised).astype(np.int64)
    return end - start, supervised


# --------------------------------------------------------------------------- models and cost


def pretrained_shape(name_or_path: str) -> ModelShape | None:
    """From a local checkpoint's config.json, else from the built-in Qwen3 table, else None."""
    config_file = Path(name_or_path).expanduser() / "config.json"
    if config_file.is_file():
        raw = json.loads(config_file.read_text())
        return ModelShape.from_config(SimpleNamespace(**raw.get("text_config", raw)))
    key = name_or_path.rstrip("/").split("/")[-1].lower().removesuffix("-base")
    if key not in QWEN3_SHAPES:
        return None
    layers, hidden, heads, kv_heads, head_dim, intermediate, tied = QWEN3_SHAPES[key]
    return ModelShape(layers, hidden, heads, kv_heads, head_dim, intermediate, QWEN3_VOCAB, tied)


def parameter_count(shape: ModelShape) -> int:
    """All parameters: matmul weights, embeddings (once if tied), RMSNorm weights (incl. q/k norms)."""
    embeddings = shape.vocab * shape.hidden * (1 if shape.tied_embeddings else 2)
    norms = shape.n_layers * (2 * shape.hidden + 2 * shape.head_dim) + shape.hidden
    return shape.n_layers * shape.layer_matmul_params() + embeddings + norms


def peak_memory_bytes(student: ModelShape, teacher: ModelShape, weight_bytes: int, teacher_bytes: int,
                      autocast: bool, micro_batch: int, max_len: int, max_supervised: int) -> int:
    """Bytes one training process holds at its peak (treat as +-30%; no sharding, no checkpointing):

    student      4 x w x parameters: weights, gradients, AdamW's two moments, in the weights' dtype
                 (w = 4 for fp32, 2 for bf16), + 2 x matmul weights for autocast's bf16 copies of fp32
    teacher      w_t x parameters: frozen, no gradients, no optimizer state
    activations  b x T x layers x a x (4 d + 3 q + 3 kv + 4 f): what a Qwen3 layer saves for backward
                 (two norm inputs, projection inputs, q/k-norm and SDPA inputs, SDPA output, four MLP
                 tensors); a = 2 bytes under bf16 autocast, 4 in fp32; SDPA keeps no T x T scores
    logits       b x V x (2 a T + 24 S): student and teacher logits over all positions, then ~24
                 bytes of fp32 log-softmaxes, probabilities and gradient per supervised position
    b micro-batch, T longest kept sequence, S its supervised tokens, d hidden, q = heads x head_dim,
    kv = kv_heads x head_dim, f intermediate, V vocabulary.
    """
    act = 2 if autocast else 4
    states = 4 * weight_bytes * parameter_count(student)
    casts = 2 * student.matmul_params() if autocast and weight_bytes == 4 else 0
    q, kv = student.n_heads * student.head_dim, student.n_kv_heads * student.head_dim
    per_token_layer = act * (4 * student.hidden + 3 * q + 3 * kv + 4 * student.intermediate)
    activations = micro_batch * max_len * student.n_layers * per_token_layer
    logits = micro_batch * student.vocab * (2 * act * max_len + LOSS_BYTES_PER_LOGIT * max_supervised)
    return states + casts + teacher_bytes * parameter_count(teacher) + activations + logits


@functools.lru_cache(maxsize=None)
def _sequence_flops(student: ModelShape, teacher: ModelShape, length: int) -> int:
    return kd_step_flops(student, teacher, [length])["total"]


# --------------------------------------------------------------------------- the plan


@dataclass
class PlannedPoint:
    index: int
    overrides: list[str]
    problems: list[str] = field(default_factory=list)
    tokens: float | None = None  # tokens the student trains on (real, unpadded), expected
    supervised: float | None = None  # positions in the loss, expected
    flops: float | None = None  # training FLOPs, student + teacher
    peak_memory: int | None = None  # bytes, one training process
    exact_tokens: bool = True
    eval: EvalCost | None = None  # generation cost (kd_sweeps.plan_eval)
    warnings: list[str] = field(default_factory=list)  # will not stop the launch, may stop the point


@dataclass
class Plan:
    points: list[PlannedPoint]
    seconds: float = 0.0
    assumptions: EvalAssumptions = field(default_factory=EvalAssumptions)

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

    def eval_total(self, key: str) -> float:
        return sum(getattr(p.eval, key) for p in self.points if p.eval is not None)


class _Estimator:
    """Per-point cost; caches what many points share (encoded data, tokenizer, model shapes)."""

    def __init__(self, assumed_lengths: tuple[int, int, int] | None = None,
                 eval_assumptions: EvalAssumptions | None = None):
        self.assumed_lengths = assumed_lengths  # (P, CoT, A) tokens where the data cannot be read
        self.eval_assumptions = eval_assumptions or EvalAssumptions()
        self._sequences: dict[str, Sequences | Exception] = {}
        self._shapes: dict[str, ModelShape | None] = {}
        self._tokenizer = None

    def tokenizer(self):
        if self._tokenizer is None:  # the embedded tokenizer, built in memory (no cache dir written)
            from kd_sweeps.tokenizer import build_tokenizer

            self._tokenizer = build_tokenizer()
        return self._tokenizer

    def sequences(self, cfg: DictConfig) -> Sequences:
        embedded = cfg.model.student.source == "embedded"
        key = json.dumps([embedded, OmegaConf.to_container(cfg.data, resolve=True)], sort_keys=True)
        if key not in self._sequences:
            try:
                self._sequences[key] = (encoded_sequences(cfg.data, self.tokenizer()) if embedded
                                        else estimated_sequences(cfg.data))
            except Exception as err:  # reported on every point that uses these data
                self._sequences[key] = self._assumed(cfg.data) if self.assumed_lengths else err
        found = self._sequences[key]
        if isinstance(found, Exception):
            raise ValueError(f"training data: {type(found).__name__}: {found}")
        return found

    def _assumed(self, data_cfg) -> Sequences:
        """Every sequence the same, with the given section lengths: data not at hand (a hub dataset
        offline). Uniform lengths make the attention term a little low (mean T^2 >= (mean T)^2)."""
        prompt, cot, answer = self.assumed_lengths
        count = np.full(data_cfg.n_train or 10_000, 1, dtype=np.int64)  # only the count check uses it
        return Sequences(count * (prompt + cot + answer), count * prompt, count * (prompt + cot), exact=False)

    def shape(self, spec) -> ModelShape | None:
        key = json.dumps(OmegaConf.to_container(spec, resolve=True), sort_keys=True)
        if key not in self._shapes:
            if spec.source == "embedded":
                from kd_sweeps.models import qwen3_config, spec_dict

                self._shapes[key] = ModelShape.from_config(qwen3_config(spec_dict(spec), self.tokenizer()))
            else:
                self._shapes[key] = pretrained_shape(spec.name_or_path)
        return self._shapes[key]

    def fill(self, point: PlannedPoint, cfg: DictConfig, launcher_timeout_min: float | None = None) -> None:
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
        seqs = self.sequences(cfg)
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
        point.exact_tokens = seqs.exact
        # The student's master weights are fp32 always (models.load_pair); a pretrained teacher is
        # loaded in bf16 unless the run computes in fp32 (auto: assumed bf16, a cluster GPU).
        bf16 = train.precision != "fp32"
        teacher_weights = 4 if cfg.model.teacher.source == "embedded" or not bf16 else 2
        point.peak_memory = peak_memory_bytes(student, teacher, 4, teacher_weights, bf16,
                                              train.micro_batch_size or train.batch_size,
                                              int(lengths.max()), int(supervised.max()))
        # Evaluation prompts as long as the training prompts (the tokens before <think>) on average.
        point.eval = eval_cost(cfg, student, float(seqs.cot_start.mean()), self.eval_assumptions,
                               launcher_timeout_min, point.flops)
        point.warnings += [w for w in [fit_warning(point.eval)] if w]


def _one_line(err: Exception) -> str:
    return " ".join(f"{type(err).__name__}: {err}".split())


def make_plan(overrides: list[str], config_name: str = "config", config_dir: Path = CONF_DIR,
              assumed_lengths: tuple[int, int, int] | None = None,
              eval_assumptions: EvalAssumptions | None = None) -> Plan:
    """Expand, compose, validate and cost every point of ``launch.py -m <overrides>``.
    ``assumed_lengths`` (P, CoT, A tokens) stand in for training data that cannot be read;
    ``eval_assumptions`` set the generation length and speed the evaluation cost assumes."""
    from kd_sweeps.validation import ConfigError, validate

    started = time.perf_counter()
    try:
        composer = GridComposer(overrides, config_name, config_dir)
        grid = composer.points()
    except PlanError:
        raise
    except Exception as err:  # the command line itself: unknown key, bad syntax, missing group
        raise PlanError(_one_line(err)) from err
    eval_assumptions = eval_assumptions or EvalAssumptions()
    estimator = _Estimator(assumed_lengths, eval_assumptions)
    points = []
    for index, overrides_of_point in enumerate(grid):
        point = PlannedPoint(index, list(overrides_of_point))
        points.append(point)
        try:
            with composer.composed(point.overrides) as cfg:
                validate(cfg)
                estimator.fill(point, cfg, composer.launcher_timeout_min(point.overrides))
        except ConfigError as err:
            point.problems += [line.strip() for line in str(err).splitlines()[1:]] or [str(err)]
        except Exception as err:
            point.problems.append(_one_line(err))
    return Plan(points, time.perf_counter() - started, eval_assumptions)


# --------------------------------------------------------------------------- output


def _count(x: float | None) -> str:
    if x is None:
        return "-"
    for unit, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= size:
            return f"{x / size:.3g}{unit}"
    return f"{x:.3g}"


def _gib(x: float | None) -> str:
    return "-" if x is None else f"{x / 2**30:.3g} GiB"


def format_plan(plan: Plan) -> str:
    """One row per point (the overrides every point shares are printed once, above), then totals."""
    shared = [o for o in plan.points[0].overrides if all(o in p.overrides for p in plan.points)] \
        if len(plan.points) > 1 else []
    rows = [["#", "overrides", "train tokens", "supervised", "train FLOPs", "peak memory",
             "eval completions x tokens", "eval tokens", "eval FLOPs", "eval time", "eval time limit"]]
    for p in plan.points:
        ev = p.eval
        rows.append([str(p.index), " ".join(o for o in p.overrides if o not in shared) or "(defaults)",
                     _count(p.tokens) + ("" if p.exact_tokens else "~"), _count(p.supervised),
                     "-" if p.flops is None else f"{p.flops:.3g}", _gib(p.peak_memory),
                     "-" if ev is None else f"{ev.completions:,} x {ev.tokens_per_completion:,}",
                     _count(ev and ev.tokens), "-" if ev is None else f"{ev.flops:.3g}",
                     duration(ev and ev.seconds) + ("!" if p.warnings else ""),
                     "-" if ev is None else "none" if ev.limit_s is None else duration(ev.limit_s)])
    memories = [p.peak_memory for p in plan.points if p.peak_memory is not None]
    rows.append(["", f"total ({len(plan.points)} points)", _count(plan.total("tokens")),
                 _count(plan.total("supervised")), f"{plan.total('flops'):.3g}",
                 f"max {_gib(max(memories))}" if memories else "-",
                 f"{plan.eval_total('completions'):,.0f}", _count(plan.eval_total("tokens")),
                 f"{plan.eval_total('flops'):.3g}", duration(plan.eval_total("seconds")), ""])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 1 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.insert(len(lines) - 1, "-" * len(lines[0]))
    if shared:
        lines.insert(0, f"every point: {' '.join(shared)}")
    if any(not p.exact_tokens for p in plan.points):
        lines.append(f"~ token counts estimated: from characters ({CHARS_PER_TOKEN} per token) or --lengths")
    if any(p.warnings for p in plan.points):
        lines.append("! the evaluation does not fit its job's time limit (warnings below)")
    lines.append(plan.assumptions.describe())
    return "\n".join(lines)


def write_csv(plan: Plan, path: Path) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["index", "overrides", "train_tokens", "supervised_tokens", "train_flops",
                         "peak_memory_bytes", "tokens_exact", "eval_problems", "eval_completions",
                         "eval_tokens_per_completion", "eval_tokens", "eval_flops", "eval_seconds",
                         "eval_time_limit_s", "problems", "warnings"])
        for p in plan.points:
            ev = [None] * 7 if p.eval is None else [
                p.eval.problems, p.eval.completions, p.eval.tokens_per_completion, p.eval.tokens,
                p.eval.flops, p.eval.seconds, p.eval.limit_s]
            writer.writerow([p.index, " ".join(p.overrides), p.tokens, p.supervised, p.flops,
                             p.peak_memory, p.exact_tokens, *ev, " | ".join(p.problems),
                             " | ".join(p.warnings)])


def _lengths(text: str) -> tuple[int, int, int]:
    parts = [int(x) for x in text.split(",")]
    if len(parts) != 3 or min(parts) < 1:
        raise argparse.ArgumentTypeError("expected three positive token counts: P,COT,A")
    return parts[0], parts[1], parts[2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kd_sweeps.plan", description=__doc__.split("\n")[0])
    parser.add_argument("overrides", nargs="*", help="the overrides of launch.py -m")
    parser.add_argument("-m", "--multirun", action="store_true", help="accepted and ignored, to paste commands")
    parser.add_argument("--config-name", default="config")
    parser.add_argument("--csv", type=Path, help="also write one row per point to this CSV file")
    parser.add_argument("--lengths", type=_lengths, metavar="P,COT,A",
                        help="tokens of prompt, chain of thought and answer per sequence, assumed where "
                             "the training data cannot be read (a hub dataset offline)")
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
    evaluation.add_argument("--train-flops-per-s", type=float, metavar="RATE",
                            help="sustained training FLOP/s: estimates training time, which the "
                                 "evaluation in the same job (eval.separate_job=false) must share the "
                                 "launcher's timeout_min with")
    args = parser.parse_args(argv)
    try:
        assumptions = EvalAssumptions(args.eval_tokens, args.eval_fraction, args.eval_tokens_per_s,
                                      args.train_flops_per_s)
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
                         eval_assumptions=assumptions)
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
