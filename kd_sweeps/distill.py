"""Where the supervised sequences come from (``distill.mode``): the dataset's traces (``offline``),
the teacher's own completions of the training prompts (``sequence``), or, each step with probability
``distill.lmbda``, the student's own samples (``on_policy``).

On-policy semantics follow GKD (Agarwal et al., 2024; TRL's ``GKDTrainer``): ``lmbda`` is the chance
that a step's batch is replaced by completions the student samples from its current weights (with
``distill.temperature`` / ``top_p`` / ``top_k``); the teacher then scores the sampled tokens in the
same forward it runs on any batch, and the divergence ``loss.name`` (e.g. ``loss=jsd`` with
``loss.beta``) is applied at every supervised position. Where this differs from TRL, and why:

- a sampled batch is trained on the divergence alone (``kd_ratio`` 1: CE on the student's own
  samples would teach it what it already does); a dataset batch keeps ``(1 - r) CE + r KD`` as
  configured, where TRL applies the divergence alone to both;
- **truncated rollouts**: under ``trunc=x`` a rollout is generated only up to ``max(1, int(x * L))``
  new tokens, L the length of its prompt's reference completion (everything after the prompt), so
  the rollouts' cost falls with ``trunc`` as the supervised part does offline; TRL generates up to
  one fixed ``max_new_tokens``;
- sections apply to sampled sequences, with the spans found from the generated markers: the prompt
  is P (it ends where the reference's ``<think>`` starts: the chat template's opened turn), the CoT is
  what the model generated up to its first ``</think>`` included (a rollout cut before it is all
  CoT), the rest is A;
- the draw of ``lmbda`` and every rollout's sampling generator are pure functions of (seed, step,
  position in the batch), like ``random_labels``' draws: a resumed run draws and samples exactly what
  an uninterrupted one does, with no generator state to save; and every rank of a multi-process run
  generates the whole global batch alike (the same forward calls on every rank, as a sharded
  student needs) before taking its slice.

``sequence`` (sequence-level KD; TRL's ``seq_kd`` generates per batch instead) generates the teacher's
completion of every training prompt once per (teacher, data, sampling settings), caches it like the
teacher's top-k cache (file lock, atomic rename, a checksum verified on load) and trains offline on
those sequences: truncation, sections and the loss apply as to the dataset's traces.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from kd_sweeps.choices import DistillMode, values
from kd_sweeps.cost import ModelShape, generation_flops
from kd_sweeps.data import IGNORE_INDEX, Encoded, TrainExample
from kd_sweeps.generate import Request, Sampling, continuous_generate
from kd_sweeps.sections import Spans, label_tensor, supervised_tokens

log = logging.getLogger(__name__)
MODES = values(DistillMode)
SEQUENCES_VERSION = 1  # bump when the cached sequences' format or meaning changes


def rollout_seed(seed: int, step: int, position: int) -> int:
    """The sampling seed of one rollout: independent of ranks, batching and resumption."""
    digest = hashlib.sha256(f"rollout:{seed}:{step}:{position}".encode()).digest()
    return int.from_bytes(digest[:7], "little")


def spans_of_rollout(ids: Sequence[int], prompt_len: int, end_think_id: int) -> Spans:
    """P / CoT / A of prompt + generated tokens (module docstring): the prompt is P; what the model
    generated up to its first ``</think>`` included is CoT (its ``<think>`` first, from a model that
    writes one); the rest is A."""
    generated = list(ids[prompt_len:])
    end = prompt_len + generated.index(end_think_id) + 1 if end_think_id in generated else len(ids)
    return Spans(prompt=(0, prompt_len), cot=(prompt_len, end), answer=(end, len(ids)))


def example_of(ids: list[int], spans: Spans, sections: Sequence[str], cut_after_think: bool,
               index: int) -> TrainExample:
    """A whole generated sequence as a training example (no further truncation: a rollout is already
    as long as its budget)."""
    window, mask = supervised_tokens(len(ids), spans, tuple(sections), 1.0, "lead", cut_after_think=cut_after_think)
    input_ids, labels = label_tensor(ids, window, mask, IGNORE_INDEX)
    return TrainExample(input_ids, labels, sum(mask), index, tuple(window))


@dataclass
class Generator:
    """What generating needs from the tokenizer and the run: stop ids, padding, the end of a CoT, sampling."""

    stop_ids: list[int]
    pad_id: int
    end_think_id: int  # </think>: where a generated CoT ends
    sampling: Sampling
    slots: int  # rows decoded together (continuous batching)

    def run(self, model, requests: list[Request], autocast: bool) -> dict[tuple, list[int]]:
        out: dict[tuple, list[int]] = {}

        def keep(finished) -> None:
            out.update({item.key: item.tokens for item in finished})

        device_type = next(model.parameters()).device.type
        with torch.no_grad(), torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
            continuous_generate(model, requests, self.stop_ids, self.sampling, self.slots, self.pad_id, keep)
        return out


@dataclass
class OnPolicy:
    """``distill.mode=on_policy``: per step, maybe replace the batch by the student's rollouts."""

    encoded: Sequence[Encoded]  # the full reference sequences (prompts and their completion lengths)
    generator: Generator
    sections: tuple[str, ...]
    trunc: float
    cut_after_think: bool
    lmbda: float
    seed: int
    shape: ModelShape  # the student's, for the generation FLOPs
    counters: dict = field(default_factory=lambda: {"rollout_steps": 0, "rollouts": 0, "generated_tokens": 0,
                                                    "generation_flops": 0, "generation_time_s": 0.0,
                                                    "rollouts_without_target": 0})

    def draws(self, step: int) -> bool:
        """Whether step ``step`` samples its batch: a pure function of (seed, step)."""
        return self.lmbda > 0 and random.Random(f"lmbda:{self.seed}:{step}").random() < self.lmbda

    def budget(self, index: int) -> tuple[list[int], int]:
        """(prompt ids, new-token budget) of reference sequence ``index``."""
        enc = self.encoded[index]
        prompt_len = enc.spans.cot[0]  # everything before <think>: the chat template's opened turn
        return list(enc.input_ids[:prompt_len]), max(1, int(self.trunc * (len(enc.input_ids) - prompt_len)))

    def rollouts(self, student, chosen: Sequence[TrainExample], step: int, autocast: bool) -> list[TrainExample]:
        """The student's completions of the prompts of ``chosen`` (the whole global batch), as examples.
        One without a supervised token (sections=ans and no answer reached) is counted; the loop
        trains on the dataset's example in its place."""
        started = time.perf_counter()
        requests = []
        for position, example in enumerate(chosen):
            prompt, budget = self.budget(example.index)
            requests.append(Request((position,), prompt, rollout_seed(self.seed, step, position), budget))
        was_training = student.training
        tokens = self.generator.run(student, requests, autocast)
        student.train(was_training)
        out = []
        for request, example in zip(requests, chosen):
            new = tokens[request.key]
            ids = list(request.prompt) + new
            spans = spans_of_rollout(ids, len(request.prompt), self.generator.end_think_id)
            out.append(example_of(ids, spans, self.sections, self.cut_after_think, example.index))
            self.counters["generated_tokens"] += len(new)
            self.counters["generation_flops"] += generation_flops(self.shape, len(request.prompt), len(new))
        self.counters["rollouts_without_target"] += sum(1 for e in out if not e.n_supervised)
        self.counters["rollout_steps"] += 1
        self.counters["rollouts"] += len(out)
        self.counters["generation_time_s"] += time.perf_counter() - started
        return out

    def state(self) -> dict:
        return dict(self.counters)

    def restore(self, state: dict) -> None:
        self.counters.update(state)


# --------------------------------------------------------------------------- sequence-level KD


def sequences_folder(cache_dir: Path, teacher_id: str, data_fingerprint: str, generator: Generator,
                     max_new_tokens: int | None, max_tokens: int, seed: int) -> tuple[Path, dict]:
    """Where the teacher's completions for this (teacher, data, stop ids, sampling, budget) live."""
    key = {"teacher": str(teacher_id), "data": data_fingerprint, "stop_ids": generator.stop_ids,
           "sampling": [generator.sampling.temperature, generator.sampling.top_p, generator.sampling.top_k],
           "max_new_tokens": max_new_tokens, "max_tokens": max_tokens,
           "seed": seed if generator.sampling.temperature > 0 else None, "version": SEQUENCES_VERSION}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"teacher-sequences-{digest}", key


def _checksum(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def load_sequences(folder: Path, count: int) -> list[list[int]]:
    """The cached completions, verified: the count and the checksum recorded when they were written."""
    meta = json.loads((folder / "meta.json").read_text())
    text = (folder / "sequences.json").read_text()
    if _checksum(text) != meta["sha256"]:
        raise ValueError(f"teacher sequences {folder} are corrupted (checksum mismatch): delete the folder "
                         f"to generate them again")
    sequences = json.loads(text)
    if len(sequences) != count:
        raise ValueError(f"teacher sequences {folder} hold {len(sequences)} completions; the data has {count}")
    return sequences


def teacher_sequences(teacher, encoded: Sequence[Encoded], generator: Generator, folder: Path, key: dict,
                      max_new_tokens: int | None, max_tokens: int, seed: int, shape: ModelShape,
                      autocast: bool) -> tuple[list[Encoded], dict]:
    """(the teacher's completion of every training prompt as full sequences, what it cost here) —
    generated once under the folder's lock, then read back by every point and sweep."""
    from filelock import FileLock

    summary = {"sequences_path": str(folder), "sequences_built_here": False}
    with FileLock(str(folder) + ".lock"):
        if not (folder / "meta.json").exists():
            started = time.perf_counter()
            # None: as long as the dataset's longest completion (a teacher that never stops costs no
            # more than that); either way the sequence stays within data.max_tokens.
            limit = max_new_tokens or max(len(e.input_ids) - e.spans.cot[0] for e in encoded)
            requests = []
            for index, enc in enumerate(encoded):
                prompt_len = enc.spans.cot[0]
                budget = max(1, min(max_tokens - prompt_len, limit))
                requests.append(Request((index,), list(enc.input_ids[:prompt_len]),
                                        rollout_seed(seed, -1, index), budget))
            tokens = generator.run(teacher, requests, autocast)
            completions = [tokens[(i,)] for i in range(len(encoded))]
            flops = sum(generation_flops(shape, len(r.prompt), len(c)) for r, c in zip(requests, completions))
            text = json.dumps(completions)
            tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
            tmp.mkdir(parents=True, exist_ok=True)
            (tmp / "sequences.json").write_text(text)
            meta = {**key, "count": len(completions), "sha256": _checksum(text), "generation_flops": flops,
                    "seconds": time.perf_counter() - started,
                    "generated_tokens": sum(len(c) for c in completions)}
            (tmp / "meta.json").write_text(json.dumps(meta))
            os.replace(tmp, folder)  # appears complete or not at all
            summary["sequences_built_here"] = True
            log.info("teacher sequences: %d completions, %d tokens, in %.0f s -> %s", len(completions),
                     meta["generated_tokens"], meta["seconds"], folder)
        completions = load_sequences(folder, len(encoded))
    # What the sequences cost to make, once, whoever made them (a point's full cost includes it).
    summary["sequence_generation_flops"] = json.loads((folder / "meta.json").read_text())["generation_flops"]
    out = []
    for enc, new in zip(encoded, completions):
        prompt = list(enc.input_ids[:enc.spans.cot[0]])
        ids = prompt + list(new)
        out.append(Encoded(ids, spans_of_rollout(ids, len(prompt), generator.end_think_id)))
    return out, summary
