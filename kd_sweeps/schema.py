"""Typed config schema, registered in Hydra's ConfigStore. YAML files in ``conf/`` choose values;
these dataclasses give every key its type, default and meaning. Unknown keys are errors (struct mode).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING


@dataclass
class ModelSpec:
    """One model of the pair. ``source=embedded`` builds it in code; ``pretrained`` loads a hub id or path."""

    source: str = "embedded"  # embedded | pretrained
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
    prep_precision: str = "bf16"  # bf16 autocast | fp32


@dataclass
class ModelConfig:
    name: str = MISSING  # preset label, e.g. "tiny"
    teacher: ModelSpec = field(default_factory=ModelSpec)
    student: ModelSpec = field(default_factory=ModelSpec)
    attn_implementation: str = "sdpa"  # sdpa | eager | flash_attention_2
    trust_remote_code: bool = False  # remote code from a model repo runs only when asked


@dataclass
class DataConfig:
    name: str = "synthetic"  # synthetic (embedded task) | a dataset of kd_sweeps.sources.DATASETS
    source: str = "synthetic"  # synthetic | hub | json | path (a saved dataset or data-file folder)
    path: str = ""  # hub id, JSON/JSONL file or folder; empty = the named dataset's hub id
    split: Optional[str] = None  # split to read (None: the dataset's own)
    n_train: Optional[int] = 2000  # training sequences, the same for every grid point (None: all)
    n_val: Optional[int] = None  # validation sequences for checkpoint selection (None: paper's size)
    n_test: int = 200  # embedded task: held-out evaluation problems
    min_steps: int = 2  # embedded task: reasoning steps per problem
    max_steps: int = 12
    max_tokens: int = 4096  # examples longer than this (tokenized, templated) are dropped
    seed: int = 42  # data generation and split seed, fixed across grid points


@dataclass
class SectionsConfig:
    """Which sections get KD/CE supervision: a preset name and its list (any combination allowed)."""

    name: str = "all"  # all | prompt_cot | cot | cot_ans | ans | prompt_ans | custom
    include: list[str] = field(default_factory=lambda: ["P", "CoT", "A"])  # subset of P, CoT, A


@dataclass
class TruncationConfig:
    mode: str = "lead"  # lead | left | middle | right | random_labels
    cut_after_think: bool = False  # drop everything after the first </think> before truncating


@dataclass
class LossConfig:
    name: str = "forward_kl"  # forward_kl | reverse_kl | combined_kl | jsd | tvd | skew_kl | skew_reverse_kl
    kd_ratio: float = 0.5  # total = (1 - kd_ratio) * CE + kd_ratio * KD (paper default 0.5)
    temperature: float = 1.0  # softmax temperature; the KD term is scaled by T^2
    beta: float = 0.5  # jsd interpolation weight
    alpha: float = 0.1  # skew weight for skew_kl / skew_reverse_kl
    mix: float = 0.5  # combined_kl: mix * FKL + (1 - mix) * RKL


@dataclass
class TrainConfig:
    max_steps: int = 100  # optimizer steps, the same for every trunc (the paper fixes epochs)
    batch_size: int = 16  # sequences per optimizer step
    grad_accum: int = 1  # micro-batches per step; batch_size must divide evenly
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_ratio: float = 0.1  # fraction of steps with linear warm-up, then cosine to 0
    grad_clip: float = 1.0
    precision: str = "bf16"  # bf16 (autocast) | fp32
    num_threads: int = 0  # CPU threads for torch; 0 = leave torch's default
    log_every: int = 10
    checkpoint_every: int = 0  # save the exact training state every N steps (0: only on preemption)
    # Which weights are the run's checkpoint: final (the last step) | best_val (lowest validation CE
    # on full, untruncated sequences: the paper's selection, one objective for every trunc).
    checkpoint_selection: str = "final"
    val_every: int = 0  # best_val: validate every N steps and after the last (0: every tenth of the run)
    device: str = "auto"  # auto | cpu | cuda
    loss_impl: str = "chunked"  # chunked (output layers on supervised positions only) | full
    teacher_cache: str = "none"  # none (teacher runs every step) | topk (its top-k, computed once)
    teacher_topk: int = 32  # k of the top-k cache; the rest of the distribution is one tail bucket
    activation_checkpointing: bool = False  # recompute each layer in backward: ~1/3 more compute, far less memory
    teacher_parallel: str = "replicate"  # several processes: full teacher per rank | shard (FSDP2, less memory)


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
    max_new_tokens: int = 256
    batch_size: int = 100
    # transformers (always available) | vllm (the optional extra, on CUDA) | auto (vllm when it is
    # installed and the run is on CUDA, else transformers); both give the same results format.
    engine: str = "transformers"
    n_samples: int = 1  # samples per problem; accuracy = mean over samples (pass@1)
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    prompt_style: str = "boxed"  # instruction appended to benchmark problems (kd_sweeps.benchmarks)
    benchmark_paths: dict[str, str] = field(default_factory=dict)  # local copies: {name: file}


@dataclass
class LoggerConfig:
    mode: str = "offline"  # offline | online | disabled
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
