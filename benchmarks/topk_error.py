"""Error of the teacher top-k cache against the dense teacher, on held-out sequences, per k.

    python benchmarks/topk_error.py                       # the embedded default, k = 8, 16, 32
    python benchmarks/topk_error.py --k 32 64 -- model=qwen3_8b_to_4b_base data=open_thoughts114k  # any config

The teacher is the config's (an embedded one is prepared on first use, as a sweep would), the
sequences are the validation split formatted as training formats them (the whole sequence: the
cache is built untruncated), at the loss temperature. Each k builds its own cache in a temporary
folder and reports ``teacher_cache_build.approximation_error``: per predicting position,
KL(p || p~) with p~ the cached top-k and the rest mass spread evenly over the other ids (what the
(k + 1)-bucket loss cannot see), the storage error of the fp16 buckets, and the tail mass.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from kd_sweeps import data, models, teacher_cache_build
from kd_sweeps.schema import register_configs

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--k", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for launch.py")
    args = parser.parse_args(argv)
    register_configs()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=args.overrides)
    device = torch.device(args.device)
    cache_dir = Path(cfg.cache_dir).expanduser()
    tokenizer = models.load_tokenizer(cfg, cache_dir)
    encoded, _, _ = data.load_encoded(cfg.data, "val", tokenizer, cache_dir)
    teacher, _ = models.load_pair(cfg, tokenizer, device)
    model = teacher.model.to(device)
    vocab = model.get_output_embeddings().weight.shape[0]
    temperature = float(cfg.loss.temperature)
    print(f"teacher {teacher.path}: V = {vocab:,}; {len(encoded)} validation sequences; "
          f"temperature {temperature:g}\n")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in args.k:
            cache = teacher_cache_build.build_cache(model, encoded, Path(tmp) / f"k{k}", k, temperature,
                                              args.batch_size, device)
            rows.append(teacher_cache_build.approximation_error(model, encoded, cache, temperature,
                                                          batch_size=args.batch_size, device=device))
    print("| k | positions | KL mean (nats) | KL max | tail mass mean | tail mass max | fp16 bucket TV max |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['k']} | {r['n_positions']:,} | {r['kl_mean']:.2e} | {r['kl_max']:.2e} | "
              f"{r['tail_mass_mean']:.2e} | {r['tail_mass_max']:.2e} | {r['bucket_tv_max']:.1e} |")
    return rows


if __name__ == "__main__":
    main()
