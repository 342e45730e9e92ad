"""Check a composed config before any model or data is touched: collect every problem, raise once.

Each message names the key, the bad value and what is allowed, so a sweep of hundreds of points
fails in a second at launch instead of minutes into one job. Closed choices (``kd_sweeps.choices``)
are not checked here: the schema types those keys, and OmegaConf refuses another value when Hydra
composes the config, before this runs. What is left: ranges, registries and combinations.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from kd_sweeps.benchmarks import BENCHMARKS as HUB_BENCHMARKS
from kd_sweeps.sources import DATASETS
from kd_sweeps.redact import redact_text
from kd_sweeps.sections import SECTION_PRESETS, SECTIONS


class ConfigError(ValueError):
    """Every problem found in one config, one per line."""


def _choice(issues: list[str], key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        issues.append(f"{key}={value!r}: must be one of {', '.join(map(str, allowed))}")


def _positive(issues: list[str], key: str, value: Any, strict: bool = True) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (value <= 0 if strict else value < 0):
        issues.append(f"{key}={value!r}: must be {'> 0' if strict else '>= 0'}")


def _unit_interval(issues: list[str], key: str, value: Any, open_left: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value > 1 or (value <= 0 if open_left else value < 0):
        allowed = "in (0, 1]" if open_left else "in [0, 1]"
        issues.append(f"{key}={value!r}: must be {allowed}")


def _check_sections(cfg: DictConfig, issues: list[str]) -> None:
    include = [str(s) for s in cfg.sections.include]
    if not include:
        issues.append(f"sections.include=[]: choose at least one of {', '.join(SECTIONS)}")
    name = cfg.sections.name
    if name in SECTION_PRESETS and sorted(include) != sorted(SECTION_PRESETS[name]):
        issues.append(f"sections.name={name!r} but sections.include={include}: preset {name!r} is "
                      f"{list(SECTION_PRESETS[name])}; set sections.name=custom for other lists")


def _check_models(cfg: DictConfig, issues: list[str]) -> None:
    for role in ("teacher", "student"):
        spec = cfg.model[role]
        key = f"model.{role}"
        if spec.source == "embedded":
            for field in ("layers", "hidden", "heads", "prep_batch_size", "prep_examples", "prep_eval_problems"):
                _positive(issues, f"{key}.{field}", spec[field])
            _positive(issues, f"{key}.prep_steps", spec.prep_steps, strict=False)
            _positive(issues, f"{key}.prep_lr", spec.prep_lr)
            if isinstance(spec.hidden, int) and isinstance(spec.heads, int) and spec.heads > 0 \
                    and spec.hidden % spec.heads:
                issues.append(f"{key}.hidden={spec.hidden}: must be divisible by {key}.heads={spec.heads}")
            if not 1 <= spec.prep_min_steps <= spec.prep_max_steps <= 12:
                issues.append(f"{key}.prep_min_steps/prep_max_steps={spec.prep_min_steps}/"
                              f"{spec.prep_max_steps}: need 1 <= min <= max <= 12")


def _check_data(cfg: DictConfig, issues: list[str]) -> None:
    data = cfg.data
    for field in ("n_test", "max_tokens"):
        _positive(issues, f"data.{field}", data[field])
    for field in ("n_train", "n_val"):
        if data[field] is not None:
            _positive(issues, f"data.{field}", data[field])
    if data.source == "synthetic" and not 1 <= data.min_steps <= data.max_steps <= 12:
        issues.append(f"data.min_steps/max_steps={data.min_steps}/{data.max_steps}: "
                      "need 1 <= min <= max <= 12")
    if data.source in ("json", "path") and not data.path:
        issues.append(f"data.path='': a {data.source} source needs a local file or folder")
    if data.source == "hub" and not data.path and data.name not in DATASETS:
        issues.append(f"data.name={data.name!r} with data.path='': name a dataset "
                      f"({', '.join(DATASETS)}) or give its hub id in data.path")
    _check_rows(data, issues)


def _check_rows(data: DictConfig, issues: list[str]) -> None:
    """data.rows and data.num_proc; the authors' lists exist for three datasets and hold fixed counts."""
    from kd_sweeps.prepare import PAPER_COUNTS

    _positive(issues, "data.num_proc", data.num_proc, strict=False)
    if data.rows != "paper":
        return
    if data.source == "synthetic":
        issues.append("data.rows=paper: the embedded task has no published rows; data.rows=paper selects the "
                      f"authors' rows of {', '.join(PAPER_COUNTS)}")
    elif data.name not in PAPER_COUNTS:
        issues.append(f"data.rows=paper with data.name={data.name!r}: the authors published row lists only for "
                      f"{', '.join(PAPER_COUNTS)} (a local copy needs data.name set to the dataset it copies); "
                      "use data.rows=length")
    elif all(isinstance(data[k], int) for k in ("n_train", "n_val")) \
            and data.n_train + data.n_val > PAPER_COUNTS[data.name]:
        issues.append(f"data.n_train={data.n_train} + data.n_val={data.n_val}: more than the "
                      f"{PAPER_COUNTS[data.name]} rows of the authors' list for {data.name} (data.rows=paper)")


def _check_train_recipe(cfg: DictConfig, issues: list[str]) -> None:
    """Length of the run, batch split, optimizer, schedule and loss weighting."""
    train = cfg.train
    if train.max_steps is None and train.epochs is None:
        issues.append("train.max_steps=None and train.epochs=None: set one (max_steps wins when both are set)")
    for field in ("max_steps", "epochs", "micro_batch_size"):
        if train[field] is not None:
            _positive(issues, f"train.{field}", train[field])
    micro = train.micro_batch_size
    if isinstance(micro, int) and micro > 0 and isinstance(train.batch_size, int) and train.batch_size % micro:
        issues.append(f"train.micro_batch_size={micro}: must divide train.batch_size={train.batch_size} "
                      "(each process's share of it is split into micro-batches)")
    betas = list(train.betas)
    if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
        issues.append(f"train.betas={betas}: must be two numbers in [0, 1), e.g. [0.9, 0.999]")
    _unit_interval(issues, "train.warmup_ratio", train.warmup_ratio)
    if train.schedule == "onecycle":
        if train.warmup_ratio == 1:  # OneCycleLR's annealing phase would be empty: a division by zero
            issues.append("train.warmup_ratio=1.0 with train.schedule=onecycle: must be < 1 (no step would anneal)")
        for field in ("div_factor", "final_div_factor"):
            _positive(issues, f"train.{field}", train[field])


def _check_train_eval(cfg: DictConfig, issues: list[str]) -> None:
    train = cfg.train
    _check_train_recipe(cfg, issues)
    for field in ("batch_size", "lr", "log_every"):
        _positive(issues, f"train.{field}", train[field])
    _positive(issues, "train.weight_decay", train.weight_decay, strict=False)
    _positive(issues, "train.grad_clip", train.grad_clip, strict=False)
    _positive(issues, "train.num_threads", train.num_threads, strict=False)
    _positive(issues, "train.checkpoint_every", train.checkpoint_every, strict=False)
    if train.teacher_cache == "topk":
        from kd_sweeps.teacher_cache import SUPPORTED_MODES

        _positive(issues, "train.teacher_topk", train.teacher_topk)
        _choice(issues, "truncation.mode (with train.teacher_cache=topk)", cfg.truncation.mode, SUPPORTED_MODES)
        if train.loss_impl != "chunked":
            issues.append("train.teacher_cache=topk needs train.loss_impl=chunked")
    _positive(issues, "train.val_every", train.val_every, strict=False)
    ev = cfg.eval
    for field in ("n_problems", "max_new_tokens", "batch_size", "n_samples"):
        _positive(issues, f"eval.{field}", ev[field])
    for field in ("timeout_min", "cpus_per_task", "mem_gb"):
        _positive(issues, f"eval.job.{field}", ev.job[field])
    if ev.job.gpus_per_node is not None:
        _positive(issues, "eval.job.gpus_per_node", ev.job.gpus_per_node, strict=False)
    _positive(issues, "eval.temperature", ev.temperature, strict=False)
    _unit_interval(issues, "eval.top_p", ev.top_p, open_left=True)
    if not isinstance(ev.top_k, int) or isinstance(ev.top_k, bool) or ev.top_k < 0:
        issues.append(f"eval.top_k={ev.top_k!r}: must be an integer >= 0 (0 = off)")
    if ev.engine == "vllm" and not vllm_installed():
        issues.append("eval.engine='vllm': vllm is not installed; install the optional extra "
                      "(pip install '.[vllm]', on a CUDA machine) or use eval.engine=transformers or auto")
    if not list(ev.benchmarks):
        issues.append("eval.benchmarks=[]: list at least one benchmark")
    for bench in ev.benchmarks:
        _choice(issues, "eval.benchmarks[]", bench, ("synthetic", *HUB_BENCHMARKS))
    if "synthetic" in ev.benchmarks and cfg.data.source != "synthetic":
        issues.append("eval.benchmarks contains 'synthetic', the embedded task's held-out split, but "
                      f"data.source={cfg.data.source!r}: evaluate on aime24, math500, ... instead")


def _looks_local(name_or_path: str) -> bool:
    """A hub id is ``name`` or ``org/name``; anything absolute, relative-dotted or deeper is a path."""
    return name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1 \
        or Path(name_or_path).expanduser().exists()


def _check_model_folder(issues: list[str], key: str, name_or_path: str) -> None:
    folder = Path(name_or_path).expanduser()
    if not folder.exists():
        issues.append(f"{key}={name_or_path!r}: no such folder; give a local model folder "
                      "(save_pretrained) or a hub id such as Qwen/Qwen3-8B")
    elif not folder.is_dir():
        issues.append(f"{key}={name_or_path!r}: is a file; give the folder that holds it with "
                      "config.json (save_pretrained writes both)")
    elif not (folder / "config.json").is_file():
        issues.append(f"{key}={name_or_path!r}: no config.json in the folder; save the model with save_pretrained")
    else:  # a folder with config.json only is fine here: a plan needs no weights
        readable = [*folder.glob("*.safetensors"), *folder.glob("*.safetensors.index.json"),
                    *folder.glob("pytorch_model*.bin")]
        foreign = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        if foreign and not readable:
            issues.append(f"{key}={name_or_path!r}: no *.safetensors weights (found {foreign}); "
                          "load it and save it again with save_pretrained, which writes safetensors")


def _writable_dir(issues: list[str], key: str, value: str) -> None:
    """The folder, or the nearest part of it that exists, must be a writable directory."""
    path = Path(value).expanduser().absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        issues.append(f"{key}={value!r}: {existing} is a file, not a folder; choose another {key}")
    elif not os.access(existing, os.W_OK | os.X_OK):
        issues.append(f"{key}={value!r}: {existing} is not writable; choose another {key}")


SWEEP_NAME_MAX = 100  # characters: a folder name, a W&B group and a table title, not a text


def sweep_name_problem(name: Any) -> str | None:
    """Why ``sweep`` cannot name a folder under multirun/ (None: it can). It becomes a path and a
    W&B group: path separators or ``..`` would put the sweep's folders outside multirun/."""
    name = str(name) if name is not None else ""
    if not name.strip():
        why = "is empty"
    elif len(name) > SWEEP_NAME_MAX:
        why = f"is {len(name)} characters long, more than {SWEEP_NAME_MAX}"
    elif "/" in name or "\\" in name or os.sep in name:
        why = "holds a path separator"
    elif ".." in name or name.startswith("."):
        why = "holds '..' or starts with '.'"
    elif not name.isprintable():
        why = "holds a non-printable character"
    elif redact_text(name) != name:  # it would become a folder name, a W&B group and a table title
        return ("sweep=<redacted>: looks like a secret (a token, or the value of a secret environment "
                "variable); a sweep is named by letters, digits and - _ + = , . e.g. sweep=trunc_study")
    else:
        return None
    shown = name if len(name) <= 40 else name[:40] + "…"
    return (f"sweep={shown!r}: {why}; a sweep is named by letters, digits and - _ + = , . "
            f"(at most {SWEEP_NAME_MAX} characters), e.g. sweep=trunc_study")


def check_topk(cfg: DictConfig, vocab: int) -> None:
    """train.teacher_topk against the tokenizer's vocabulary, known once the tokenizer is loaded
    and before the teacher is: a cache of more columns than there are tokens cannot be built."""
    if cfg.train.teacher_cache == "topk" and cfg.train.teacher_topk > vocab:
        raise ConfigError(f"train.teacher_topk={cfg.train.teacher_topk}: more than the {vocab} tokens of the "
                          f"vocabulary; choose at most {vocab}")


def sweep_name_resolver(name: Any) -> str:
    """OmegaConf resolver ``${kd_sweep_name:${sweep}}`` used by hydra.run.dir / hydra.sweep.dir:
    a bad name fails when Hydra first resolves the folder, before it creates anything."""
    problem = sweep_name_problem(name)
    if problem:
        raise ValueError(problem)
    return str(name)


def _check_paths(cfg: DictConfig, issues: list[str]) -> None:
    """Local models and benchmarks the point will read, and folders it will write: missing ones fail
    now, not after the models are loaded. (A missing data.path is the data loader's to report, first
    thing in a run: a plan stands in assumed lengths for it.)"""
    for role in ("teacher", "student"):
        spec = cfg.model[role]
        if spec.source == "pretrained" and _looks_local(spec.name_or_path):
            _check_model_folder(issues, f"model.{role}.name_or_path", spec.name_or_path)
    for bench, file in (cfg.eval.benchmark_paths or {}).items():
        if not Path(file).expanduser().is_file():
            issues.append(f"eval.benchmark_paths.{bench}={file!r}: no such file")
    _writable_dir(issues, "output_dir", cfg.output_dir)
    if sweep_name_problem(cfg.sweep):
        issues.append(sweep_name_problem(cfg.sweep))
    if "embedded" in (cfg.model.teacher.source, cfg.model.student.source) or cfg.train.teacher_cache != "none" \
            or cfg.data.source != "synthetic":  # a real dataset's formatted and tokenized rows are cached there
        _writable_dir(issues, "cache_dir", cfg.cache_dir)


def vllm_installed() -> bool:
    """Whether vllm can be imported, without importing it (that takes seconds and wants CUDA)."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def _check_distill(cfg: DictConfig, issues: list[str]) -> None:
    """distill.*: the mode, its sampling, and the combinations it refuses (docs/recipe.md)."""
    dist = cfg.distill
    _unit_interval(issues, "distill.lmbda", dist.lmbda)
    _positive(issues, "distill.temperature", dist.temperature, strict=False)
    _unit_interval(issues, "distill.top_p", dist.top_p, open_left=True)
    _positive(issues, "distill.top_k", dist.top_k, strict=False)
    _positive(issues, "distill.batch_size", dist.batch_size)
    if dist.max_new_tokens is not None:
        _positive(issues, "distill.max_new_tokens", dist.max_new_tokens)
    if dist.mode == "offline":
        return
    if cfg.train.teacher_cache != "none":  # the cache holds the dataset's sequences, not generated ones
        generated = "rollouts sampled each step" if dist.mode == "on_policy" else "the teacher's completions"
        issues.append(f"distill.mode={dist.mode} with train.teacher_cache={cfg.train.teacher_cache}: the top-k "
                      f"cache scores the dataset's traces, not {generated}; use train.teacher_cache=none")
    if dist.mode == "on_policy" and cfg.truncation.mode != "lead":
        issues.append(f"distill.mode=on_policy with truncation.mode={cfg.truncation.mode}: a rollout is cut by "
                      "its budget, the leading part (truncation.mode=lead); windows after token 0 have no rollout")


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError listing every problem in ``cfg`` (a composed, resolvable config)."""
    issues: list[str] = []
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except Exception as err:  # an unresolved interpolation or a MISSING value
        hint = ""
        if "'HOME' not found" in str(err):  # cache_dir's default is $KD_SWEEPS_CACHE, else $HOME/.cache
            hint = ("\ncache_dir: neither KD_SWEEPS_CACHE nor HOME is set; set KD_SWEEPS_CACHE=/a/writable/folder "
                    "(or HOME, or pass cache_dir=...)")
        raise ConfigError(f"config does not resolve: {err}{hint}") from err
    _unit_interval(issues, "trunc", cfg.trunc, open_left=True)
    _check_sections(cfg, issues)
    loss = cfg.loss
    _unit_interval(issues, "loss.kd_ratio", loss.kd_ratio)
    _positive(issues, "loss.temperature", loss.temperature)
    for key in ("beta", "alpha", "mix"):
        _unit_interval(issues, f"loss.{key}", loss[key])
    _check_models(cfg, issues)
    _check_data(cfg, issues)
    _check_train_eval(cfg, issues)
    _check_distill(cfg, issues)
    _check_paths(cfg, issues)
    if issues:
        raise ConfigError(f"{len(issues)} problem(s) in the config:\n  " + "\n  ".join(issues))
