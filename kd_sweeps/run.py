"""One grid point, end to end: validate → models and data → KD training → evaluation → cost → record.

``main(cfg)`` is what ``launch.py`` calls for every point of a sweep; it returns the run's summary.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from kd_sweeps import baselines, data, distributed, evaluate, identity, models, selection, teacher_cache, train
from kd_sweeps.cost import CostMeter, ModelShape
from kd_sweeps.memory import PeakMemory
from kd_sweeps.tracking import RESULT_FILE, Tracker, mark_skipped, read_result
from kd_sweeps.validation import check_topk, validate

log = logging.getLogger(__name__)


def loop_settings(cfg: DictConfig) -> train.LoopSettings:
    """The loop's settings from a config whose max_steps is set (``settled_config``)."""
    t = cfg.train
    return train.LoopSettings(max_steps=t.max_steps, batch_size=t.batch_size, micro_batch_size=t.micro_batch_size,
                              lr=t.lr, weight_decay=t.weight_decay, decay_norms_and_biases=t.decay_norms_and_biases,
                              betas=tuple(t.betas), schedule=t.schedule, warmup_ratio=t.warmup_ratio,
                              div_factor=t.div_factor, final_div_factor=t.final_div_factor,
                              cycle_momentum=t.cycle_momentum, grad_clip=t.grad_clip, precision=t.precision,
                              log_every=t.log_every, seed=cfg.seed, loss_impl=t.loss_impl)


def loss_settings(cfg: DictConfig) -> train.LossSettings:
    loss = cfg.loss
    return train.LossSettings(name=loss.name, kd_ratio=loss.kd_ratio, temperature=loss.temperature,
                              beta=loss.beta, alpha=loss.alpha, mix=loss.mix, normalize=loss.normalize)


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


def main(cfg: DictConfig, overrides: list[str] | None = None, claimed: bool = True) -> dict:
    """Run one grid point. ``claimed``: whether this process holds the point's claim (rank 0 takes it
    for the whole point, kd_sweeps/claim.py; other ranks' value is ignored)."""
    validate(cfg)  # before anything heavy: a bad point fails in a second with every problem listed
    resolved = OmegaConf.to_container(cfg, resolve=True)
    point_id = identity.run_id(resolved)
    output_dir = Path(cfg.output_dir)
    env = distributed.init_distributed(cfg.train.device)  # one process, or one rank of torchrun / submitit tasks
    try:
        if not distributed.all_gather(claimed, env)[0]:  # rank 0's claim decides for every rank
            from kd_sweeps.claim import PointClaimed

            raise PointClaimed(f"grid point {output_dir} is claimed by another launch")
        distributed.micro_batch_size(cfg.train.batch_size, cfg.train.micro_batch_size, env)  # fails before any load
        done = read_result(output_dir)
        distributed.barrier(env)  # every rank has read the record before rank 0 rewrites it
        if done and done.get("status") == "ok" and done.get("run_id") == point_id and not cfg.force:
            log.info("run %s is done (%s); skipped (force=true reruns it)", point_id, output_dir / RESULT_FILE)
            if env.is_main:
                mark_skipped(output_dir, done)
            return done["summary"]
        if cfg.eval.separate_job and not cfg.force:
            from kd_sweeps import eval_job

            if eval_job.trained_only(done, point_id, output_dir):  # every rank read the same record
                return eval_job.finish_evaluation(cfg, output_dir, point_id) if env.is_main else {}
        # Rank 0 alone keeps the record (result.json, W&B); the other ranks train and evaluate nothing.
        record = Tracker(output_dir, point_id, cfg.sweep, resolved, cfg.logger, overrides) if env.is_main \
            else _Unrecorded(point_id)
        with record as tracker:
            distributed.barrier(env)  # rank 0's record says "running" before another rank reads it
            if cfg.eval.separate_job:  # the record stays open for the evaluation job
                tracker.status_on_success = "evaluating"
            summary = _train_and_evaluate(cfg, tracker, output_dir, env)
            tracker.set_summary(summary)
        if cfg.eval.separate_job and env.is_main:
            from kd_sweeps import eval_job

            return eval_job.submit(cfg, output_dir, point_id)
        return summary
    finally:
        distributed.destroy(env)


class _Unrecorded:
    """A rank other than 0's stand-in for the Tracker: it records nothing."""

    def __init__(self, run_id: str):
        self.run_id = run_id

    def __enter__(self) -> "_Unrecorded":
        return self

    def __exit__(self, *exc) -> bool:
        return False

    def log_step(self, step: int, metrics: dict) -> None:
        pass

    def set_summary(self, summary: dict) -> None:
        pass


def _teacher_cache_folder(cfg: DictConfig, teacher_path: str, teacher_rows: int, vocab: int, fingerprint: str,
                          cache_dir: Path) -> tuple[Path, dict]:
    """Where the teacher's top-k cache for this (teacher, data, formatting, k, temperature,
    precision, compared columns) lives, and its key."""
    key = dict(teacher_id=str(teacher_path), dataset_fingerprint=fingerprint,
               formatting=f"{cfg.data.name}:{models.TASK_VERSION}", max_tokens=cfg.data.max_tokens,
               k=cfg.train.teacher_topk, temperature=cfg.loss.temperature, precision=cfg.train.precision)
    fields, suffix = teacher_cache.key_fields(**key), ""
    if vocab != teacher_rows:
        fields["vocab"] = vocab
        suffix = f"-v{vocab}"
    return cache_dir / f"teacher-topk-{teacher_cache.cache_key(**key)}{suffix}", fields


def _ready_teacher_cache(cfg: DictConfig, tokenizer, fingerprint: str, cache_dir: Path):
    """The teacher's stand-in (no weights) when its top-k cache is built already, else None: a point
    that only reads the cache never loads the teacher (at paper scale, 16 GB and a minute per point)."""
    if cfg.train.teacher_cache != "topk":
        return None
    stand_in = models.teacher_without_weights(cfg, tokenizer)
    student_rows = models.planned_rows(cfg, "student", tokenizer)
    if stand_in is None or student_rows is None:
        return None
    folder, _ = _teacher_cache_folder(cfg, stand_in.path, stand_in.rows, min(stand_in.rows, student_rows),
                                      fingerprint, cache_dir)
    return stand_in if (folder / "meta.json").exists() else None


def _cached_teacher(cfg: DictConfig, teacher, encoded, fingerprint: str, cache_dir: Path, device, vocab: int,
                    env: distributed.DistEnv, output_dir: Path) -> tuple:
    """The teacher's top-k cache, built once per sweep under a file lock and shared by every grid
    point; and what its build cost. ``vocab``: the columns KD compares (fewer than the teacher's
    rows when the student's head is padded less). In a multi-process point rank 0 builds it (its
    record says so) while the other ranks wait for it."""
    folder, fields = _teacher_cache_folder(cfg, teacher.path, models.output_rows(teacher), vocab, fingerprint,
                                           cache_dir)
    started = time.perf_counter()
    if not env.is_main:  # polled, not a collective: a build can outlast the process group's timeout
        while not (folder / "meta.json").exists():
            if (read_result(output_dir) or {}).get("status") == "failed":
                raise RuntimeError(f"rank 0 failed before the teacher cache {folder} was built; see "
                                   f"{output_dir / RESULT_FILE}")
            time.sleep(1.0)
    cache = teacher_cache.build_cache(teacher.model, encoded, folder, cfg.train.teacher_topk, cfg.loss.temperature, 32,
                           device, key=fields, vocab_size=vocab, autocast=cfg.train.precision == "bf16")
    summary = {"teacher_cache_built_here": bool(cache.built), "teacher_cache_path": str(cache.folder),
               "teacher_cache_seconds": time.perf_counter() - started, "teacher_loaded": teacher.model is not None,
               "teacher_cache_build_flops": cache.meta.get("teacher_forward_flops", 0) if cache.built else 0}
    return train.CachedTeacher(cache), summary


def _distill_source(cfg: DictConfig, tokenizer, teacher, student, encoded, examples, skipped, cache_dir: Path):
    """distill.mode=sequence: the teacher's completions replace the traces (examples made again from
    them); on_policy: the rollout maker the loop draws from. Returns (encoded, examples, skipped,
    rollout or None, summary)."""
    from kd_sweeps import distill
    from kd_sweeps.generate import Sampling

    d = cfg.distill
    generator = distill.Generator(evaluate.stop_token_ids(tokenizer, student.model), tokenizer.pad_token_id,
                                  data.marker_ids(tokenizer), Sampling(d.temperature, d.top_p, d.top_k), d.batch_size)
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


def _train_and_evaluate(cfg: DictConfig, tracker: Tracker, output_dir: Path, env: distributed.DistEnv) -> dict:
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    device = env.device
    torch.manual_seed(cfg.seed)
    cache_dir = Path(cfg.cache_dir).expanduser()
    tokenizer = models.load_tokenizer(cfg, cache_dir)
    check_topk(cfg, len(tokenizer))  # before the teacher loads
    # A real dataset is formatted, tokenized and length-filtered once (rank 0, cached in cache_dir/data) and
    # split; the other ranks and later grid points read the cached tables. data_rows: the count at every stage.
    encoded, stats, data_rows = data.load_encoded(
        cfg.data, "train", tokenizer, cache_dir, build=env.is_main,
        stop=lambda: (read_result(output_dir) or {}).get("status") == "failed")
    examples, skipped = data.training_examples(encoded, cfg.sections.include, cfg.trunc, cfg.truncation.mode,
                                               cfg.truncation.cut_after_think, cfg.seed)
    if len(examples) < cfg.train.batch_size:
        raise data.DataError(f"only {len(examples)} of {len(encoded)} sequences have a supervised token "
                             f"with sections.include={list(cfg.sections.include)}, trunc={cfg.trunc}, "
                             f"truncation.mode={cfg.truncation.mode}; need at least train.batch_size="
                             f"{cfg.train.batch_size}")
    cfg = settled_config(cfg, device, len(examples))  # from here on: the resolved precision and step count
    log.info("training %d steps of %d sequences (%.2f epochs of %d examples), computing in %s",
             cfg.train.max_steps, cfg.train.batch_size, cfg.train.max_steps * cfg.train.batch_size / len(examples),
             len(examples), cfg.train.precision)
    eval_sets = evaluate.load_eval_sets(cfg)  # loaded now: a missing benchmark file fails before any training
    selector = selection.for_config(cfg, tokenizer, env, output_dir / "checkpoint")  # None: final weights
    # Embedded models are prepared once and cached; with a process group transformers writes files on
    # rank 0 only, so rank 0 prepares them while the others wait, then they load the cached copies.
    main_first = env.distributed and "embedded" in (cfg.model.teacher.source, cfg.model.student.source)
    if main_first and not env.is_main:
        distributed.barrier(env)
    # The data's fingerprint keys the teacher's top-k cache (hashing every token once per point).
    fingerprint = teacher_cache.dataset_fingerprint(encoded) if cfg.train.teacher_cache == "topk" else ""
    teacher, student = models.load_pair(cfg, tokenizer, device,  # the student in fp32: its master weights
                                        teacher=_ready_teacher_cache(cfg, tokenizer, fingerprint, cache_dir))
    if main_first and env.is_main:
        distributed.barrier(env)
    rollout, distill_summary = None, {}
    if cfg.distill.mode != "offline":  # before sharding: the teacher generates as a plain module
        encoded, examples, skipped, rollout, distill_summary = _distill_source(
            cfg, tokenizer, teacher, student, encoded, examples, skipped, cache_dir)
    if cfg.train.activation_checkpointing:  # each layer's activations are recomputed in backward
        distributed.enable_activation_checkpointing(student.model)
    # The model itself for one process; sharded, it computes in bf16 under train.precision=bf16.
    student_model = distributed.shard_student(student.model, env, cfg.train.precision)
    cache_summary: dict = {}
    if cfg.train.teacher_cache == "topk":
        teacher_model, cache_summary = _cached_teacher(cfg, teacher, encoded, fingerprint, cache_dir, device,
                                                       min(models.output_rows(teacher), models.output_rows(student)),
                                                       env, output_dir)
        teacher_shape = None  # no teacher FLOPs per step; the build is reported once, in the summary
    else:
        teacher_model = distributed.place_teacher(teacher.model, env, cfg.train.teacher_parallel)
        teacher_shape = ModelShape.from_config(teacher.model.config)
    meter = CostMeter(ModelShape.from_config(student.model.config), teacher_shape,
                      head_on_supervised_only=cfg.train.loss_impl == "chunked")

    counters = {"train_time_s": 0.0}  # wall time of finished steps, carried across a resume
    meter_fields = ("flops_student", "flops_teacher", "tokens_trained", "tokens_supervised", "tokens_padded")

    def on_step(step: int, metrics: dict, micro_batches: list[dict]) -> None:
        counters["last"] = {k: metrics.get(k) for k in ("loss", "ce_loss", "kd_loss")}
        for micro in micro_batches:
            meter.add_step(micro["shape"], micro["lengths"], micro["supervised"])
        val = selector.after_step(step, student_model) if selector else {}  # collective
        if val or step % cfg.train.log_every == 0 or step == cfg.train.max_steps - 1:
            tracker.log_step(step, {**metrics, **val})

    def get_extra() -> dict:  # every rank calls it at the same step: the state is saved collectively
        elapsed = counters["train_time_s"] + time.perf_counter() - started
        totals = distributed.all_reduce_sum([getattr(meter, k) for k in meter_fields], env)  # all ranks'
        return {"train_time_s": elapsed, "last": counters.get("last", {}), **dict(zip(meter_fields, totals)),
                **({"selection": selector.state()} if selector else {}),
                **({"rollout": rollout.state()} if rollout else {})}

    def set_extra(extra: dict) -> None:
        counters["train_time_s"] = extra["train_time_s"]
        counters["last"] = extra.get("last", {})  # the last step's losses, for a resume with no step left
        for key in meter_fields:  # saved totals are all ranks': rank 0 carries them, the others restart at 0
            setattr(meter, key, extra[key] if env.is_main else 0)
        if selector:
            selector.restore(extra["selection"])
        if rollout:
            rollout.restore(extra["rollout"])

    # With the evaluation in this job, the trained state is kept until it ends: an evaluation preempted
    # or out of time resumes (eval/<benchmark>.jsonl) without training again.
    resume = train.Resume(distributed.train_state(output_dir / "train_state", env), cfg.train.checkpoint_every,
                          get_extra, set_extra, at_end=not cfg.eval.separate_job)
    with PeakMemory(device) as memory:
        started = time.perf_counter()
        last = train.train_loop(student_model, teacher_model, examples, tokenizer.pad_token_id,
                                loop_settings(cfg), loss_settings(cfg), device, on_step,
                                desc=f"trunc={cfg.trunc} {cfg.sections.name}", resume=resume, dist=env,
                                rollout=rollout)
        train_time = counters["train_time_s"] + time.perf_counter() - started
        last = last or counters.get("last", {})  # resumed after the last step: no step ran here
    # Each rank metered its own micro-batches: the run's cost is their sum; memory, the busiest rank's.
    for key, total in zip(meter_fields, distributed.all_reduce_sum([getattr(meter, k) for k in meter_fields], env)):
        setattr(meter, key, total)
    peak_memory = max(distributed.all_gather(memory.peak_bytes, env))
    # collective: the full student on rank 0 only (best_val: the best one is on disk already)
    final = None if selector else distributed.gathered_model(student_model, env)
    # Generation needs the memory more than the frozen teacher and the student's shards do.
    teacher.model = student.model = teacher_model = student_model = None
    if not env.is_main:
        return {}
    if selector is None:
        final.save_pretrained(output_dir / "checkpoint")
        tokenizer.save_pretrained(output_dir / "checkpoint")
    engine = evaluate.resolve_engine(cfg.eval.engine, device)
    if engine == "vllm" or cfg.eval.separate_job:  # vLLM / the evaluation job load the checkpoint themselves
        final = None
    elif selector is not None:
        final = selection.load_checkpoint(output_dir / "checkpoint", device, cfg.model.attn_implementation)
    summary = {**meter.summary(), "train_time_s": train_time, "peak_memory_bytes": peak_memory,
               "final_loss": last.get("loss"), "final_ce_loss": last.get("ce_loss"),
               "final_kd_loss": last.get("kd_loss"), "examples_trained_on": len(examples),
               "sequences_trained": cfg.train.max_steps * cfg.train.batch_size,  # drawn, with repeats over epochs
               "examples_skipped": skipped, "examples_too_long": stats.too_long,
               "examples_missing_markers": stats.missing_markers, "data_rows": data_rows,
               # the embedded models' accuracies from their preparation; eval.baselines replaces them below
               "teacher_accuracy": teacher.info.get("accuracy"), "base_accuracy": student.info.get("accuracy"),
               "teacher_path": teacher.path, "student_init_path": student.path,
               **cache_summary, **(selector.summary() if selector else {}),
               "checkpoint_step": selector.best_step if selector else cfg.train.max_steps, "eval_engine": engine,
               "precision": cfg.train.precision, "train_steps": cfg.train.max_steps,
               "epochs_trained": cfg.train.max_steps * cfg.train.batch_size / len(examples)}
    summary["padding_ratio"] = summary["tokens_padded"] / max(1, summary["tokens_padded"] + summary["tokens_trained"])
    summary.update(distill_cost(cfg, rollout, distill_summary, summary["train_flops"], env))
    if not cfg.eval.separate_job:
        summary.update(evaluate.evaluate_model(cfg, final, tokenizer, eval_sets, device, output_dir / "checkpoint"))
        final = None  # the references' models take its place
        summary.update(baselines.reference_summary(cfg, evaluate.reference_paths(summary), tokenizer, device,
                                                   eval_sets))
    resume.state.remove()  # the run is complete: a rerun is skipped, not resumed
    log.info("run %s: accuracy %.3f ± %.3f, %.3g training FLOPs, %.1f s", tracker.run_id,
             summary.get("accuracy", float("nan")), summary.get("accuracy_stderr", float("nan")),
             summary["train_flops"], train_time)
    return summary


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
