"""Shared fixtures: Hydra composition of the project's own config, offline everything."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# Nothing is downloaded at test time: hub lookups fail at once instead of after a timeout.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


def compose_config(overrides=(), config_name: str = "config", return_hydra_config: bool = False):
    """The config exactly as ``launch.py`` would compose it (schema included); with
    ``return_hydra_config`` its ``hydra`` node too (launcher, sweeper), whose interpolations only
    resolve inside a running Hydra app."""
    from hydra import compose, initialize_config_dir

    from kd_sweeps.schema import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides), return_hydra_config=return_hydra_config)


@pytest.fixture
def compose():
    return compose_config


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """KD_SWEEPS_CACHE of the sweeps a module launches (tests.helpers.launch): one per module, so the
    embedded models are prepared once per module and its checks of what the cache holds see only
    what that module made."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module of tiny models: extra threads only add synchronisation, which
    on a busy 2-core machine costs several times the work itself. Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def qwen3_dir(tmp_path_factory) -> Path:
    """Folders Qwen3-8B/ and Qwen3-4B-Base/ with the real tokenizers and tiny random weights
    (tests/qwen3_hub.py); ``model=qwen3_local`` reads them with QWEN3_DIR set to this folder."""
    from tests.qwen3_hub import build_qwen3_pair

    root = tmp_path_factory.mktemp("qwen3")
    build_qwen3_pair(root)
    return root
