"""The recipe of one grid point, read top to bottom: ``setup`` (tokenizer, data, models, teacher or
its cache, where the sequences come from, cost meter, resume state) → ``train`` (the loop) →
``finish`` (gather and save the student, the point's cost, its evaluation and references).

The recipe object holds the point's state, so what a resume must carry is one ``state_dict`` /
``load_state_dict`` pair (the cost counters, the train time, the checkpoint selector; the weights,
optimizer and rollout counters are the steps' own) and each optimizer step's bookkeeping is one
method (``on_step``), called from ``train``'s own loop over ``train.TrainSteps``: nothing calls
back. ``run.main`` keeps the point's lifecycle around it: skip, resume, evaluation job, record.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from kd_sweeps import baselines, data, distributed, evaluate, models, selection, teacher_cache, teachers, train
from kd_sweeps.cost import CostMeter, ModelShape
from kd_sweeps.memory import PeakMemory
from kd_sweeps.point_record import read_result
from kd_sweeps.validation import check_topk

log = logging.getLogger(__name__)
METER_FIELDS = ("flops_student", "flops_teacher", "tokens_trained", "tokens_supervised", "tokens_padded")


class PointRecipe:
    """One grid point's training and evaluation (module docstring). ``tracker`` receives the logged
    steps (rank 0's record, or a stand-in that records nothing on the other ranks)."""

    def __init__(self, cfg: DictConfig, tracker, output_dir: Path, env: distributed.DistEnv):
        self.cfg, self.tracker, self.output_dir, self.env = cfg, tracker, Path(output_dir), env
        self.device = env.device
        self.cache_dir = Path(cfg.cache_dir).expanduser()
        self.train_time_s = 0.0  # wall time of finished steps, carried across a resume
        self.last_losses: dict = {}  # the last step's, for a resume with no step left
        self.started = time.perf_counter()
        self.rollout, self.distill_summary, self.cache_summary = None, {}, {}

    def run(self) -> dict:
        self.setup()
        self.train()
        return self.finish()

    # ----------------------------------------------------------------------------------- setup

    def setup(self) -> None:
        cfg = self.cfg
        if cfg.train.num_threads:
            torch.set_num_threads(cfg.train.num_threads)
        torch.manual_seed(cfg.seed)
        self.tokenizer = models.load_tokenizer(cfg, self.cache_dir)
        check_topk(cfg, len(self.tokenizer))  # before the teacher loads
        # A real dataset is formatted, tokenized and length-filtered once (rank 0, cached in cache_dir/data)
        # and split; the other ranks and later points read the cached tables. data_rows: every stage's count.
        self.encoded, self.stats, self.data_rows = data.load_encoded(
            cfg.data, "train", self.tokenizer, self.cache_dir, build=self.env.is_main,
            stop=lambda: (read_result(self.output_dir) or {}).get("status") == "failed")
        self.examples, self.skipped = data.training_examples(
            self.encoded, cfg.sections.include, cfg.trunc, cfg.truncation.mode, cfg.truncation.cut_after_think,
            cfg.seed)
        if len(self.examples) < cfg.train.batch_size:
            raise data.DataError(f"only {len(self.examples)} of {len(self.encoded)} sequences have a supervised "
                                 f"token with sections.include={list(cfg.sections.include)}, trunc={cfg.trunc}, "
                                 f"truncation.mode={cfg.truncation.mode}; need at least train.batch_size="
                                 f"{cfg.train.batch_size}")
        self.cfg = cfg = settled_config(cfg, self.device, len(self.examples))  # the resolved precision and steps
        log.info("training %d steps of %d sequences (%.2f epochs of %d examples), computing in %s",
                 cfg.train.max_steps, cfg.train.batch_size,
                 cfg.train.max_steps * cfg.train.batch_size / len(self.examples), len(self.examples),
                 cfg.train.precision)
        self.eval_sets = evaluate.load_eval_sets(cfg)  # now: a missing benchmark file fails before training
        self.selector = selection.for_config(cfg, self.tokenizer, self.env, self.output_dir / "checkpoint")
        self._setup_models()
        self.meter = CostMeter(ModelShape.from_config(self.student.model.config), self.teacher_shape,
                               head_on_supervised_only=cfg.train.loss_impl == "chunked")
        # With the evaluation in this job, the trained state is kept until it ends: an evaluation preempted
        # or out of time resumes (eval/<benchmark>.jsonl) without training again.
        self.resume = train.Resume(distributed.train_state(self.output_dir / "train_state", self.env),
                                   cfg.train.checkpoint_every, at_end=not cfg.eval.separate_job)

    def _setup_models(self) -> None:
        """Teacher and student loaded (the student in fp32: its master weights), the sequences' source
        set, the student sharded over the ranks, the teacher placed or replaced by its top-k cache."""
        cfg, env = self.cfg, self.env
        # Embedded models are prepared once and cached; with a process group transformers writes files on
        # rank 0 only, so rank 0 prepares them while the others wait, then they load the cached copies.
        main_first = env.distributed and "embedded" in (cfg.model.teacher.source, cfg.model.student.source)
        if main_first and not env.is_main:
            distributed.barrier(env)
        stand_in, fingerprint = teachers.stand_in(cfg, self.tokenizer, self.encoded, self.cache_dir)
        self.teacher, self.student = models.load_pair(cfg, self.tokenizer, self.device, teacher=stand_in)
        if main_first and env.is_main:
            distributed.barrier(env)
        if cfg.distill.mode != "offline":  # before sharding: the teacher generates as a plain module
            self.encoded, self.examples, self.skipped, self.rollout, self.distill_summary = _distill_source(
                cfg, self.tokenizer, self.teacher, self.student, self.encoded, self.examples, self.skipped,
                self.cache_dir)
        if cfg.train.activation_checkpointing:  # each layer's activations are recomputed in backward
            distributed.enable_activation_checkpointing(self.student.model)
        # The model itself for one process; sharded, it computes in bf16 under train.precision=bf16.
        self.student_model = distributed.shard_student(self.student.model, env, cfg.train.precision)
        self.teacher_model, self.teacher_shape, self.cache_summary = teachers.for_steps(
            cfg, self.teacher, self.student, self.encoded, fingerprint, self.cache_dir, env, self.output_dir)

    # ----------------------------------------------------------------------------------- train

    def train(self) -> None:
        """The optimizer steps (``train.TrainSteps``) with the point's books kept between them: cost,
        checkpoint selection, logging, and this object's counters saved with the training state."""
        cfg, env = self.cfg, self.env
        with PeakMemory(self.device) as memory:
            self.started = time.perf_counter()
            # The steps read the schema's own dataclasses (train.max_steps settled).
            with train.TrainSteps(self.student_model, self.teacher_model, self.examples, self.tokenizer.pad_token_id,
                                  OmegaConf.to_object(cfg.train), OmegaConf.to_object(cfg.loss), self.device,
                                  desc=f"trunc={cfg.trunc} {cfg.sections.name}", resume=self.resume, dist=env,
                                  rollout=self.rollout, seed=cfg.seed) as steps:
                if steps.restored is not None:
                    self.load_state_dict(steps.restored)
                for step in steps:
                    self.on_step(step)
                    if steps.save_due(step):  # a preemption signal, train.checkpoint_every, the end
                        steps.save(step, self.state_dict())
            self.train_time = self.train_time_s + time.perf_counter() - self.started
        # Each rank metered its own micro-batches: the run's cost is their sum; memory, the busiest rank's.
        totals = distributed.all_reduce_sum([getattr(self.meter, k) for k in METER_FIELDS], env)
        for key, total in zip(METER_FIELDS, totals):
            setattr(self.meter, key, total)
        self.peak_memory = max(distributed.all_gather(memory.peak_bytes, env))

    def on_step(self, step: train.Step) -> None:
        """After every optimizer step: cost, checkpoint selection (a collective), logging."""
        self.last_losses = {k: step.metrics.get(k) for k in ("loss", "ce_loss", "kd_loss")}
        for micro in step.micro_batches:
            self.meter.add_step(micro["shape"], micro["lengths"], micro["supervised"])
        val = self.selector.after_step(step.index, self.student_model) if self.selector else {}
        if val or step.index % self.cfg.train.log_every == 0 or step.index == self.cfg.train.max_steps - 1:
            self.tracker.log_step(step.index, {**step.metrics, **val})

    def state_dict(self) -> dict:
        """What a resume carries besides weights and optimizer (every rank calls it at the same step:
        the state is saved collectively; the cost counters are all ranks' sums)."""
        elapsed = self.train_time_s + time.perf_counter() - self.started
        totals = distributed.all_reduce_sum([getattr(self.meter, k) for k in METER_FIELDS], self.env)
        return {"train_time_s": elapsed, "last": self.last_losses, **dict(zip(METER_FIELDS, totals)),
                **({"selection": self.selector.state()} if self.selector else {})}

    def load_state_dict(self, extra: dict) -> None:
        self.train_time_s = extra["train_time_s"]
        self.last_losses = extra.get("last", {})
        for key in METER_FIELDS:  # saved totals are all ranks': rank 0 carries them, the others restart at 0
            setattr(self.meter, key, extra[key] if self.env.is_main else 0)
        if self.selector:
            self.selector.restore(extra["selection"])

    # ----------------------------------------------------------------------------------- finish

    def finish(self) -> dict:
        """Save the student (rank 0), then the point's summary: cost, data, evaluation, references."""
        cfg, env, selector = self.cfg, self.env, self.selector
        # collective: the full student on rank 0 only (best_val: the best one is on disk already)
        final = None if selector else distributed.gathered_model(self.student_model, env)
        # Generation needs the memory more than the frozen teacher and the student's shards do.
        self.teacher.model = self.student.model = self.teacher_model = self.student_model = None
        if not env.is_main:
            return {}
        checkpoint = self.output_dir / "checkpoint"
        if selector is None:
            final.save_pretrained(checkpoint)
            self.tokenizer.save_pretrained(checkpoint)
        engine = evaluate.resolve_engine(cfg.eval.engine, self.device)
        if engine == "vllm" or cfg.eval.separate_job:  # vLLM / the evaluation job load the checkpoint themselves
            final = None
        elif selector is not None:
            final = selection.load_checkpoint(checkpoint, self.device, cfg.model.attn_implementation)
        summary = self.summary(engine)
        if not cfg.eval.separate_job:
            summary.update(evaluate.evaluate_model(cfg, final, self.tokenizer, self.eval_sets, self.device,
                                                   checkpoint))
            final = None  # the references' models take its place
            summary.update(baselines.reference_summary(cfg, evaluate.reference_paths(summary), self.tokenizer,
                                                       self.device, self.eval_sets))
        self.resume.state.remove()  # the run is complete: a rerun is skipped, not resumed
        log.info("run %s: accuracy %.3f ± %.3f, %.3g training FLOPs, %.1f s", self.tracker.run_id,
                 summary.get("accuracy", float("nan")), summary.get("accuracy_stderr", float("nan")),
                 summary["train_flops"], self.train_time)
        return summary

    def summary(self, engine: str) -> dict:
        """The point's record before evaluation: cost, data, models, selection, distillation."""
        cfg, selector, n = self.cfg, self.selector, len(self.examples)
        summary = {**self.meter.summary(), "train_time_s": self.train_time, "peak_memory_bytes": self.peak_memory,
                   "final_loss": self.last_losses.get("loss"), "final_ce_loss": self.last_losses.get("ce_loss"),
                   "final_kd_loss": self.last_losses.get("kd_loss"), "examples_trained_on": n,
                   "sequences_trained": cfg.train.max_steps * cfg.train.batch_size,  # drawn, repeats over epochs
                   "examples_skipped": self.skipped, "examples_too_long": self.stats.too_long,
                   "examples_missing_markers": self.stats.missing_markers, "data_rows": self.data_rows,
                   # the embedded models' accuracies from their preparation; eval.baselines replaces them
                   "teacher_accuracy": self.teacher.info.get("accuracy"),
                   "base_accuracy": self.student.info.get("accuracy"),
                   "teacher_path": self.teacher.path, "student_init_path": self.student.path,
                   **self.cache_summary, **(selector.summary() if selector else {}),
                   "checkpoint_step": selector.best_step if selector else cfg.train.max_steps, "eval_engine": engine,
                   "precision": cfg.train.precision, "train_steps": cfg.train.max_steps,
                   "epochs_trained": cfg.train.max_steps * cfg.train.batch_size / n}
        summary["padding_ratio"] = summary["tokens_padded"] / max(1, summary["tokens_padded"] + summary["tokens_trained"])
        summary.update(distill_cost(cfg, self.rollout, self.distill_summary, summary["train_flops"], self.env))
        return summary


# --------------------------------------------------------------------------- settings and setup helpers


def settled_config(cfg: DictConfig, device, n_examples: int) -> DictConfig:
    """A copy of ``cfg`` with what this machine and these data decide filled in: ``train.precision``
    resolved (auto: bf16 where the device computes it natively, else fp32) and ``train.max_steps``
    (null: ceil(epochs x examples kept / global batch)). The point's id and record keep the
    config as written; its summary reports both values."""
    import copy

    from kd_sweeps.precision import resolve

    settled = copy.deepcopy(cfg)
    OmegaConf.set_readonly(settled, False)
    settled.train.precision = resolve(cfg.train.precision, device)
    if cfg.train.max_steps is None:
        settled.train.max_steps = math.ceil(cfg.train.epochs * n_examples / cfg.train.batch_size)
    return settled


def _distill_source(cfg: DictConfig, tokenizer, teacher, student, encoded, examples, skipped, cache_dir: Path):
    """distill.mode=sequence: the teacher's completions replace the traces (examples made again from
    them); on_policy: the rollout maker the loop draws from. Returns (encoded, examples, skipped,
    rollout or None, summary)."""
    from kd_sweeps import distill
    from kd_sweeps.generate import Sampling

    d = cfg.distill
    end_think_id = data.marker_ids(tokenizer)[1]
    generator = distill.Generator(evaluate.stop_token_ids(tokenizer, student.model), tokenizer.pad_token_id,
                                  end_think_id, Sampling(d.temperature, d.top_p, d.top_k), d.batch_size)
    autocast = cfg.train.precision == "bf16"
    if d.mode == "on_policy":
        rollout = distill.OnPolicy(encoded, generator, tuple(cfg.sections.include), cfg.trunc,
                                   cfg.truncation.cut_after_think, d.lmbda, cfg.seed,
                                   ModelShape.from_config(student.model.config))
        return encoded, examples, skipped, rollout, {}
    folder, key = distill.sequences_folder(cache_dir, teacher.path, teacher_cache.dataset_fingerprint(encoded),
                                           generator, d.max_new_tokens, cfg.data.max_tokens, cfg.seed)
    encoded, summary = distill.teacher_sequences(teacher.model, encoded, generator, folder, key, d.max_new_tokens,
                                                 cfg.data.max_tokens, cfg.seed,
                                                 ModelShape.from_config(teacher.model.config), autocast)
    examples, skipped = data.training_examples(encoded, cfg.sections.include, cfg.trunc, cfg.truncation.mode,
                                               cfg.truncation.cut_after_think, cfg.seed)
    return encoded, examples, skipped, None, summary


def distill_cost(cfg: DictConfig, rollout, distill_summary: dict, train_flops: float,
                 env: distributed.DistEnv) -> dict:
    """Generation next to training: the student's rollouts (every rank generates the whole global
    batch alike, so the work done is world_size times one rank's), the teacher's cached completions
    (what they cost to make, once), and the point's total FLOPs."""
    out = {"distill_mode": cfg.distill.mode, **distill_summary}
    if rollout is not None:
        out.update({k: v * env.world_size if k in ("generation_flops", "generated_tokens") else v
                    for k, v in rollout.state().items()})
    out["total_flops"] = train_flops + out.get("generation_flops", 0) + out.get("sequence_generation_flops", 0)
    return out
