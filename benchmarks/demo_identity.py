"""One small embedded grid point run by the code at ROOT: its training numbers and a hash of every
weight it produced (the prepared teacher and base student, the trained checkpoint). Run it with two
trees to show a change leaves the demo's results bit for bit as they were:

    git archive HEAD | tar -x -C /tmp/old
    python benchmarks/demo_identity.py /tmp/old /tmp/out_old
    python benchmarks/demo_identity.py . /tmp/out_new          # the same lines, plus "precision"

Extra arguments are Hydra overrides. About 2 minutes per tree on 2 cores (it prepares both models).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

SMALL = ["model.teacher.prep_steps=30", "model.teacher.prep_examples=256", "model.teacher.prep_eval_problems=8",
         "model.student.prep_steps=20", "model.student.prep_examples=256", "model.student.prep_eval_problems=8",
         "data.n_train=128", "data.n_test=8", "train.max_steps=6", "train.batch_size=16",
         "eval.n_problems=8", "eval.max_new_tokens=48", "train.num_threads=1", "logger=disabled"]


def weights_hash(path: str) -> str:
    """A hash of every tensor's values (as fp32) in a safetensors file, in name order."""
    from safetensors.torch import load_file

    state = load_file(path)
    return hashlib.sha256(b"".join(state[k].float().numpy().tobytes() for k in sorted(state))).hexdigest()[:16]


def main(root: str, out: str, extra: list[str]) -> None:
    sys.path.insert(0, os.path.abspath(root))  # the tree under test, not the installed package
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled")
    from hydra import compose, initialize_config_dir

    from kd_sweeps import run
    from kd_sweeps.schema import register_configs

    register_configs()
    overrides = [*SMALL, f"cache_dir={out}/cache", f"output_dir={out}/run", *extra]
    with initialize_config_dir(config_dir=f"{os.path.abspath(root)}/conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    summary = run.main(cfg)
    keys = ("final_loss", "final_ce_loss", "final_kd_loss", "train_flops", "tokens_trained", "base_accuracy",
            "teacher_accuracy", "precision")
    print(json.dumps({k: summary.get(k) for k in keys}))
    print("checkpoint", weights_hash(f"{out}/run/checkpoint/model.safetensors"))
    for name in sorted(os.listdir(f"{out}/cache")):  # prepared models, named by their cache keys
        if os.path.exists(f"{out}/cache/{name}/model.safetensors"):
            print(name, weights_hash(f"{out}/cache/{name}/model.safetensors"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
