"""Checkpoint selection: the final weights (``train.checkpoint_selection=final``), or the weights with
the lowest validation loss (``best_val``, as the paper evaluated its students).

The validation loss is the student's CE per supervised token on the validation split, on FULL
sequences (never truncated) with the assistant turn (CoT + A) supervised: one objective for every
grid point, whatever its trunc and sections (the reference code selected on each point's truncated
data, so each ratio was selected on a different objective). It is computed every
``train.val_every`` steps and after the last step. A new best is written at once as the run's
checkpoint (safetensors + tokenizer, through CPU memory for a sharded student), so no second copy
of the weights is ever held on the GPU; at the end that folder holds the best weights.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from kd_sweeps import batch_loss, data, distributed
from kd_sweeps.distributed import DistEnv
from kd_sweeps.schema import LossConfig

VAL_SECTIONS = ("CoT", "A")  # what generation produces at evaluation: the whole assistant turn


def validation_examples(data_cfg, tokenizer, cache_dir=None) -> list[data.TrainExample]:
    """The validation split as full, untruncated examples with CoT + A supervised (a real dataset's
    from the tables the training split was cached in, under ``cache_dir``)."""
    encoded, _, _ = data.load_encoded(data_cfg, "val", tokenizer, cache_dir)
    examples, _ = data.training_examples(encoded, VAL_SECTIONS, 1.0, "lead", False, seed=0)
    if not examples:
        raise data.DataError(f"the validation split of data.name={data_cfg.name!r} has no usable sequence")
    return examples


@torch.no_grad()
def validation_loss(model, examples: Sequence[data.TrainExample], pad_id: int, micro_batch: int,
                    autocast: bool, impl: str, device, env: Optional[DistEnv] = None) -> float:
    """Mean CE per supervised token over ``examples``. Ranks split each global batch of
    ``micro_batch * world_size`` sequences; their token sums are added up with the same collective
    the training loss uses, so the value is the single-process one. Every rank runs the same number
    of forwards (a rank with no sequence left repeats one, weighted 0): FSDP's all-gathers are
    collective."""
    env = env or DistEnv()
    was_training = model.training
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))  # little padding
    span = micro_batch * env.world_size
    no_kd = LossConfig(kd_ratio=0.0)
    ce_sum = n_sum = 0.0
    for start in range(0, len(order), span):
        chosen = [examples[i] for i in order[start:start + span]]
        mine = chosen[env.rank * micro_batch:(env.rank + 1) * micro_batch]
        part = mine or chosen[:1]
        batch = {k: v.to(device) for k, v in data.collate(part, pad_id).items()}
        n_part = sum(e.n_supervised for e in part)
        # n_step_supervised = n_part: the returned ce is this micro-batch's mean per token.
        _, ce, _ = batch_loss.step_losses(model, None, batch, n_part, no_kd, autocast, impl)
        if mine:
            ce_sum, n_sum = ce_sum + ce * n_part, n_sum + n_part
    ce_sum, n_sum = distributed.all_reduce_sum([ce_sum, n_sum], env)
    model.train(was_training)
    return ce_sum / max(1.0, n_sum)


def save_checkpoint(model, tokenizer, folder: Path, env: Optional[DistEnv] = None) -> None:
    """The full model as safetensors plus the tokenizer in ``folder``, written by rank 0 into a
    temporary folder and moved in place (a preemption never leaves half a checkpoint). Collective
    for a sharded student: its full state dict is gathered through CPU memory."""
    env = env or DistEnv()
    full = distributed.cpu_full_model(model, env)  # the model itself for one process; None on ranks > 0
    if env.is_main:
        folder = Path(folder)
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        full.save_pretrained(tmp)  # safetensors by default
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    distributed.barrier(env)


def load_checkpoint(folder: Path, device, attn_implementation: str = "sdpa"):
    """A saved checkpoint, in the dtype it was saved in, for evaluation."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto", attn_implementation=attn_implementation)
    return model.to(device).eval()


class BestValidation:
    """``best_val`` bookkeeping: when to validate, the best loss so far and its step (carried across a
    resume through ``state``/``restore``), and the history of validation losses."""

    def __init__(self, val_every: int, max_steps: int, compute_loss: Callable[[object], float],
                 save: Callable[[object], None]):
        self.val_every = val_every or max(1, max_steps // 10)  # 0: every tenth of the run
        self.max_steps = max_steps
        self.compute_loss, self.save = compute_loss, save
        self.history: list[list] = []  # [[steps done, val loss], ...]
        self.best_step: Optional[int] = None
        self.best_loss = math.inf
        self.seconds = 0.0

    def after_step(self, step: int, model) -> dict:
        """Validate after optimizer step ``step`` (0-based) when due; on a new best, save the model.
        Every rank calls it (it is collective). Returns {"val_loss": ...} when it validated."""
        done = step + 1
        if done % self.val_every and done != self.max_steps:
            return {}
        started = time.perf_counter()
        loss = self.compute_loss(model)
        self.history.append([done, loss])
        if loss < self.best_loss:  # strict: the earliest of equal losses; a NaN is never the best
            self.best_step, self.best_loss = done, loss
            self.save(model)
        self.seconds += time.perf_counter() - started
        return {"val_loss": loss}

    def state(self) -> dict:
        return {"history": self.history, "best_step": self.best_step, "best_loss": self.best_loss,
                "seconds": self.seconds}

    def restore(self, state: dict) -> None:
        self.history = [list(item) for item in state["history"]]
        self.best_step, self.best_loss, self.seconds = state["best_step"], state["best_loss"], state["seconds"]

    def summary(self) -> dict:
        """``best_val_step`` counts optimizer steps done (max_steps = the final weights)."""
        return {"val_loss": self.history[-1][1] if self.history else None, "best_val_step": self.best_step,
                "best_val_loss": self.best_loss if self.best_step is not None else None,
                "val_history": self.history, "val_time_s": self.seconds}


def for_config(cfg, tokenizer, env: DistEnv, folder: Path) -> Optional[BestValidation]:
    """The selector a run's config asks for; None for ``final`` (the last weights are saved)."""
    if cfg.train.checkpoint_selection != "best_val":
        return None
    examples = validation_examples(cfg.data, tokenizer, Path(cfg.cache_dir).expanduser())
    micro = distributed.micro_batch_size(cfg.train.batch_size, cfg.train.micro_batch_size, env)
    autocast = cfg.train.precision == "bf16"

    def compute_loss(model) -> float:
        return validation_loss(model, examples, tokenizer.pad_token_id, micro, autocast, cfg.train.loss_impl,
                               env.device, env)

    def save(model) -> None:
        save_checkpoint(model, tokenizer, folder, env)

    return BestValidation(cfg.train.val_every, cfg.train.max_steps, compute_loss, save)
