"""The config's closed choices, one Enum each: the schema types its keys with them, so OmegaConf
refuses any other value when Hydra composes the config (the error names the key and the allowed
values), and every module that needs the list reads it from here. Nothing else restates them.

Each member is a ``str`` equal to its name (``StrEnum``): code compares ``cfg.loss.name ==
"forward_kl"``, formats it and writes it to JSON exactly as the plain string it replaces, so point
ids and records do not change. Choices that grow with a registry (datasets, benchmarks, prompt
styles) are checked against that registry in ``validation.py`` instead.
"""

from __future__ import annotations

from enum import Enum, StrEnum


class Choice(StrEnum):
    """A config choice; its repr is the plain string's, so messages read ``'lead'``, not ``<...>``."""

    def __repr__(self) -> str:
        return repr(self.value)


def values(choice: type[Enum]) -> tuple[str, ...]:
    """The allowed strings of one choice, in declaration order (messages, tests, loops)."""
    return tuple(member.value for member in choice)


class ModelSource(Choice):
    embedded = "embedded"  # built in code (a small Qwen3 architecture), prepared on the embedded task
    pretrained = "pretrained"  # a hub id or a local save_pretrained folder


class Precision(Choice):
    auto = "auto"  # bf16 where the device computes it natively, else fp32
    bf16 = "bf16"
    fp32 = "fp32"


class Attention(Choice):
    sdpa = "sdpa"
    eager = "eager"
    flash_attention_2 = "flash_attention_2"


class DataSource(Choice):
    synthetic = "synthetic"  # the embedded task, generated in code
    hub = "hub"
    json = "json"
    path = "path"  # a saved dataset or a folder of data files


class Rows(Choice):
    length = "length"  # every usable row of at most data.max_tokens tokens
    paper = "paper"  # the authors' published row lists


class Section(Choice):
    P = "P"  # prompt
    CoT = "CoT"  # chain of thought, between <think> and </think>
    A = "A"  # answer


class SectionsPreset(Choice):
    """The six section combinations the paper compares (``sections.SECTION_PRESETS``), or custom."""

    all = "all"
    prompt_cot = "prompt_cot"
    cot = "cot"
    cot_ans = "cot_ans"
    ans = "ans"
    prompt_ans = "prompt_ans"
    custom = "custom"


class TruncationMode(Choice):
    lead = "lead"
    left = "left"
    middle = "middle"
    right = "right"
    random_labels = "random_labels"


class DistillMode(Choice):
    offline = "offline"  # the dataset's traces
    sequence = "sequence"  # the teacher's completions
    on_policy = "on_policy"  # the student's own samples, scored by the teacher


class LossName(Choice):
    forward_kl = "forward_kl"
    reverse_kl = "reverse_kl"
    combined_kl = "combined_kl"
    jsd = "jsd"
    tvd = "tvd"
    skew_kl = "skew_kl"
    skew_reverse_kl = "skew_reverse_kl"


class Normalize(Choice):
    token = "token"  # every supervised token weighs the same
    sequence = "sequence"  # every sequence weighs the same


class Schedule(Choice):
    cosine = "cosine"  # linear warm-up, cosine to 0
    onecycle = "onecycle"  # torch's OneCycleLR


class Selection(Choice):
    final = "final"  # the last step's weights
    best_val = "best_val"  # lowest validation CE on full sequences


class Device(Choice):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class LossImpl(Choice):
    chunked = "chunked"  # output layers on supervised positions only, a chunk at a time
    full = "full"  # (B, T, V) logits for both models: the reference


class TeacherCache(Choice):
    none = "none"  # the teacher runs every step
    topk = "topk"  # its top-k logits, computed once


class TeacherParallel(Choice):
    replicate = "replicate"  # the whole teacher on every process
    shard = "shard"  # FSDP2-sharded like the student


class Engine(Choice):
    transformers = "transformers"
    vllm = "vllm"
    auto = "auto"  # vllm where it is installed and the run is on CUDA, else transformers


class Baseline(Choice):
    student = "student"  # the student before KD (step 0)
    teacher = "teacher"


class LoggerMode(Choice):
    offline = "offline"
    online = "online"
    disabled = "disabled"
