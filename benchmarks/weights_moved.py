"""Does a fine-tuning update reach the student's weights? The fraction of its weight elements that
change in 2 optimizer steps at the paper's lr 4e-6, under bf16 compute, with bf16 vs fp32 master
weights.

    python benchmarks/weights_moved.py    # 23 s of CPU time (67 s wall on a busy 2-core machine)

The student and teacher are local pretrained folders with the REAL Qwen3-4B-Base / Qwen3-8B tokenizer
files and tiny random weights of Qwen3's own init scale (0.02; tests/qwen3_hub.py), loaded through
the run's own path (``model=qwen3_local``, ``models.load_pair``), trained by the run's loop on
embedded-task traces (2-3 reasoning steps, cut to their leading half) rendered with the real chat
template. Variants:

  before       the student in bf16 (what ``load_pair`` did under train.precision=bf16) and the old
               train=paper recipe (batch 8 in micro-batches of 4, AdamW betas (0.9, 0.95), no decay
               on norms, warm-up + cosine, token-weighted loss): AdamW steps bf16 weights;
  bf16_master  the student in bf16, the paper's recipe (train=paper): the master copy alone;
  fp32_master  what a run does now: ``load_pair`` loads the student in fp32, bf16 autocast computes.

An update of 4e-6 is below half of bf16's rounding step for any weight above ~2e-3 (bf16 keeps 8
significant bits), so in bf16 most weights, and every norm weight near 1, never move.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAPER = ["train=paper", "train.max_steps=2", "train.precision=bf16", "train.device=cpu"]
OLD_RECIPE = ["train.batch_size=8", "train.micro_batch_size=4", "train.betas=[0.9,0.95]", "train.schedule=cosine",
              "train.decay_norms_and_biases=false", "train.activation_checkpointing=false", "loss.normalize=token"]
VARIANTS = {"before": ("bf16", OLD_RECIPE), "bf16_master": ("bf16", []), "fp32_master": ("fp32", [])}


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose, initialize_config_dir

    from kd_sweeps.schema import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def moved_fraction(qwen3_dir: Path, master: str, recipe: list[str], sequences: int = 16) -> dict:
    """Train 2 steps as ``variant`` does; the fraction of the student's weight elements that changed
    (all of them, and the norm weights alone)."""
    import torch

    from kd_sweeps import data, models, train
    from omegaconf import OmegaConf
    from kd_sweeps.synthetic import make_split

    # model=qwen3_local reads the folders from $QWEN3_DIR; the paths are resolved once, here.
    previous = os.environ.get("QWEN3_DIR")
    os.environ["QWEN3_DIR"] = str(qwen3_dir)
    try:
        cfg = compose(["model=qwen3_local", *PAPER, *recipe, f"cache_dir={qwen3_dir / 'cache'}"])
        cfg.model.teacher.name_or_path = cfg.model.teacher.name_or_path
        cfg.model.student.name_or_path = cfg.model.student.name_or_path
    finally:
        if previous is None:
            os.environ.pop("QWEN3_DIR")
        else:
            os.environ["QWEN3_DIR"] = previous
    device = torch.device("cpu")
    tokenizer = models.load_tokenizer(cfg, Path(cfg.cache_dir))
    # Short problems (2-3 reasoning steps, ~100 tokens): the output layer over 151,936 ids dominates.
    encoded, _ = data.encode(make_split(sequences, seed=0, min_steps=2, max_steps=3), tokenizer, 4096)
    examples, _ = data.training_examples(encoded, ("P", "CoT", "A"), 0.5, "lead", False, cfg.seed)  # trunc 0.5
    teacher, student = models.load_pair(cfg, tokenizer, device)
    if cfg.train.activation_checkpointing:
        from kd_sweeps.distributed import enable_activation_checkpointing

        enable_activation_checkpointing(student.model)
    if master == "bf16":
        student.model.to(torch.bfloat16)
    named = dict(student.model.named_parameters())
    before = {name: p.detach().clone() for name, p in named.items()}
    train.train_loop(student.model, teacher.model, examples, tokenizer.pad_token_id, OmegaConf.to_object(cfg.train),
                     OmegaConf.to_object(cfg.loss), device, seed=cfg.seed)
    changed = {name: int((p.detach() != before[name]).sum()) for name, p in named.items()}
    norms = [name for name in named if "norm" in name]
    return {"moved": sum(changed.values()) / sum(p.numel() for p in named.values()),
            "norms_moved": sum(changed[n] for n in norms) / sum(named[n].numel() for n in norms),
            "dtype": str(next(iter(named.values())).dtype).removeprefix("torch."),
            "params": sum(p.numel() for p in named.values())}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import torch

    from tests.qwen3_hub import build_qwen3_pair

    torch.set_num_threads(min(2, torch.get_num_threads()))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        build_qwen3_pair(Path(tmp))
        for name in args.variants:
            master, recipe = VARIANTS[name]
            results[name] = moved_fraction(Path(tmp), master, recipe)
    print("| variant | student weights | parameters | weight elements changed in 2 steps | norm weights changed |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['dtype']} | {r['params']:,} | {r['moved']:.1%} | {r['norms_moved']:.1%} |")
    return results


if __name__ == "__main__":
    main()
