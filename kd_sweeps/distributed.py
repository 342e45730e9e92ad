"""torch.distributed for one grid point: ranks from torchrun or submitit, the student sharded with
FSDP2, the frozen teacher replicated or sharded, and the few collectives the training loop needs.

Where the rank facts come from, in this order:
  torchrun   RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT (its env:// contract);
  submitit   ``submitit.JobEnvironment()`` (what hydra-submitit-launcher starts when
             ``tasks_per_node`` or ``nodes`` > 1): global_rank, num_tasks, local_rank; the first
             host of the job is the master, and the port is derived from the job id, so every task
             of a job agrees on it without talking to the others (MASTER_PORT, when set, wins).
Anything else, or a world of one, is a single process: no process group, every helper here is a
no-op, and the training code runs unchanged on a laptop CPU. NCCL on CUDA, gloo on CPU.

How the training loop uses this (kd_sweeps/train.py): every rank draws the same GLOBAL batch and
trains on its own contiguous slice, in micro-batches of ``train.micro_batch_size`` (the accumulation
is derived, so one global batch runs on 1, 2, 4 or 8 ranks); each rank's loss is its share of the
step's GLOBAL value (supervised-token sum over the step's token count, or per-sequence means over
the step's sequence count), and FSDP SUMS the ranks' gradients (not its default mean), so the
update equals the single-process one. Rank 0 alone writes records, checkpoints and evaluates.
"""

from __future__ import annotations

import copy
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional, Sequence

import torch

from kd_sweeps import chunked_loss
from kd_sweeps.checkpoint import TrainState, set_rng_state
from kd_sweeps.choices import TeacherParallel, values

PORT_RANGE = (20000, 60000)  # derived ports stay above the well-known ones and below the ephemeral range
TEACHER_PARALLEL = values(TeacherParallel)


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job. ``world_size == 1``: no process group exists."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    is_main: bool = True  # rank 0: the only writer of result.json, W&B and checkpoints

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launch_env() -> Optional[dict]:
    """Rank facts from torchrun's or submitit's environment; None for a single process."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        facts = {"rank": int(env["RANK"]), "world_size": int(env["WORLD_SIZE"]),
                 "local_rank": int(env.get("LOCAL_RANK", 0)),
                 "master_addr": env.get("MASTER_ADDR", "127.0.0.1"), "master_port": int(env.get("MASTER_PORT", 29500))}
    elif env.get("SUBMITIT_EXECUTOR"):
        import submitit  # only inside a submitit job

        job = submitit.JobEnvironment()
        facts = {"rank": job.global_rank, "world_size": job.num_tasks, "local_rank": job.local_rank,
                 "master_addr": job.hostnames[0],
                 "master_port": int(env["MASTER_PORT"]) if "MASTER_PORT" in env else job_port(job.job_id)}
    else:
        return None
    return facts if facts["world_size"] > 1 else None


def job_port(job_id: str) -> int:
    """A port every task of the job computes alike (a requeued job keeps its id, hence its port)."""
    low, high = PORT_RANGE
    return low + zlib.crc32(str(job_id).encode()) % (high - low)


def process_rank() -> int:
    """This process's rank without starting anything (0 for a single process)."""
    facts = launch_env()
    return 0 if facts is None else facts["rank"]


def init_distributed(device: str = "auto") -> DistEnv:
    """Join the job's process group (or not, for a single process) and pick this rank's device.
    ``device``: auto | cpu | cuda, as ``train.device``."""
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    facts = launch_env()
    if facts is None:
        return DistEnv(device=torch.device("cuda" if use_cuda else "cpu"))
    import torch.distributed as dist

    if use_cuda:  # one GPU per rank; a Slurm task may see only its own GPU, hence the modulo
        chosen = torch.device("cuda", facts["local_rank"] % torch.cuda.device_count())
        torch.cuda.set_device(chosen)
    else:
        chosen = torch.device("cpu")
    if not dist.is_initialized():
        # env:// reads these; under torchrun they are already set (and the agent's store is reused).
        os.environ.update({"MASTER_ADDR": facts["master_addr"], "MASTER_PORT": str(facts["master_port"])})
        dist.init_process_group("nccl" if use_cuda else "gloo", init_method="env://", rank=facts["rank"],
                                world_size=facts["world_size"], device_id=chosen if use_cuda else None)
    return DistEnv(facts["rank"], facts["world_size"], facts["local_rank"], chosen, facts["rank"] == 0)


def destroy(env: DistEnv) -> None:
    """Leave the process group. Sharded models must be unreachable by now: the collection below
    frees them (and the gloo work their hooks hold) while Python still runs; left to interpreter
    shutdown, that work can abort the process at exit."""
    import gc

    import torch.distributed as dist

    if env.distributed and dist.is_initialized():
        gc.collect()  # a sharded model is in a reference cycle (its final_hidden method)
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        import torch.distributed as dist

        dist.barrier()


def all_gather(value: Any, env: DistEnv) -> list:
    """Every rank's ``value`` (any picklable object), in rank order, on every rank."""
    if not env.distributed:
        return [value]
    import torch.distributed as dist

    out: list = [None] * env.world_size
    dist.all_gather_object(out, value)
    return out


def all_reduce_sum(values: Sequence, env: DistEnv) -> list:
    """Element-wise sum over ranks, identical on every rank. Summed as Python numbers in rank order:
    FLOP counts pass 2**53 (float64's exact integers) and can pass 2**63 (int64), so no tensor."""
    gathered = all_gather(list(values), env)
    return [sum(column) for column in zip(*gathered)]


def agreed_signal(requested: Optional[int], env: DistEnv) -> Optional[int]:
    """The preemption signal any rank has received (None if none): all ranks stop at one step."""
    return next((s for s in all_gather(requested, env) if s), None)


def micro_batch_size(batch_size: int, micro_batch: Optional[int], env: DistEnv) -> int:
    """Sequences per micro-batch on each rank (``train.micro_batch_size``; None: the rank's whole
    share). The global batch must split evenly: ``batch_size = world_size x micro x accumulation``,
    so the same global batch runs on any number of ranks that divides it."""
    if batch_size % env.world_size:
        raise ValueError(f"train.batch_size={batch_size} cannot be split over {env.world_size} processes: every "
                         f"rank trains on an equal share of each global batch (at least one sequence); use a "
                         f"multiple of {env.world_size} (the step then differs from the recipe's), or fewer processes")
    share = batch_size // env.world_size
    micro_batch = micro_batch or share
    if share % micro_batch:
        raise ValueError(f"train.micro_batch_size={micro_batch}: each of the {env.world_size} processes trains on "
                         f"{share} of train.batch_size={batch_size} sequences per step, in micro-batches that must "
                         f"divide it; use a divisor of {share}")
    return micro_batch


def accumulation_steps(batch_size: int, micro_batch: Optional[int], env: DistEnv) -> int:
    """Micro-batches each rank accumulates per optimizer step (derived, never configured)."""
    return batch_size // env.world_size // micro_batch_size(batch_size, micro_batch, env)


def rank_slice(chosen: Sequence, env: DistEnv) -> list:
    """This rank's contiguous 1/world_size of the global batch (lengths are grouped, so shares match)."""
    share = len(chosen) // env.world_size
    return list(chosen[env.rank * share:(env.rank + 1) * share])


def _mesh(env: DistEnv):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(env.device.type, (env.world_size,))


def _fully_shard_decoder(model, env: DistEnv, mp_policy=None) -> None:
    """FSDP2 on every decoder layer, then on the root (embeddings, final norm, output layer)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mesh = _mesh(env)
    mp_policy = mp_policy or MixedPrecisionPolicy()  # the default: compute in the parameters' dtype
    for layer in model.get_decoder().layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp_policy)
    fully_shard(model, mesh=mesh, mp_policy=mp_policy)

    # The chunked loss runs the decoder and reads the head weight without ``model.forward``; this
    # method makes FSDP gather the root's parameters (and hook backward) around that call.
    def final_hidden(input_ids, attention_mask=None):
        return chunked_loss.final_hidden_and_head_weight(model, input_ids, attention_mask)[0]  # (B, T, H)

    model.final_hidden = final_hidden
    register_fsdp_forward_method(model, "final_hidden")


def shard_student(model, env: DistEnv, precision: str = "fp32"):
    """The student as FSDP2 shards across ranks (unchanged for a single process). Call before the
    optimizer is built: its parameters become DTensor shards. The shards stay in the model's dtype
    (fp32: the master weights AdamW steps); with ``precision="bf16"`` (resolved, not ``auto``) each
    layer is gathered in bf16 for compute and its gradients are reduced in fp32, so no update is
    rounded away before it reaches the fp32 shard."""
    if not env.distributed:
        return model
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if precision == "bf16" else None
    _fully_shard_decoder(model, env, policy)
    # Each rank's loss is already its share of the GLOBAL mean: sum the ranks' gradients exactly
    # (a plain SUM collective, not a pre-scaled one: gloo has no PREMUL_SUM). Per FSDP unit: the
    # setters are not recursive.
    for unit in model.modules():
        if isinstance(unit, FSDPModule):
            unit.set_gradient_divide_factor(1.0)
            unit.set_force_sum_reduction_for_comms(True)
    return model


def place_teacher(model, env: DistEnv, parallel: str = "replicate"):
    """The frozen teacher: a full copy on every rank (``replicate``: no communication, the most
    memory) or FSDP2 shards gathered layer by layer in each forward (``shard``)."""
    if parallel not in TEACHER_PARALLEL:
        raise ValueError(f"train.teacher_parallel={parallel!r}: must be one of {', '.join(TEACHER_PARALLEL)}")
    if env.distributed and parallel == "shard":
        _fully_shard_decoder(model, env)
    return model


def enable_activation_checkpointing(model) -> None:
    """Recompute each decoder layer in backward (non-reentrant checkpointing, which composes with
    FSDP2's hooks). Call before ``shard_student``."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def hidden_and_head(model, input_ids, attention_mask=None):
    """``chunked_loss.final_hidden_and_head_weight`` for a plain or an FSDP-sharded model: final
    hidden states (B, T, H) and the output-layer weight (V, H). A sharded root keeps its parameters
    gathered after forward (FSDP's rule for the root) until backward, so the weight read here is the
    full one."""
    final_hidden = getattr(model, "final_hidden", None)
    if final_hidden is None:
        return chunked_loss.final_hidden_and_head_weight(model, input_ids, attention_mask)
    hidden = final_hidden(input_ids=input_ids, attention_mask=attention_mask)
    return hidden, model.get_output_embeddings().weight


def _full_options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def gathered_model(model, env: DistEnv):
    """An unsharded copy of a sharded model on rank 0 (None elsewhere); the model itself for a single
    process. Collective: every rank calls it. The full state dict is gathered through CPU memory."""
    if not env.distributed:
        return model
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    from transformers import AutoModelForCausalLM

    state = get_model_state_dict(model, options=_full_options(cpu_offload=True))  # {} on ranks > 0
    if not env.is_main:
        return None
    dtype = next(iter(state.values())).dtype
    with torch.device(env.device):  # built where it will run: no slow CPU init of a large model
        full = AutoModelForCausalLM.from_config(model.config, dtype=dtype,
                                                attn_implementation=model.config._attn_implementation)
    full.load_state_dict(state)
    full.generation_config = copy.deepcopy(model.generation_config)  # from_config would reset it
    return full.eval()


def cpu_full_model(model, env: DistEnv):
    """The full model for saving: the model itself for a single process; for a sharded one, a copy
    on CPU on rank 0 (None elsewhere) built on the meta device and given the gathered tensors, so
    rank 0's GPU never holds a second copy. Collective: every rank calls it. The copy has the
    model's own class (a sharded model's class is FSDP's subclass, a name vLLM would not know)."""
    if not env.distributed:
        return model
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    from transformers import AutoModelForCausalLM

    state = get_model_state_dict(model, options=_full_options(cpu_offload=True))  # {} on ranks > 0
    if not env.is_main:
        return None
    with torch.device("meta"):
        full = AutoModelForCausalLM.from_config(model.config, dtype=next(iter(state.values())).dtype)
    full.load_state_dict(state, assign=True)
    full.tie_weights()
    full.generation_config = copy.deepcopy(model.generation_config)
    return full


class ShardedTrainState(TrainState):
    """Exact resume for a sharded student: FULL model and optimizer state dicts, gathered to rank 0
    (through CPU memory) and written by it alone; on load rank 0 reads the file and broadcasts, so a
    job may resume with another number of processes (two or more: the optimizer state is keyed by
    parameter names, unlike a single process's). RNG states are rank 0's: every rank is seeded
    alike and draws nothing of its own during training."""

    def __init__(self, folder: Path, env: DistEnv):
        super().__init__(folder)
        self.env = env

    def exists(self) -> bool:
        return all_gather(super().exists(), self.env)[0]  # rank 0's answer: all ranks resume, or none

    def save(self, step: int, model, optimizer, schedule, extra: dict) -> None:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        options = _full_options(cpu_offload=True)
        model_state = get_model_state_dict(model, options=options)
        optimizer_state = get_optimizer_state_dict(model, optimizer, options=options)
        if self.env.is_main:  # the parent's atomic write, handed the gathered dicts
            super().save(step, SimpleNamespace(state_dict=lambda: model_state),
                         SimpleNamespace(state_dict=lambda: optimizer_state), schedule, extra)
        barrier(self.env)  # the file is complete before any rank can act on it

    def load(self, model, optimizer, schedule) -> tuple[int, dict]:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        payload = torch.load(self.path, map_location="cpu", weights_only=True) if self.env.is_main else {}
        small = all_gather({k: v for k, v in payload.items() if k not in ("model", "optimizer")}, self.env)[0]
        options = _full_options(broadcast_from_rank0=True)
        set_model_state_dict(model, payload.get("model", {}), options=options)
        set_optimizer_state_dict(model, optimizer, payload.get("optimizer", {}), options=options)
        schedule.load_state_dict(small["schedule"])
        set_rng_state(small["rng"])
        return small["step"], small["extra"]

    def remove(self) -> None:
        if self.env.is_main:
            super().remove()


def train_state(folder: Path, env: DistEnv) -> TrainState:
    return ShardedTrainState(folder, env) if env.distributed else TrainState(folder)
