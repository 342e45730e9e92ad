"""Helpers several test modules share (fixtures live in conftest.py)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LoggerCfg:
    """A ``logger`` config node for a Tracker built directly (outside Hydra)."""

    mode: str = "offline"
    project: str = "kd-sweeps-test"
    entity: str | None = None
    tags: list = field(default_factory=list)


def random_embedded_model(tokenizer, layers: int = 2, hidden: int = 64, heads: int = 2, scale: float = 0.15,
                          seed: int = 0):
    """A random embedded-shape Qwen3 whose matrices are drawn at ``scale``: large enough that its
    greedy completions differ in length and content (a near-uniform init emits one token forever)."""
    import torch
    from transformers import Qwen3ForCausalLM

    from kd_sweeps import models

    torch.manual_seed(seed)
    model = Qwen3ForCausalLM._from_config(models.qwen3_config({"layers": layers, "hidden": hidden, "heads": heads},
                                                              tokenizer))
    with torch.no_grad():
        for weight in model.parameters():
            if weight.dim() > 1:
                weight.normal_(0, scale)
    return model
