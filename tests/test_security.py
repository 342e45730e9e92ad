"""Security: no secret reaches a record; remote code runs only when asked; checkpoints load no code.

The end-to-end test runs a real one-point sweep with tokens in the environment and on the command
line, then reads every file the sweep wrote, as bytes, for them.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import pytest
import torch

from kd_sweeps.redact import REDACTED, env_secrets, looks_secret, redact, redact_text
from tests.conftest import ROOT
from tests.helpers import FAST_WANDB, launch

# Made-up tokens of the shapes the scrubber knows (none is a real credential).
HF = "hf_" + "AbCdEfGhIjKlMnOpQrStUvWxYz012345"
WANDB = "0123456789abcdef0123456789abcdef01234567"  # a W&B key is 40 hex digits
GITHUB = "ghp_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8"
NOTE = "sk-" + "proj-Zz9Yy8Xx7Ww6Vv5Uu4Tt3"


def test_secret_names_and_counters():
    for name in ("WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "GH_TOKEN", "AWS_SECRET_ACCESS_KEY",
                 "DB_PASSWORD", "extra.api_key", "+extra.token", "client_secret"):
        assert looks_secret(name), name
    for name in ("max_new_tokens", "teacher_topk", "tokens_supervised", "eval.max_new_tokens", "monkey",
                 "KD_SWEEPS_CACHE", "keys", "HOME"):
        assert not looks_secret(name), name


def test_redact_values_patterns_and_secret_keys():
    secrets = env_secrets({"HF_TOKEN": "plain-secret-value", "SHORT_KEY": "1", "PATH": "/usr/bin"})
    assert secrets == ["plain-secret-value"]  # a 1-character "secret" would redact every digit
    record = {"trunc": 0.5, "eval": {"max_new_tokens": 48}, "note": f"uses {HF} and {GITHUB}",
              "extra": {"api_key": WANDB, "nested": ["AKIAABCDEFGHIJKLMNOP", "xoxb-1234567890-abc"]},
              "path": "/data/plain-secret-value/file.json", "overrides": ["trunc=0.5", f"+extra.wandb_key={WANDB}"]}
    clean = redact(record, secrets)
    assert clean["trunc"] == 0.5 and clean["eval"] == {"max_new_tokens": 48}
    assert clean["note"] == f"uses {REDACTED} and {REDACTED}"
    assert clean["extra"] == {"api_key": REDACTED, "nested": [REDACTED, REDACTED]}
    assert clean["path"] == f"/data/{REDACTED}/file.json"
    assert clean["overrides"] == ["trunc=0.5", f"+extra.wandb_key={REDACTED}"]
    text = redact_text(f"401 for url ?token={WANDB}; max_new_tokens=48; WANDB_API_KEY: {WANDB}", [])
    assert WANDB not in text and "max_new_tokens=48" in text


def test_no_secret_in_what_wandb_receives(tmp_path, monkeypatch):
    """A token-shaped sweep name (the W&B group, notes, id) and a secret's value in logger.tags and
    in an override (name, tags) reach neither the offline run file that `wandb sync` uploads nor
    W&B's debug logs; the reader sees them redacted."""
    from analysis.wandb_offline import read_runs
    from kd_sweeps.tracking import Tracker
    from tests.helpers import LoggerCfg as Logger

    monkeypatch.setenv("MY_SERVICE_TOKEN", "plain-env-secret-value")
    monkeypatch.setattr("sys.argv", ["launch.py", "-m", f"sweep={HF}", "logger.tags=[plain-env-secret-value]"])
    overrides = ["trunc=0.5", "+data.path=/data/plain-env-secret-value", f"sweep={HF}"]
    with Tracker(tmp_path, "p0001", HF, {"trunc": 0.5}, Logger(tags=["ok-tag", "plain-env-secret-value",
                                                                      f"note {NOTE}"]), overrides):
        pass
    (run,) = read_runs(tmp_path)
    assert run.group == REDACTED and run.name == f"trunc=0.5 data.path=/data/{REDACTED}"
    assert run.tags == ["trunc=0.5", f"data.path=/data/{REDACTED}", "ok-tag", REDACTED, f"note {REDACTED}"]
    files = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert any(path.suffix == ".wandb" for path in files) and any(path.name == "debug.log" for path in files)
    leaks = [f"{path.relative_to(tmp_path)}: {secret}" for path in files
             for secret in (HF, NOTE, "plain-env-secret-value")
             if secret.encode() in path.read_bytes() or secret in str(path)]  # the run id names folders
    assert not leaks, leaks
    assert run.run_id.startswith("p0001-_redacted__")  # the sweep in the id: redacted, then hashed


@pytest.mark.slow
def test_no_secret_in_any_file_a_sweep_writes(tmp_path, cache_dir, monkeypatch):
    """A real one-point sweep (W&B offline) with HF_TOKEN, WANDB_API_KEY and GITHUB_TOKEN set and a
    token passed in +extra: neither result.json, Hydra's saved config (.hydra/, multirun.yaml), the
    offline W&B run (its binary log and debug logs) nor any other file of the sweep holds one."""
    monkeypatch.setenv("HF_TOKEN", HF)
    monkeypatch.setenv("WANDB_API_KEY", WANDB)
    monkeypatch.setenv("GITHUB_TOKEN", GITHUB)
    sweep_dir = tmp_path / "sweep"
    proc = launch(["-m", "trunc=1.0", "sweep=secrets", f"hydra.sweep.dir={sweep_dir}", "train.max_steps=2",
                   f"+extra.note=ran with {NOTE}", f"+extra.api_key={WANDB}", *FAST_WANDB], tmp_path, cache_dir)
    (result_path,) = sweep_dir.glob("*/result.json")
    result = json.loads(result_path.read_text())
    assert result["status"] == "ok"
    assert result["config"]["extra"] == {"note": f"ran with {REDACTED}", "api_key": REDACTED}
    point = result_path.parent
    assert (point / ".hydra" / "config.yaml").exists() and (sweep_dir / "multirun.yaml").exists()
    assert list(point.glob("wandb/offline-run-*/run-*.wandb")), "the W&B run was written"
    leaks = [f"{path.relative_to(sweep_dir)}: {name}" for path in sorted(sweep_dir.rglob("*")) if path.is_file()
             for name, secret in (("HF", HF), ("WANDB", WANDB), ("GITHUB", GITHUB), ("NOTE", NOTE))
             if secret.encode() in path.read_bytes()]
    assert not leaks, leaks
    # The console still echoes the command line the user typed (Hydra's launcher logs each job's
    # overrides); nothing of it is stored.
    assert "1 grid point(s): 1 ran" in proc.stdout


def _remote_code_model(folder: Path, marker: Path) -> Path:
    """A local model folder whose config maps the Auto classes to a module shipped with it; importing
    that module writes ``marker`` (what any code in a model repository could do)."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "kd_remote_test", "architectures": ["RemoteModel"],
        "auto_map": {"AutoConfig": "modeling_remote.RemoteConfig",
                     "AutoModelForCausalLM": "modeling_remote.RemoteModel"}}))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "RemoteTokenizer",
        "auto_map": {"AutoTokenizer": ["modeling_remote.RemoteTokenizer", None]}}))
    (folder / "modeling_remote.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from transformers import PretrainedConfig, PreTrainedModel\n"
        "class RemoteConfig(PretrainedConfig):\n    model_type = 'kd_remote_test'\n"
        "class RemoteModel(PreTrainedModel):\n    config_class = RemoteConfig\n")
    return folder


def test_remote_code_runs_only_when_asked(tmp_path, compose):
    """The project's loader, given a model whose repository ships code: refused without
    model.trust_remote_code=true (the default), and the code is never imported; run with it."""
    from kd_sweeps import models

    marker = tmp_path / "remote-code-ran"
    folder = _remote_code_model(tmp_path / "remote-model", marker)
    cfg = compose(["model=qwen3_8b_to_4b_base", f"model.teacher.name_or_path={folder}",
                   f"model.student.name_or_path={folder}", "train.precision=fp32"])
    assert cfg.model.trust_remote_code is False
    with pytest.raises(ValueError, match="trust_remote_code"):
        models.load_pretrained(str(folder), "sdpa", cfg.model.trust_remote_code, torch.float32, torch.device("cpu"))
    with pytest.raises(ValueError, match="trust_remote_code"):
        models.load_tokenizer(cfg, tmp_path)
    assert not marker.exists()
    trusted = compose(["model=qwen3_8b_to_4b_base", f"model.teacher.name_or_path={folder}",
                       f"model.student.name_or_path={folder}", "train.precision=fp32",
                       "model.trust_remote_code=true"])
    with pytest.raises(Exception):  # the stub model cannot be built; its code has run by then
        models.load_pretrained(str(folder), "sdpa", trusted.model.trust_remote_code, torch.float32,
                               torch.device("cpu"))
    assert marker.read_text() == "ran"


@pytest.mark.parametrize("preset", sorted(p.stem for p in (ROOT / "conf" / "model").glob("*.yaml")))
def test_trust_remote_code_is_off_in_every_model_preset(compose, preset):
    assert compose([f"model={preset}"]).model.trust_remote_code is False


class _RunsCode:
    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pickle ran code"))


def test_train_state_loads_without_running_pickled_code(tmp_path):
    """A train_state.pt crafted to run code on unpickling is refused by the loader (weights_only)."""
    from kd_sweeps.checkpoint import TrainState

    state = TrainState(tmp_path)
    payload = _RunsCode()
    payload.marker = str(tmp_path / "pwned")
    torch.save({"step": 1, "model": payload}, state.path)
    with pytest.raises(pickle.UnpicklingError):
        state.load(torch.nn.Linear(1, 1), None, None)
    assert not (tmp_path / "pwned").exists()


def test_every_torch_load_is_weights_only():
    calls = []
    for path in sorted([*(ROOT / "kd_sweeps").glob("*.py"), *(ROOT / "analysis").glob("*.py"),
                        *(ROOT / "benchmarks").glob("*.py")]):
        for match in re.finditer(r"torch\.load\(([^)]*)\)", path.read_text()):
            calls.append((path.name, match.group(1)))
    assert calls, "the train state is loaded with torch.load"
    assert all("weights_only=True" in args for _, args in calls), calls
