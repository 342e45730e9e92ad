"""Tokenizer and teacher/student models: embedded ones built (and prepared) in code, or pretrained
ones loaded with transformers by hub id or local path.

Embedded models are real ``Qwen3ForCausalLM`` checkpoints. The teacher is trained on full traces;
the student starts from a *base* checkpoint trained on short problems only, so, like a base LLM, it
already knows how a trace ends before KD shows it (possibly truncated) long ones. Both are cached
under ``cache_dir`` keyed by a hash of everything that defines them, behind a file lock, so parallel
grid points build each one once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from kd_sweeps.schema import EvalConfig, LossConfig, TrainConfig

log = logging.getLogger(__name__)

TASK_VERSION = "digit-v3"  # bump when the embedded task's text format changes: invalidates caches


@dataclass
class PreparedModel:
    model: Optional[torch.nn.Module]  # None: a teacher whose top-k cache stands in for its weights
    path: str
    info: dict  # for embedded models: held-out accuracy and preparation cost
    rows: Optional[int] = None  # output-layer rows, when the weights were not loaded


def spec_dict(spec) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(spec, resolve=True) if not isinstance(spec, dict) else dict(spec)


def resolved_spec(spec: dict, device=None) -> dict:
    """``spec`` with ``prep_precision`` resolved for ``device`` (default: the one train.device=auto
    picks): a model prepared in fp32 is not the one prepared in bf16, so each has its own cache key."""
    from kd_sweeps import precision

    device = precision.default_device() if device is None else device
    return {**spec, "prep_precision": precision.resolve(spec.get("prep_precision", "auto"), device)}


def embedded_key(spec: dict, role: str, device=None) -> str:
    """A short hash of what defines an embedded model (its spec with the precision it is prepared in,
    role, task and tokenizer version)."""
    payload = json.dumps({"spec": resolved_spec(spec, device), "role": role, "task": TASK_VERSION}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def qwen3_config(spec: dict, tokenizer):
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=spec["hidden"], intermediate_size=4 * spec["hidden"],
        num_hidden_layers=spec["layers"], num_attention_heads=spec["heads"],
        num_key_value_heads=spec["heads"], head_dim=spec["hidden"] // spec["heads"],
        max_position_embeddings=1024, tie_word_embeddings=True, rope_theta=10000.0,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
    )


def embedded_tokenizer(cache_dir: Path):
    from transformers import AutoTokenizer

    from kd_sweeps.tokenizer import build_tokenizer

    return _cached_or_built(cache_dir / f"tokenizer-{TASK_VERSION}", "tokenizer.json", AutoTokenizer.from_pretrained,
                            lambda tmp: build_tokenizer().save_pretrained(tmp))


def _lock(path: Path):
    from filelock import FileLock

    path.parent.mkdir(parents=True, exist_ok=True)
    # flock(2): the kernel releases it when its holder dies, so a killed build never blocks the next one.
    return FileLock(str(path) + ".lock")


def _cached_or_built(path: Path, marker: str, load, build):
    """Under the lock of ``path``: ``load(path)`` if the cache folder is complete (``marker`` exists) and
    readable; otherwise ``build(tmp)`` into a temporary folder, swap it in whole, and load that."""
    with _lock(path):
        if (path / marker).exists():
            try:
                return load(path)
            except Exception as err:  # truncated or corrupted files: the cache is rebuilt, not trusted
                log.warning("cache %s is damaged (%s: %s); rebuilding it", path, type(err).__name__, err)
        for stale in path.parent.glob(path.name + ".tmp*"):  # a build that died; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        build(tmp)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)  # appears complete or not at all
        return load(path)


def prepare_embedded(spec: dict, role: str, tokenizer, cache_dir: Path, attn: str, device) -> PreparedModel:
    """Load the cached embedded model, or build, train and evaluate it first (once, under a lock)."""
    from transformers import Qwen3ForCausalLM

    spec = resolved_spec(spec, device)
    path = cache_dir / f"{role}-{embedded_key(spec, role)}"

    def build(tmp: Path) -> None:
        started = time.perf_counter()
        model = Qwen3ForCausalLM._from_config(qwen3_config(spec, tokenizer), attn_implementation=attn)
        info = _prepare(model, spec, role, tokenizer, device, path)
        info["prep_time_s"] = time.perf_counter() - started
        info["built_by_pid"] = os.getpid()
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "prep.json").write_text(json.dumps(info, indent=2))
        log.info("prepared embedded %s in %.0f s: held-out accuracy %.3f", role, info["prep_time_s"], info["accuracy"])

    def load(folder: Path) -> tuple:
        info = json.loads((folder / "prep.json").read_text())
        return Qwen3ForCausalLM.from_pretrained(folder, attn_implementation=attn), info

    model, info = _cached_or_built(path, "prep.json", load, build)
    return PreparedModel(model.to(device), str(path), info)


def _prepare(model, spec: dict, role: str, tokenizer, device, cached_at: Path) -> dict:
    """CE training on the embedded task (problems of prep_min..prep_max steps), then held-out accuracy
    on the full range of problem lengths. ``spec`` has its precision resolved."""
    from kd_sweeps import data, evaluate, train
    from kd_sweeps.synthetic import make_split

    model.to(device)
    seed = int(embedded_key(spec, role), 16) % (2**31)
    records = make_split(spec["prep_examples"], seed, spec["prep_min_steps"], spec["prep_max_steps"], "prep")
    encoded, _ = data.encode(records, tokenizer, max_tokens=10**6)
    examples, _ = data.training_examples(encoded, ("P", "CoT", "A"), 1.0, "lead", False, seed)
    settings = TrainConfig(max_steps=spec["prep_steps"], batch_size=spec["prep_batch_size"], lr=spec["prep_lr"],
                           weight_decay=0.01, warmup_ratio=0.05, precision=spec["prep_precision"])
    if spec["prep_steps"] > 0:
        _announce(model, spec, role, examples, tokenizer.pad_token_id, device, cached_at)
        train.train_loop(model, None, examples, tokenizer.pad_token_id, settings, LossConfig(kd_ratio=0.0),
                         device, desc=f"prepare {role}", seed=seed)
    # Held-out combinations of every length 2..12 (the sweep's test split), in a fixed order.
    heldout = make_split(spec["prep_eval_problems"], 123_456, 2, 12, split="test")
    result = evaluate.evaluate(model, tokenizer, heldout, EvalConfig(), device)  # greedy, 256 new tokens
    return {"role": role, "accuracy": result.accuracy, "stderr": result.stderr, "n": result.n,
            "spec": spec, "params": sum(p.numel() for p in model.parameters())}


_PURPOSE = {"teacher": "the teacher every grid point distils from",
            "base": "the base checkpoint every grid point's student starts from"}


def _announce(model, spec: dict, role: str, examples, pad_id: int, device, cached_at: Path) -> None:
    """Before a one-time preparation: a log line saying what is prepared, why, where it is cached and
    about how long it takes here (from a training step timed now: machines differ by 4x and more)."""
    from kd_sweeps.train import format_duration

    per_step = _seconds_per_step(model, examples[:spec["prep_batch_size"]], pad_id, spec["prep_precision"] == "bf16",
                                 device)
    log.info("preparing the embedded %s model (%d layers, hidden %d; %d CE steps of %d sequences in %s), "
             "%s: not in the cache yet, so it is built once and reused from %s. About %s on this machine "
             "(%.0f ms per step, timed now), plus a held-out evaluation",
             role, spec["layers"], spec["hidden"], spec["prep_steps"], spec["prep_batch_size"],
             spec["prep_precision"], _PURPOSE.get(role, role), cached_at,
             format_duration(per_step * spec["prep_steps"]), 1000 * per_step)


def _seconds_per_step(model, examples, pad_id: int, autocast: bool, device) -> float:
    """Seconds of one forward + backward over ``examples`` (the faster of two runs: the first pays
    one-time costs). The gradients are dropped: nothing of the measurement reaches training."""
    from kd_sweeps import batch_loss, data

    batch = {k: v.to(device) for k, v in data.collate(examples, pad_id).items()}
    n_supervised = sum(e.n_supervised for e in examples)
    times = []
    for _ in range(2):
        started = time.perf_counter()
        scaled, _, _ = batch_loss.step_losses(model, None, batch, n_supervised, LossConfig(kd_ratio=0.0), autocast)
        scaled.backward()
        times.append(time.perf_counter() - started)
    model.zero_grad(set_to_none=True)
    return min(times)


class ModelError(ValueError):
    """A model or tokenizer that cannot be used, named with its config key and path."""


def _from_pretrained(loader, key: str, name_or_path: str, **kwargs):
    """``loader.from_pretrained``, failing with the config key, the path and what to check."""
    try:
        return loader.from_pretrained(name_or_path, **kwargs)
    except Exception as err:
        raise ModelError(f"{key}={name_or_path!r} could not be loaded ({type(err).__name__}: {err}); check that "
                         "the folder holds complete files (config.json, *.safetensors, tokenizer files; save them "
                         "again with save_pretrained) or, for a hub id, that it is spelled right and reachable "
                         "(HF_HUB_OFFLINE=1 reads only the local HF cache)") from err


def load_pretrained(name_or_path: str, attn: str, trust_remote_code: bool, dtype, device,
                    key: str = "model.name_or_path") -> PreparedModel:
    from transformers import AutoModelForCausalLM

    model = _from_pretrained(AutoModelForCausalLM, key, name_or_path, attn_implementation=attn,
                             trust_remote_code=trust_remote_code, dtype=dtype)
    return PreparedModel(model.to(device), name_or_path, {})


def load_tokenizer(cfg, cache_dir: Path):
    """The student's tokenizer (its chat template renders every sequence)."""
    student = cfg.model.student
    if student.source == "embedded":
        return embedded_tokenizer(cache_dir)
    from transformers import AutoTokenizer

    return _from_pretrained(AutoTokenizer, "model.student.name_or_path", student.name_or_path,
                            trust_remote_code=cfg.model.trust_remote_code)


def _check_head_rows(cfg, rows: dict, real: int) -> None:
    """From the configs alone: an output layer needs a row for every id of the shared tokenizer
    (rows past it are padding, and allowed)."""
    short = {role: n for role, n in rows.items() if n is not None and n < real}
    if short:
        raise ModelError("; ".join(f"model.{role} ({cfg.model[role].name_or_path!r}) has an output layer of {n} "
                                   f"rows, fewer than the {real} token ids of its tokenizer" for role, n in short.items())
                         + ": KD compares distributions over the same tokens; choose a checkpoint whose config "
                         "vocab_size covers its tokenizer")


def planned_rows(cfg, role: str, tokenizer):
    """A model's vocabulary size from its config alone (no weights loaded); None if it does not say."""
    spec = cfg.model[role]
    if spec.source == "embedded":
        return len(tokenizer)
    from transformers import AutoConfig

    config = _from_pretrained(AutoConfig, f"model.{role}.name_or_path", spec.name_or_path,
                              trust_remote_code=cfg.model.trust_remote_code)
    return getattr(config.get_text_config(), "vocab_size", None)


def teacher_without_weights(cfg, tokenizer) -> Optional[PreparedModel]:
    """The teacher's identity (path, preparation record, output rows) read from files alone, for a
    point whose teacher top-k cache is built already; None when that needs the weights (an
    embedded teacher not prepared yet, a config that does not give its vocabulary size)."""
    spec = cfg.model.teacher
    if spec.source == "embedded":
        from kd_sweeps.precision import default_device

        key = embedded_key(spec_dict(spec), "teacher", default_device(cfg.train.device))
        path = Path(cfg.cache_dir).expanduser() / f"teacher-{key}"
        if not (path / "prep.json").exists():
            return None
        return PreparedModel(None, str(path), json.loads((path / "prep.json").read_text()), len(tokenizer))
    rows = planned_rows(cfg, "teacher", tokenizer)
    return None if rows is None else PreparedModel(None, spec.name_or_path, {}, rows)


def output_rows(prepared: PreparedModel) -> int:
    if prepared.model is None:
        return prepared.rows
    return prepared.model.get_output_embeddings().weight.shape[0]


def load_pair(cfg, tokenizer, device, teacher: Optional[PreparedModel] = None) -> tuple[PreparedModel, PreparedModel]:
    """(teacher, student), teacher frozen. Embedded models are prepared on first use. A vocabulary
    mismatch is caught from the configs, before any weights are loaded or models prepared.
    ``teacher``: a stand-in from ``teacher_without_weights``, used instead of loading the teacher."""
    cache_dir = Path(cfg.cache_dir).expanduser()
    names = (_label(cfg.model.teacher), _label(cfg.model.student))
    teacher_tok = teacher_tokenizer(cfg, tokenizer)
    shared = check_tokenizers(teacher_tok, tokenizer, names)  # before minutes of loading weights
    _check_head_rows(cfg, {role: planned_rows(cfg, role, tokenizer) for role in ("teacher", "student")},
                     max(shared.values()) + 1 if shared else 0)
    loaded = {} if teacher is None else {"teacher": teacher}
    for role in [r for r in ("teacher", "student") if r not in loaded]:
        spec = cfg.model[role]
        if spec.source == "embedded":
            label = "teacher" if role == "teacher" else "base"
            loaded[role] = prepare_embedded(spec_dict(spec), label, tokenizer, cache_dir,
                                            cfg.model.attn_implementation, device)
        else:
            loaded[role] = load_pretrained(spec.name_or_path, cfg.model.attn_implementation,
                                           cfg.model.trust_remote_code, _load_dtype(cfg, role, device), device,
                                           key=f"model.{role}.name_or_path")
    if teacher is None:  # a stand-in's rows were checked from its config above
        loaded["teacher"].model.requires_grad_(False)
        loaded["teacher"].model.eval()
        check_vocabularies(teacher_tok, tokenizer, loaded["teacher"].model, loaded["student"].model, names)
    return loaded["teacher"], loaded["student"]


def _load_dtype(cfg, role: str, device) -> torch.dtype:
    """The student is trained: its master weights (and so AdamW's state) are fp32 whatever the
    compute precision, since a bf16 copy rounds fine-tuning updates away. The frozen teacher only
    computes: bf16 when the run computes in bf16 (half the memory), fp32 otherwise."""
    from kd_sweeps.precision import resolve

    if role == "student":
        return torch.float32
    return torch.bfloat16 if resolve(cfg.train.precision, device) == "bf16" else torch.float32


def _label(spec) -> str:
    return f"{spec.source} model {spec.name_or_path}"


def teacher_tokenizer(cfg, student_tokenizer):
    """The teacher's own tokenizer: the embedded pair shares one; a pretrained teacher has its own."""
    teacher, student = cfg.model.teacher, cfg.model.student
    if teacher.source == "embedded" and student.source == "embedded":
        return student_tokenizer
    if teacher.source == "embedded":
        return embedded_tokenizer(Path(cfg.cache_dir).expanduser())
    if student.source == "pretrained" and teacher.name_or_path == student.name_or_path:
        return student_tokenizer
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(teacher.name_or_path, trust_remote_code=cfg.model.trust_remote_code)


def kd_vocab_size(teacher, student) -> int:
    """Columns of the logits KD compares: the shared first min(V_teacher, V_student). Output layers
    are often padded past the real vocabulary (Qwen3: 151,669 tokens, 151,936 rows); once
    ``check_vocabularies`` has passed, the rows past the smaller head are padding in both."""
    return min(teacher.get_output_embeddings().weight.shape[0], student.get_output_embeddings().weight.shape[0])


def check_vocabularies(teacher_tok, student_tok, teacher, student, names=("teacher", "student")) -> int:
    """KD compares the two models' distributions token by token, so both must map every token to the
    same id; their output layers may differ only in padding rows past the real vocabulary. Returns
    ``kd_vocab_size``; raises ValueError naming both models otherwise."""
    s_vocab = check_tokenizers(teacher_tok, student_tok, names)
    real = max(s_vocab.values()) + 1 if s_vocab else 0
    heads = [(f"teacher {names[0]}", teacher.get_output_embeddings().weight.shape[0]),
             (f"student {names[1]}", student.get_output_embeddings().weight.shape[0])]
    short = [f"{name} ({rows} rows)" for name, rows in heads if rows < real]
    if short:
        raise ValueError(f"the output layer of {' and '.join(short)} has fewer rows than the shared "
                         f"vocabulary's {real} token ids")
    return kd_vocab_size(teacher, student)


def check_tokenizers(teacher_tok, student_tok, names=("teacher", "student")) -> dict:
    """Raise ValueError unless both tokenizers map every token to the same id; returns the map."""
    t_vocab, s_vocab = teacher_tok.get_vocab(), student_tok.get_vocab()
    if t_vocab != s_vocab:
        differing = sorted((tok for tok in t_vocab.keys() | s_vocab.keys() if t_vocab.get(tok) != s_vocab.get(tok)),
                           key=lambda tok: min(t_vocab.get(tok, 1 << 62), s_vocab.get(tok, 1 << 62)))
        shown = ", ".join(f"{tok!r} (teacher id {t_vocab.get(tok, 'absent')}, student id {s_vocab.get(tok, 'absent')})"
                          for tok in differing[:5])
        raise ValueError(f"teacher {names[0]} ({len(t_vocab)} tokens) and student {names[1]} ({len(s_vocab)} "
                         f"tokens) have different vocabularies: {len(differing)} tokens differ, the first: "
                         f"{shown}. KD compares distributions over the same tokens: pick a pair that shares "
                         f"its tokenizer")
    return s_vocab
