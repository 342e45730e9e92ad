"""Typed config schema, registered in Hydra's ConfigStore. YAML files in ``conf/`` choose values;
these dataclasses give every key its type, default and meaning. Unknown keys are errors (struct mode),
and a key typed by one of ``kd_sweeps.choices`` takes only its values, checked at composition.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING

from kd_sweeps.choices import (Attention, Baseline, DataSource, Device, DistillMode, Engine, LoggerMode, LossImpl,
                                 LossName, ModelSource, Normalize, Precision, Rows, Schedule, Section, SectionsPreset,
                                 Selection, TeacherCache, TeacherParallel, TruncationMode)


@dataclass
class ModelSpec:
    """One model of the pair. ``source=embedded`` builds it in code; ``pretrained`` loads a hub id or path."""

    source: ModelSource = ModelSource.embedded  # embedded | pretrained
    name_or_path: str = MISSING  # hub id / local dir (pretrained) or a cache label (embedded)
    # Shape of an embedded model (a Qwen3 architecture); ignored for pretrained models.
    layers: int = 2
    hidden: int = 128
    heads: int = 4  # head_dim = hidden / heads
    # How an embedded model is made before the sweep: CE training on the embedded task.
    prep_steps: int = 0  # optimizer steps; 0 = random init
    prep_lr: float = 3e-3
    prep_batch_size: int = 16
    prep_min_steps: int = 2  # problem lengths (reasoning steps) it is prepared on
    prep_max_steps: int = 12
    prep_examples: int = 20000
    prep_eval_problems: int = 200  # held-out problems (2..12 steps) its accuracy is reported on
    prep_precision: Precision = Precision.auto  # auto (bf16 where the device has it natively, else fp32) | bf16 | fp32


@dataclass
class ModelConfig:
    name: str = MISSING  # preset label, e.g. "tiny"
    teacher: ModelSpec = field(default_factory=ModelSpec)
    student: ModelSpec = field(default_factory=ModelSpec)
    attn_implementation: Attention = Attention.sdpa  # sdpa | eager | flash_attention_2
    trust_remote_code: bool = False  # remote code from a model repo runs only when asked


@dataclass
class DataConfig:
    name: str = "synthetic"  # synthetic (embedded task) | a dataset of kd_sweeps.sources.DATASETS
    source: DataSource = DataSource.synthetic  # synthetic | hub | json | path (a saved dataset or data-file folder)
    path: str = ""  # hub id, JSON/JSONL file or folder; empty = the named dataset's hub id
    split: Optional[str] = None  # split to read (None: the dataset's own)
    n_train: Optional[int] = 2000  # training sequences, the same for every grid point (None: all)
    n_val: Optional[int] = None  # validation sequences for checkpoint selection (None: paper's size)
    n_test: int = 200  # embedded task: held-out evaluation problems
    min_steps: int = 2  # embedded task: reasoning steps per problem
    max_steps: int = 12
    # Rows longer than this many tokens (templated and tokenized by the student's tokenizer) are dropped,
    # before the split for a real dataset; a row of exactly max_tokens is kept (the paper: 4k)
    max_tokens: int = 4096
    seed: int = 42  # data generation and split seed, fixed across grid points
    # Real datasets: which rows are split. length = every usable row of at most max_tokens tokens;
    # paper = the authors' published row lists (Bespoke-Stratos-17k, OpenThoughts-114k, Sky-T1 only)
    rows: Rows = Rows.length
    num_proc: int = 0  # worker processes that format/tokenize a real dataset (0: one per CPU, from 50k rows)
    # Plan only (python -m kd_sweeps.plan; the run ignores it): typical [P, CoT, A] tokens per sequence,
    # assumed where the data cannot be read and no measured lengths are cached; None: no assumption
    assumed_lengths: Optional[list[int]] = None


@dataclass
class SectionsConfig:
    """Which sections get KD/CE supervision: a preset name and its list (any combination allowed)."""

    name: SectionsPreset = SectionsPreset.all  # all | prompt_cot | cot | cot_ans | ans | prompt_ans | custom
    include: list[Section] = field(default_factory=lambda: list(Section))  # subset of P, CoT, A


@dataclass
class TruncationConfig:
    mode: TruncationMode = TruncationMode.lead  # lead | left | middle | right | random_labels
    cut_after_think: bool = False  # drop everything after the first </think> before truncating


@dataclass
class DistillConfig:
    """Where the supervised sequences come from (kd_sweeps/distill.py, docs/recipe.md)."""

    mode: DistillMode = DistillMode.offline  # offline (the dataset's traces) | sequence (the teacher's) | on_policy (the student's)
    lmbda: float = 0.0  # on_policy: chance that a step trains on the student's own samples (GKD's lambda)
    temperature: float = 1.0  # sampling of rollouts / teacher sequences; 0 = greedy
    top_p: float = 1.0  # nucleus sampling; 1 = off
    top_k: int = 0  # the k most likely tokens only; 0 = off
    # sequence: new tokens per teacher completion at most; None = the dataset's longest completion
    # (either way within data.max_tokens in all)
    max_new_tokens: Optional[int] = None
    batch_size: int = 64  # rows generated together (continuous batching)


@dataclass
class LossConfig:
    name: LossName = LossName.forward_kl  # forward_kl | reverse_kl | combined_kl | jsd | tvd | skew_kl | skew_reverse_kl
    kd_ratio: float = 0.5  # total = (1 - kd_ratio) * CE + kd_ratio * KD (paper default 0.5)
    temperature: float = 1.0  # softmax temperature; the KD term is scaled by T^2
    beta: float = 0.5  # jsd interpolation weight
    alpha: float = 0.1  # skew weight for skew_kl / skew_reverse_kl
    mix: float = 0.5  # combined_kl: mix * FKL + (1 - mix) * RKL
    # token: the step's loss is its sum over supervised tokens / their count (every token weighs the
    # same); sequence: each sequence's own token mean, averaged over the step's sequences (every
    # sequence weighs the same: the paper's batch of 1 per GPU with the GPUs' gradients averaged).
    normalize: Normalize = Normalize.token


@dataclass
class TrainConfig:
    # Optimizer steps, the same for every trunc; null: derived from epochs over the rows actually
    # kept, ceil(epochs x examples / batch_size) (the paper fixes epochs).
    max_steps: Optional[int] = 100
    epochs: Optional[float] = None  # used when max_steps is null
    batch_size: int = 16  # sequences per optimizer step, all processes together (the global batch)
    # Sequences per forward on each process; null: its whole share (batch_size / processes). The
    # gradient accumulation is derived (share / micro_batch_size), so one global batch runs on any
    # number of processes that divides it.
    micro_batch_size: Optional[int] = None
    lr: float = 1e-3  # peak learning rate
    weight_decay: float = 0.05
    decay_norms_and_biases: bool = False  # also decay 1-D parameters (norm weights, biases)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # AdamW (beta1, beta2)
    schedule: Schedule = Schedule.cosine  # cosine (linear warm-up, cosine to 0) | onecycle (torch's OneCycleLR)
    warmup_ratio: float = 0.1  # fraction of steps warming up (onecycle: its pct_start)
    div_factor: float = 25.0  # onecycle: the first lr is lr / div_factor
    final_div_factor: float = 1e4  # onecycle: the last lr is the first / final_div_factor
    cycle_momentum: bool = True  # onecycle: beta1 goes 0.95 -> 0.85 (peak lr) -> 0.95, replacing betas[0]
    grad_clip: float = 1.0
    # Compute dtype; master weights and AdamW state are fp32 always. auto: bf16 where the device
    # computes it natively (CUDA with bf16, CPUs with AVX512-BF16 or AMX), else fp32 (bf16 emulated
    # on a CPU is ~3x slower). The resolved value is in result.json's summary (precision).
    precision: Precision = Precision.auto  # auto | bf16 | fp32
    num_threads: int = 0  # CPU threads for torch; 0 = leave torch's default
    log_every: int = 10
    checkpoint_every: int = 0  # save the exact training state every N steps (0: only on preemption)
    # Which weights are the run's checkpoint: final (the last step) | best_val (lowest validation CE
    # on full, untruncated sequences: the paper's selection, one objective for every trunc).
    checkpoint_selection: Selection = Selection.final
    val_every: int = 0  # best_val: validate every N steps and after the last (0: every tenth of the run)
    device: Device = Device.auto  # auto | cpu | cuda
    loss_impl: LossImpl = LossImpl.chunked  # chunked (output layers on supervised positions only) | full
    teacher_cache: TeacherCache = TeacherCache.none  # none (teacher runs every step) | topk (its top-k, computed once)
    teacher_topk: int = 32  # k of the top-k cache; the rest of the distribution is one tail bucket
    activation_checkpointing: bool = False  # recompute each layer in backward: ~1/3 more compute, far less memory
    teacher_parallel: TeacherParallel = TeacherParallel.replicate  # several processes: full teacher per rank | shard (FSDP2, less memory)


@dataclass
class EvalJobConfig:
    """Resources of the evaluation job (eval.separate_job=true). On Slurm it is its own sbatch job,
    started only once the training job ended well; elsewhere a separate local process."""

    timeout_min: int = 240  # generation of long traces (32k tokens on AIME) takes hours at scale
    cpus_per_task: int = 4
    gpus_per_node: Optional[int] = None  # null: no GPU line (a CPU job)
    mem_gb: int = 16
    partition: Optional[str] = None  # null: the cluster's default partition
    account: Optional[str] = None
    qos: Optional[str] = None


@dataclass
class EvalConfig:
    separate_job: bool = False  # evaluate in a job of its own (Slurm: --dependency=afterok on training)
    job: EvalJobConfig = field(default_factory=EvalJobConfig)
    benchmarks: list[str] = field(default_factory=lambda: ["synthetic"])
    n_problems: int = 200  # per benchmark; the embedded test split has data.n_test
    # Generation stops at the end of the assistant turn (tokenizer eos, the chat template's end-of-turn
    # token, the model's generation_config eos ids) or after max_new_tokens (the stop token counted).
    max_new_tokens: int = 256
    batch_size: int = 100  # transformers engine: rows decoded at once (continuous batching slots)
    # transformers (always available) | vllm (the optional extra, on CUDA) | auto (vllm when it is
    # installed and the run is on CUDA, else transformers); both give the same results format.
    engine: Engine = Engine.transformers
    # Sampling, the same in both engines and always explicit (no model or library default applies):
    n_samples: int = 1  # samples per problem; accuracy = mean over samples (pass@1)
    temperature: float = 0.0  # 0 = greedy (top_p and top_k then do not matter)
    top_p: float = 1.0  # nucleus sampling; 1 = off
    top_k: int = 0  # the k most likely tokens only; 0 = off
    prompt_style: str = "boxed"  # instruction appended to benchmark problems (kd_sweeps.benchmarks)
    benchmark_paths: dict[str, str] = field(default_factory=dict)  # local copies: {name: file}
    # References evaluated as the points are, once per model and evaluation and cached (kd_sweeps/
    # baselines.py): the student before KD (step 0) and the teacher; [] measures none.
    baselines: list[Baseline] = field(default_factory=lambda: list(Baseline))


@dataclass
class LoggerConfig:
    mode: LoggerMode = LoggerMode.offline  # offline | online | disabled
    project: str = "kd-sweeps"
    entity: Optional[str] = None
    tags: list[str] = field(default_factory=list)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sections: SectionsConfig = field(default_factory=SectionsConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    truncation: TruncationConfig = field(default_factory=TruncationConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    trunc: float = 1.0  # leading fraction of every sequence kept for training, in (0, 1]
    seed: int = 42  # model init, data order and sampling of this grid point
    sweep: str = "default"  # the sweep's name: W&B group and table title
    cache_dir: str = "${oc.env:KD_SWEEPS_CACHE,${oc.env:HOME}/.cache/kd-sweeps}"  # embedded models
    output_dir: str = "."  # where result.json and the W&B run go (Hydra's job dir)
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes carried into the run
    force: bool = False  # rerun a point whose result says it is done (otherwise it is skipped)


def register_configs() -> None:
    """Register the schema so ``conf/config.yaml`` can extend it (``defaults: [schema, ...]``)."""
    from hydra.core.config_store import ConfigStore

    from omegaconf import OmegaConf

    from kd_sweeps.identity import point_id_resolver

    ConfigStore.instance().store(name="schema", node=Config)
    if not OmegaConf.has_resolver("kd_point_id"):
        OmegaConf.register_new_resolver("kd_point_id", point_id_resolver)
    if not OmegaConf.has_resolver("kd_sweep_name"):  # hydra.*.dir: a bad sweep name fails before any folder
        from kd_sweeps.validation import sweep_name_resolver

        OmegaConf.register_new_resolver("kd_sweep_name", sweep_name_resolver)
