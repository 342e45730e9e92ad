"""Several processes train like one: FSDP2 over 2 CPU processes on gloo against 1 process (losses
and parameters; teacher replicated or sharded, full-logits loss, activation checkpointing, resume
from a gathered state); a torchrun launch and real submitit tasks; rank facts read from torchrun's
and submitit's environments; the GPU check's CPU mode."""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

import pytest
import torch

from kd_sweeps import data, distributed, models, train
from kd_sweeps.schema import LossConfig, TrainConfig
from tests.helpers import E2E, TOLERANCE, free_port

ROOT = Path(__file__).resolve().parents[1]
TINY = {"layers": 1, "hidden": 32, "heads": 2}
STEPS = 3
# No autocast: the comparison must see how the batch is split, not bf16 rounding.
SETTINGS = dict(max_steps=STEPS, batch_size=8, micro_batch_size=2, lr=1e-2, precision="fp32")
# The paper's recipe at its learning rate, bf16 compute through FSDP2's mixed-precision policy.
PAPER = dict(lr=4e-6, schedule="onecycle", betas=(0.9, 0.999), decay_norms_and_biases=True, precision="bf16")


def _examples_and_models(folder: Path):
    """Tokenizer, training examples and (student, teacher) with the initial weights saved in folder."""
    from transformers import Qwen3ForCausalLM

    from kd_sweeps.synthetic import make_split
    from kd_sweeps.tokenizer import build_tokenizer

    torch.manual_seed(0)  # the same initial weights on every run of the test
    tokenizer = build_tokenizer()
    encoded, _ = data.encode(make_split(32, seed=0), tokenizer, 4096)
    examples, _ = data.training_examples(encoded, ("CoT", "A"), 0.5, "lead", False, 0)
    built = []
    for role, spec in (("student", TINY), ("teacher", {**TINY, "hidden": 48})):
        model = Qwen3ForCausalLM._from_config(models.qwen3_config(spec, tokenizer), attn_implementation="eager")
        path = folder / f"{role}.pt"
        if path.exists():  # every process starts from the very same weights
            model.load_state_dict(torch.load(path, weights_only=True))
        else:
            torch.save(model.state_dict(), path)
        built.append(model)
    built[1].requires_grad_(False)
    return tokenizer, examples, built[0], built[1]


def _train(folder, env, teacher_parallel="replicate", loss_impl="chunked", state=None, dtype=torch.float32,
           activation_checkpointing=False, normalize="token", **recipe):
    """STEPS steps; returns per-step losses, the full final parameters (rank 0) and, per step, the
    supervised tokens this rank metered."""
    tokenizer, examples, student, teacher = _examples_and_models(folder)
    student, teacher = student.to(dtype), teacher.to(dtype)
    settings = TrainConfig(**{**SETTINGS, **recipe}, loss_impl=loss_impl)
    if activation_checkpointing:
        distributed.enable_activation_checkpointing(student)
    student = distributed.shard_student(student, env, settings.precision)
    teacher = distributed.place_teacher(teacher, env, teacher_parallel)
    losses, metered = {}, {}

    def on_step(step, metrics, micro_batches):
        losses[step] = metrics["loss"]
        metered[step] = (sum(m["supervised"] for m in micro_batches), metrics["supervised_tokens"])

    resume = None if state is None else train.Resume(distributed.train_state(state, env), every=2)
    train.train_loop(student, teacher, examples, tokenizer.pad_token_id, settings,
                     LossConfig(kd_ratio=0.5, normalize=normalize), env.device, on_step=on_step,
                     resume=resume, dist=env)
    final = distributed.gathered_model(student, env)
    params = None if final is None else {k: v.detach().clone() for k, v in final.state_dict().items()}
    return losses, params, metered


def _worker(rank: int, world_size: int, port: int, folder: str) -> None:
    """One rank, started the way hydra-submitit-launcher's tasks are: from submitit's environment."""
    os.environ.update({
        "SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_JOB_ID": "4242", "SUBMITIT_LOCAL_NTASKS": str(world_size),
        "SUBMITIT_LOCAL_JOB_NUM_NODES": "1", "SUBMITIT_LOCAL_NODEID": "0",
        "SUBMITIT_LOCAL_GLOBALID": str(rank), "SUBMITIT_LOCAL_LOCALID": str(rank), "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    folder = Path(folder)
    env = distributed.init_distributed("cpu")
    try:
        assert (env.rank, env.world_size, env.is_main) == (rank, world_size, rank == 0)
        results = {"replicate": _train(folder, env, state=folder / "state"),  # saves its state at step 2
                   "resumed": _train(folder, env, state=folder / "state"),  # resumes at step 2
                   "teacher_shard_full": _train(folder, env, "shard", "full"),
                   "checkpointed": _train(folder, env, activation_checkpointing=True),
                   "float64": _train(folder, env, dtype=torch.float64),
                   "sequence": _train(folder, env, dtype=torch.float64, normalize="sequence"),
                   "paper_bf16": _train(folder, env, normalize="sequence", **PAPER)}
        # Cost metering: each rank counts its own micro-batches; their sum is the global step's count.
        for losses, params, metered in results.values():
            for step, (mine, global_count) in metered.items():
                assert distributed.all_reduce_sum([mine], env)[0] == global_count, (step, mine, global_count)
        if env.is_main:
            torch.save({k: v[:2] for k, v in results.items()}, folder / "results.pt")
    finally:
        distributed.destroy(env)


def _spawn(world_size: int, folder: Path, timeout_s: float = 240.0) -> None:
    import torch.multiprocessing as mp

    context = mp.start_processes(_worker, args=(world_size, free_port(), str(folder)), nprocs=world_size,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{world_size} ranks did not finish in {timeout_s} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    # The single-process reference first: it also writes the initial weights the ranks load.
    references = {dtype: _train(tmp_path, distributed.DistEnv(), dtype=dtype)[:2]
                  for dtype in (torch.float32, torch.float64)}
    sequence_reference = _train(tmp_path, distributed.DistEnv(), dtype=torch.float64, normalize="sequence")[:2]
    _spawn(2, tmp_path)
    results = torch.load(tmp_path / "results.pt", weights_only=True)

    def largest_difference(losses, params, dtype=torch.float32):
        reference_losses, reference_params = references[dtype]
        assert sorted(losses) == list(range(STEPS)) and params.keys() == reference_params.keys()
        loss_diff = max(abs(losses[s] - reference_losses[s]) for s in losses)
        param_diff = max((params[k] - reference_params[k]).abs().max().item() for k in params)
        return loss_diff, param_diff

    fp32 = largest_difference(*results["replicate"])
    fp64 = largest_difference(*results["float64"], torch.float64)
    print(f"\n2 processes vs 1, {STEPS} steps, largest difference in loss / parameters: "
          f"fp32 {fp32[0]:.1e} / {fp32[1]:.1e}, float64 {fp64[0]:.1e} / {fp64[1]:.1e}")
    assert fp32[0] < TOLERANCE and fp32[1] < 100 * TOLERANCE * SETTINGS["lr"] / 1e-2
    # float64 weights, but the rotary tables are computed in fp32 by a matmul whose rounding depends
    # on the padded length of the micro-batch (~1e-10 here): the same update otherwise.
    assert fp64[0] < 1e-8 and fp64[1] < 1e-7
    # Resumed at step 2 from the gathered state: the last step and the final weights are the same.
    resumed_losses, resumed_params = results["resumed"]
    assert list(resumed_losses) == [STEPS - 1]
    assert resumed_losses[STEPS - 1] == pytest.approx(results["replicate"][0][STEPS - 1], abs=1e-6)
    assert max((resumed_params[k] - results["replicate"][1][k]).abs().max().item()
               for k in resumed_params) < 1e-6
    # Each sequence its own token mean (the paper's weighting), split over 2 ranks x 2 micro-batches.
    references["sequence"] = sequence_reference
    sequence = largest_difference(*results["sequence"], "sequence")
    assert sequence[0] < 1e-8 and sequence[1] < 1e-7, sequence
    # bf16 compute (FSDP2's policy) on fp32 shards at the paper's lr 4e-6: every weight element moves.
    initial = torch.load(tmp_path / "student.pt", weights_only=True)
    final = results["paper_bf16"][1]
    moved = sum(int((final[k] != initial[k]).sum()) for k in initial) / sum(v.numel() for v in initial.values())
    print(f"2 processes, bf16 compute, fp32 shards, lr 4e-6, {STEPS} steps: {moved:.1%} of weight elements moved")
    assert all(v.dtype == torch.float32 for v in final.values()) and moved >= 0.99
    # A sharded teacher and the full-logits loss, or activation checkpointing: the same losses.
    assert largest_difference(*results["teacher_shard_full"])[0] < TOLERANCE
    assert largest_difference(*results["checkpointed"])[0] < TOLERANCE


# The embedded pair untrained (prep_steps=0): this checks the plumbing, not accuracy.
@pytest.mark.slow
@pytest.mark.parametrize("teacher", [[], ["train.teacher_cache=topk", "train.teacher_topk=8"]],
                         ids=["online-teacher", "teacher-cache"])
def test_torchrun_point_records_once_and_costs_all_ranks(tmp_path, monkeypatch, teacher):
    """``torchrun --nproc_per_node 2 launch.py``: rank 0 alone writes the record, the checkpoint and
    the W&B run; the summary's token counts are both ranks' together, equal to one process's. With
    the teacher's top-k cache, one rank builds it while the other waits on its lock, then loads it;
    with best_val, the validation losses (reduced over ranks) and the saved best weights match too."""
    import json
    import subprocess
    import sys

    from kd_sweeps import run
    from tests.conftest import compose_config

    env = {**os.environ, "KD_SWEEPS_CACHE": str(tmp_path / "cache"), "WANDB_MODE": "offline",
           "WANDB_SILENT": "true", "WANDB_DIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(free_port())]
    best_val = ["train.checkpoint_selection=best_val", "train.val_every=1", "data.n_val=5"]  # 5: uneven shares
    proc = subprocess.run([*torchrun, str(ROOT / "launch.py"), *E2E, *teacher, *best_val, "logger=offline",
                           f"hydra.run.dir={tmp_path / 'two'}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    two = json.loads((tmp_path / "two" / "result.json").read_text())
    assert two["status"] == "ok" and (tmp_path / "two" / "checkpoint" / "model.safetensors").exists()
    assert len(list((tmp_path / "two" / "wandb").glob("offline-run-*"))) == 1
    assert not (tmp_path / "two" / "train_state" / "train_state.pt").exists()  # removed once done

    monkeypatch.setenv("KD_SWEEPS_CACHE", str(tmp_path / "cache"))  # the models rank 0 prepared
    cfg = compose_config([*E2E, *teacher, *best_val, "logger=disabled"])
    cfg.output_dir = str(tmp_path / "one")
    one = run.main(cfg)
    for key in ("tokens_trained", "tokens_supervised", "examples_trained_on"):
        assert two["summary"][key] == one[key], key
    assert two["summary"]["final_loss"] == pytest.approx(one["final_loss"], abs=TOLERANCE)
    assert [s for s, _ in two["summary"]["val_history"]] == [1, 2, 3]
    assert [v for _, v in two["summary"]["val_history"]] == pytest.approx([v for _, v in one["val_history"]],
                                                                          abs=TOLERANCE)
    assert two["summary"]["best_val_step"] == one["best_val_step"]
    if teacher:  # built once, by the two-process run; the one-process run loaded it
        assert two["summary"]["teacher_cache_built_here"] and not one["teacher_cache_built_here"]
        assert two["summary"]["teacher_cache_path"] == one["teacher_cache_path"]
    from transformers import AutoModelForCausalLM

    saved = [AutoModelForCausalLM.from_pretrained(tmp_path / name / "checkpoint").state_dict() for name in ("two", "one")]
    config = json.loads((tmp_path / "two" / "checkpoint" / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"]  # not FSDP's subclass: vLLM reads this name
    assert saved[0].keys() == saved[1].keys()
    assert max((saved[0][k] - saved[1][k]).abs().max().item() for k in saved[0]) < 100 * TOLERANCE


def _submitit_task() -> dict:
    """What one task of a 2-task submitit job sees after joining the process group."""
    torch.set_num_threads(1)
    env = distributed.init_distributed("cpu")
    try:
        return {"rank": env.rank, "world_size": env.world_size, "is_main": env.is_main,
                "ranks_seen": distributed.all_gather(env.rank, env), "port": os.environ["MASTER_PORT"]}
    finally:
        distributed.destroy(env)


@pytest.mark.slow
def test_submitit_tasks_join_one_process_group(tmp_path):
    """A real submitit job with tasks_per_node=2 (what hydra-submitit-launcher submits for
    ``tasks_per_node: 2``, locally): its tasks find each other from submitit's environment."""
    import submitit

    executor = submitit.LocalExecutor(folder=tmp_path / "jobs")
    executor.update_parameters(tasks_per_node=2, timeout_min=3)
    job = executor.submit(_submitit_task)
    tasks = sorted(job.results(), key=lambda r: r["rank"])
    assert [(t["rank"], t["world_size"], t["is_main"]) for t in tasks] == [(0, 2, True), (1, 2, False)]
    assert all(t["ranks_seen"] == [0, 1] for t in tasks)
    assert tasks[0]["port"] == tasks[1]["port"] == str(distributed.job_port(job.job_id))


def test_batch_must_split_evenly_over_ranks():
    env = distributed.DistEnv(rank=0, world_size=4)
    assert distributed.micro_batch_size(8, 1, env) == 1 and distributed.accumulation_steps(8, 1, env) == 2
    assert distributed.micro_batch_size(8, None, env) == 2  # null: the rank's whole share
    with pytest.raises(ValueError, match=r"train.micro_batch_size=4: each of the 4 processes trains on 2"):
        distributed.micro_batch_size(8, 4, env)
    with pytest.raises(ValueError, match=r"train.batch_size=6 cannot be split over 4 processes"):
        distributed.micro_batch_size(6, 1, env)
    assert distributed.rank_slice(list(range(8)), distributed.DistEnv(rank=2, world_size=4)) == [4, 5]


def _clear_launch_env(monkeypatch):
    for key in list(os.environ):
        if key.startswith(("SLURM_", "SUBMITIT_")) or key in ("RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                                "MASTER_ADDR", "MASTER_PORT"):
            monkeypatch.delenv(key)


def test_rank_facts_from_submitit_slurm_tasks(monkeypatch):
    """What a 2-node x 4-task Slurm job's task 5 sees, read through submitit's own JobEnvironment."""
    _clear_launch_env(monkeypatch)
    assert distributed.launch_env() is None and distributed.process_rank() == 0
    for key, value in {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "9001", "SLURM_ARRAY_JOB_ID": "9000",
                       "SLURM_ARRAY_TASK_ID": "3", "SLURM_NTASKS": "8", "SLURM_JOB_NUM_NODES": "2",
                       "SLURM_NODEID": "1", "SLURM_PROCID": "5", "SLURM_LOCALID": "1",
                       "SLURM_JOB_NODELIST": "gpu[07-08]"}.items():
        monkeypatch.setenv(key, value)
    facts = distributed.launch_env()
    assert facts == {"rank": 5, "world_size": 8, "local_rank": 1, "master_addr": "gpu07",
                     "master_port": distributed.job_port("9000_3")}
    low, high = distributed.PORT_RANGE
    assert low <= facts["master_port"] < high and distributed.job_port("9000_4") != facts["master_port"]
    monkeypatch.setenv("MASTER_PORT", "29999")  # an explicit port wins
    assert distributed.launch_env()["master_port"] == 29999
    monkeypatch.setenv("SLURM_NTASKS", "1")  # one task: a single process, no process group
    assert distributed.launch_env() is None


def test_rank_facts_from_torchrun(monkeypatch):
    _clear_launch_env(monkeypatch)
    for key, value in {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3", "MASTER_ADDR": "node1",
                       "MASTER_PORT": "29400"}.items():
        monkeypatch.setenv(key, value)
    assert distributed.launch_env() == {"rank": 3, "world_size": 4, "local_rank": 3, "master_addr": "node1",
                                        "master_port": 29400}
    assert distributed.process_rank() == 3


def test_single_process_helpers_are_no_ops():
    env = distributed.init_distributed("cpu")  # no launcher variables in the test process
    assert env == distributed.DistEnv() and not env.distributed
    assert distributed.all_reduce_sum([2**70, 0.5], env) == [2**70, 0.5]
    assert distributed.agreed_signal(None, env) is None
    model = torch.nn.Linear(2, 2)
    assert distributed.shard_student(model, env) is model and distributed.gathered_model(model, env) is model
    distributed.barrier(env)
    distributed.destroy(env)


def test_gpu_check_runs_tiny_on_cpu(capsys):
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    rows = gpu_check.main(["--device", "cpu", "--tiny"])
    assert [r["trunc"] for r in rows] == [1.0, 0.5]
    assert all(r["tokens_per_s"] > 0 and r["mfu"] > 0 and r["peak_memory_gib"] > 0 for r in rows)
    assert "MFU" in capsys.readouterr().out
