"""Local "hub" folders of the paper's pair with the REAL Qwen3 tokenizers (tests/fixtures/qwen3) and
tiny random Qwen3 weights: the files ``from_pretrained`` reads on a cluster, at a size a CPU trains
in seconds. Weights are drawn with Qwen3's own init scale (``initializer_range`` 0.02), because
whether a fine-tuning update survives rounding depends on the size of the weights it is added to.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tests.conftest import ROOT

QWEN3_FIXTURES = ROOT / "tests" / "fixtures" / "qwen3"
STUDENT, TEACHER = "Qwen3-4B-Base", "Qwen3-8B"
TOKENIZER_FILES = ("tokenizer_config.json", "chat_template.jinja", "added_tokens.json", "special_tokens_map.json",
                   "generation_config.json")


def build_qwen3_folder(folder: Path, which: str = STUDENT, hidden: int = 16, layers: int = 1, seed: int = 0) -> Path:
    """A pretrained folder for ``which`` (``Qwen3-4B-Base`` or ``Qwen3-8B``): its real tokenizer files
    and generation config, a config shrunk to ``hidden``/``layers`` with the real vocabulary size
    (151,936 rows), word-embedding tying and init scale, and random weights. Reused if it exists."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    folder = Path(folder)
    if (folder / "config.json").exists():
        return folder
    source = QWEN3_FIXTURES / which
    real = json.loads((source / "config.json").read_text())
    config = Qwen3Config(vocab_size=real["vocab_size"], hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=hidden // 2, max_position_embeddings=8192,
                         tie_word_embeddings=real["tie_word_embeddings"], rope_theta=real["rope_theta"],
                         initializer_range=real["initializer_range"], rms_norm_eps=real["rms_norm_eps"],
                         bos_token_id=real["bos_token_id"], eos_token_id=real["eos_token_id"])
    torch.manual_seed(seed)
    Qwen3ForCausalLM(config).save_pretrained(folder)
    for path in (QWEN3_FIXTURES / "shared").iterdir():
        shutil.copy(path, folder / path.name)
    for name in TOKENIZER_FILES:  # after save_pretrained: the real generation_config.json wins
        if (source / name).exists():
            shutil.copy(source / name, folder / name)
    return folder


def build_qwen3_pair(root: Path, hidden: int = 16, layers: int = 1) -> tuple[Path, Path]:
    """(teacher, student) folders named as on the hub, under ``root`` (the ``model=qwen3_local``
    preset reads them from ``$QWEN3_DIR``)."""
    root = Path(root)
    teacher = build_qwen3_folder(root / TEACHER, TEACHER, hidden=2 * hidden, layers=layers, seed=1)
    student = build_qwen3_folder(root / STUDENT, STUDENT, hidden=hidden, layers=layers, seed=2)
    return teacher, student
