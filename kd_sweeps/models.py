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
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

TASK_VERSION = "dial-v2"  # bump when the embedded task's text format changes: invalidates caches


@dataclass
class PreparedModel:
    model: torch.nn.Module
    path: str
    info: dict  # for embedded models: held-out accuracy and preparation cost


def spec_dict(spec) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(spec, resolve=True) if not isinstance(spec, dict) else dict(spec)


def embedded_key(spec: dict, role: str) -> str:
    """A short hash of what defines an embedded model (its spec, role, task and tokenizer version)."""
    payload = json.dumps({"spec": spec, "role": role, "task": TASK_VERSION}, sort_keys=True)
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
    from kd_sweeps.tokenizer import load_or_build_tokenizer

    path = cache_dir / f"tokenizer-{TASK_VERSION}"
    with _lock(path):
        if not (path / "tokenizer.json").exists():
            tmp = path.with_name(path.name + f".tmp{os.getpid()}")
            from kd_sweeps.tokenizer import build_tokenizer

            build_tokenizer().save_pretrained(tmp)
            os.replace(tmp, path)
    return load_or_build_tokenizer(path)


def _lock(path: Path):
    from filelock import FileLock

    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path) + ".lock")


def prepare_embedded(spec: dict, role: str, tokenizer, cache_dir: Path, attn: str, device) -> PreparedModel:
    """Load the cached embedded model, or build, train and evaluate it first (once, under a lock)."""
    from transformers import Qwen3ForCausalLM

    path = cache_dir / f"{role}-{embedded_key(spec, role)}"
    with _lock(path):
        if not (path / "prep.json").exists():
            started = time.perf_counter()
            model = Qwen3ForCausalLM._from_config(qwen3_config(spec, tokenizer), attn_implementation=attn)
            info = _prepare(model, spec, role, tokenizer, device)
            info["prep_time_s"] = time.perf_counter() - started
            info["built_by_pid"] = os.getpid()
            tmp = path.with_name(path.name + f".tmp{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / "prep.json").write_text(json.dumps(info, indent=2))
            shutil.rmtree(path, ignore_errors=True)
            os.replace(tmp, path)  # appears complete or not at all
            log.info("prepared embedded %s in %.0f s: held-out accuracy %.3f", role,
                     info["prep_time_s"], info["accuracy"])
    model = Qwen3ForCausalLM.from_pretrained(path, attn_implementation=attn).to(device)
    return PreparedModel(model, str(path), json.loads((path / "prep.json").read_text()))


def _prepare(model, spec: dict, role: str, tokenizer, device) -> dict:
    """CE training on the embedded task (problems of prep_min..prep_max steps), then held-out accuracy
    on the full range of problem lengths."""
    from kd_sweeps import data, evaluate, train
    from kd_sweeps.synthetic import make_split

    model.to(device)
    seed = int(embedded_key(spec, role), 16) % (2**31)
    records = make_split(spec["prep_examples"], seed, spec["prep_min_steps"], spec["prep_max_steps"], "prep")
    encoded, _ = data.encode(records, tokenizer, max_tokens=10**6)
    examples, _ = data.training_examples(encoded, ("P", "CoT", "A"), 1.0, "lead", False, seed)
    settings = train.LoopSettings(max_steps=spec["prep_steps"], batch_size=spec["prep_batch_size"],
                                  lr=spec["prep_lr"], weight_decay=0.01, warmup_ratio=0.05,
                                  precision=spec.get("prep_precision", "bf16"), seed=seed)
    if spec["prep_steps"] > 0:
        train.train_loop(model, None, examples, tokenizer.pad_token_id, settings, train.LossSettings(kd_ratio=0.0),
                         device, desc=f"prepare {role}")
    # Held-out combinations of every length 2..12 (the sweep's test split), in a fixed order.
    heldout = make_split(spec["prep_eval_problems"], 123_456, 2, 12, split="test")
    result = evaluate.evaluate(model, tokenizer, heldout, _EvalDefaults(), device)
    return {"role": role, "accuracy": result.accuracy, "stderr": result.stderr, "n": result.n,
            "spec": spec, "params": sum(p.numel() for p in model.parameters())}


@dataclass
class _EvalDefaults:
    max_new_tokens: int = 256
    batch_size: int = 100
    n_samples: int = 1
    temperature: float = 0.0
    top_p: float = 1.0


def load_pretrained(name_or_path: str, attn: str, trust_remote_code: bool, dtype, device) -> PreparedModel:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(name_or_path, attn_implementation=attn,
                                                 trust_remote_code=trust_remote_code, dtype=dtype)
    return PreparedModel(model.to(device), name_or_path, {})


def load_tokenizer(cfg, cache_dir: Path):
    """The student's tokenizer (its chat template renders every sequence)."""
    student = cfg.model.student
    if student.source == "embedded":
        return embedded_tokenizer(cache_dir)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(student.name_or_path, trust_remote_code=cfg.model.trust_remote_code)


def load_pair(cfg, tokenizer, device) -> tuple[PreparedModel, PreparedModel]:
    """(teacher, student), teacher frozen. Embedded models are prepared on first use."""
    cache_dir = Path(cfg.cache_dir).expanduser()
    names = (_label(cfg.model.teacher), _label(cfg.model.student))
    teacher_tok = teacher_tokenizer(cfg, tokenizer)
    check_tokenizers(teacher_tok, tokenizer, names)  # before minutes of loading weights
    loaded = {}
    for role in ("teacher", "student"):
        spec = cfg.model[role]
        if spec.source == "embedded":
            label = "teacher" if role == "teacher" else "base"
            loaded[role] = prepare_embedded(spec_dict(spec), label, tokenizer, cache_dir,
                                            cfg.model.attn_implementation, device)
        else:
            dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
            loaded[role] = load_pretrained(spec.name_or_path, cfg.model.attn_implementation,
                                           cfg.model.trust_remote_code, dtype, device)
    teacher = loaded["teacher"].model
    teacher.requires_grad_(False)
    teacher.eval()
    check_vocabularies(teacher_tok, tokenizer, teacher, loaded["student"].model, names)
    return loaded["teacher"], loaded["student"]


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
