"""The plan as a table (one row per point, totals, then what it assumed) and as CSV."""

from __future__ import annotations

import csv
from pathlib import Path

from kd_sweeps.plan_distill import describe as describe_generation
from kd_sweeps.plan_eval import duration
from kd_sweeps.plan_lengths import CHARS_PER_TOKEN

CSV_COLUMNS = ["index", "overrides", "train_tokens", "supervised_tokens", "train_flops", "generation_flops",
               "peak_memory_bytes", "memory_per_rank_bytes", "processes", "tokens_exact", "lengths", "train_seconds", "eval_problems",
               "eval_completions", "eval_tokens_per_completion", "eval_tokens", "eval_flops", "eval_seconds",
               "eval_time_limit_s", "train_gpu_hours", "eval_gpu_hours", "done", "verdict", "folder", "problems",
               "warnings"]


def _count(x: float | None) -> str:
    if x is None:
        return "-"
    for unit, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= size:
            return f"{x / size:.3g}{unit}"
    return f"{x:.3g}"


def _gib(x: float | None) -> str:
    return "-" if x is None else f"{x / 2**30:.3g} GiB"


def _hours(x: float | None) -> str:
    return "-" if x is None else "0" if x == 0 else "<0.01" if x < 0.01 else f"{x:.3g}" if x < 100 else f"{x:,.0f}"


def _ranges(indices: list[int]) -> str:
    """0,1,2,5 -> "0-2, 5"."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _flops(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def _row(p, shared: list[str], generation: bool) -> list[str]:
    ev, fit = p.eval, p.fit
    return [str(p.index), " ".join(o for o in p.overrides if o not in shared) or "(defaults)",
            p.lengths or "-", _count(p.tokens) + ("" if p.exact_tokens or p.tokens is None else "~"),
            _count(p.supervised), _flops(p.flops), *([_flops(p.generation_flops)] if generation else []),
            str(p.processes), _gib(p.memory_per_rank), duration(fit and fit.train_seconds),
            "-" if ev is None else f"{ev.completions:,} x {ev.tokens_per_completion:,}", _count(ev and ev.tokens),
            duration(ev and ev.seconds) + ("!" if p.warnings else ""),
            "-" if ev is None else "none" if ev.limit_s is None else duration(ev.limit_s),
            _hours(fit and fit.train_gpu_hours), _hours(fit and fit.eval_gpu_hours), p.done or "-",
            "-" if fit is None else fit.verdict]


def _table(plan) -> list[str]:
    shared = [o for o in plan.points[0].overrides if all(o in p.overrides for p in plan.points)] \
        if len(plan.points) > 1 else []
    # distill.mode on_policy / sequence: the generation's FLOPs, in the training time and GPU-hours.
    generation = any(p.generation_flops for p in plan.points)
    rows = [["#", "overrides", "lengths", "train tokens", "supervised", "train FLOPs",
             *(["gen FLOPs"] if generation else []), "procs", "memory/rank",
             "train time", "eval completions x tokens", "eval tokens", "eval time", "eval limit",
             "GPU-h train", "GPU-h eval", "done", "verdict"]]
    rows += [_row(p, shared, generation) for p in plan.points]
    memories = [p.memory_per_rank for p in plan.points if p.memory_per_rank is not None]
    done = sum(1 for p in plan.points if p.done == "done")
    fits = sum(1 for p in plan.points if p.fit is not None and p.fit.fits)
    rows.append(["", f"total ({len(plan.points)} points)", "", _count(plan.total("tokens")),
                 _count(plan.total("supervised")), f"{plan.total('flops'):.3g}",
                 *([f"{plan.generation_total():.3g}"] if generation else []), "",
                 f"max {_gib(max(memories))}" if memories else "-", "",
                 f"{plan.eval_total('completions'):,.0f}", _count(plan.eval_total("tokens")),
                 duration(plan.eval_total("seconds")), "",
                 f"{_hours(plan.gpu_hours('train'))} (left {_hours(plan.gpu_hours('train', True))})",
                 f"{_hours(plan.gpu_hours('eval'))} (left {_hours(plan.gpu_hours('eval', True))})",
                 f"{done} done", f"{fits} of {len(plan.points)} fit"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    left = {1, len(widths) - 1}
    lines = ["  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
             for r in rows]
    rule = "-" * max(len(line) for line in lines)
    lines.insert(1, rule)
    lines.insert(len(lines) - 1, rule)
    if shared:
        lines.insert(0, f"every point: {' '.join(shared)}")
    return lines


def _notes(plan) -> list[str]:
    notes = []
    by_source: dict[tuple[str, str], list[int]] = {}
    for p in plan.points:
        if p.lengths:
            by_source.setdefault((p.lengths, p.lengths_detail), []).append(p.index)
    for (source, detail), indices in by_source.items():
        where = f"point{'s' if len(indices) > 1 else ''} {_ranges(indices)}"
        if source == "assumed":
            notes.append(f"lengths, {where}: ASSUMED, not measured ({detail}); every sequence that long, memory "
                         "sized for one of data.max_tokens tokens. Exact lengths: run this plan once where the "
                         "data and the student's tokenizer can be read (they are measured and cached for later "
                         "plans), or pass --lengths P,COT,A")
        elif source == "characters":
            notes.append(f"lengths, {where}: estimated from characters ({CHARS_PER_TOKEN} per token; "
                         f"{detail or 'the student tokenizer is not at hand'}); counts marked ~")
        else:
            notes.append(f"lengths, {where}: tokenized with the student's tokenizer{f' ({detail})' if detail else ''}")
    notes.append("memory/rank: 1 process: everything in it, no sharding, all activations and full logits kept "
                 "(plan_memory.peak_memory_bytes, an upper bound); N processes: FSDP2 sharding of the student, "
                 "teacher per train.teacher_parallel, train.activation_checkpointing and train.loss_impl as set "
                 "(plan_memory.memory_per_rank, the table of benchmarks/memory_per_rank.py)")
    notes.append(plan.hardware.describe())
    generation = describe_generation([p.generation for p in plan.points])
    if generation:
        notes.append(generation)
    if any(p.fit is not None and "requeue" in p.fit.verdict for p in plan.points):
        notes.append("requeues: a Slurm point past hydra.launcher.timeout_min is requeued up to "
                     "hydra.launcher.max_num_timeout times and resumes from the state it saved on the warning "
                     "signal (an evaluation job: submitit's 3 requeues, resuming per problem); \"fits with K "
                     "requeues\" finishes, \"no: ... (requeues: N)\" does not even with N")
    done = [p for p in plan.points if p.done]
    folders = [p.folder for p in plan.points if p.folder is not None]
    looked = f"{folders[0].parent}/<point id>/result.json" if folders else "the point folders (not resolvable here)"
    notes.append(f"done: {sum(p.done == 'done' for p in done)} point(s) with status ok in {looked}"
                 + (f", {sum(p.done == 'trained' for p in done)} trained with evaluation pending" if
                    any(p.done == "trained" for p in done) else "")
                 + "; GPU-hours 'left' leave out what is done")
    if any(p.warnings for p in plan.points):
        notes.append("! the evaluation does not fit its job's time limit (warnings below)")
    notes.append(plan.assumptions.describe())
    return notes


def format_plan(plan) -> str:
    """One row per point (the overrides every point shares are printed once, above), totals, notes."""
    return "\n".join(_table(plan) + _notes(plan))


def write_csv(plan, path: Path) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS)
        for p in plan.points:
            ev = [None] * 7 if p.eval is None else [
                p.eval.problems, p.eval.completions, p.eval.tokens_per_completion, p.eval.tokens,
                p.eval.flops, p.eval.seconds, p.eval.limit_s]
            fit = [None] * 2 if p.fit is None else [p.fit.train_gpu_hours, p.fit.eval_gpu_hours]
            writer.writerow([p.index, " ".join(p.overrides), p.tokens, p.supervised, p.flops, p.generation_flops,
                             p.peak_memory, p.memory_per_rank, p.processes, p.exact_tokens, p.lengths,
                             None if p.fit is None else p.fit.train_seconds, *ev, *fit, p.done == "done",
                             None if p.fit is None else p.fit.verdict, p.folder, " | ".join(p.problems),
                             " | ".join(p.warnings)])
