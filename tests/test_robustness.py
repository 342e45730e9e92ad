"""The bad-input catalogue (docs/robustness.md): each bad config, record, model, cache or disk gives an
error naming the key, record or file and the fix, before heavy work where it can be known, and a
killed process, a damaged cache or a full disk costs at most the point it hit."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kd_sweeps import data, models, teacher_cache_build
from kd_sweeps.point_record import RESULT_FILE
from kd_sweeps.prepare import load_reasoning_dataset
from kd_sweeps.record_files import write_json_atomic
from kd_sweeps.sources import SourceError
from kd_sweeps.synthetic import make_split
from kd_sweeps.tokenizer import build_tokenizer
from kd_sweeps.validation import ConfigError, validate
from tests.conftest import ROOT, compose_config
from tests.helpers import encoded_split, tiny_model
from tests.tiny_hub import build_tiny_hub_model

TINY_SPEC = {"source": "embedded", "name_or_path": "t", "layers": 1, "hidden": 16, "heads": 2, "prep_steps": 0,
             "prep_lr": 1e-3, "prep_batch_size": 4, "prep_min_steps": 2, "prep_max_steps": 3,
             "prep_examples": 8, "prep_eval_problems": 2}


@pytest.fixture(scope="module")
def tiny_hub(tmp_path_factory):
    return build_tiny_hub_model(tmp_path_factory.mktemp("hub") / "tiny-qwen3")


def child_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


# --- config ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("override, allowed", [("experiment=paper_trunction", "paper_truncation"),
                                               ("model=tiny2", "qwen3_8b_to_4b_base")])
def test_a_preset_typo_lists_the_allowed_presets(override, allowed):
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException) as info:
        compose_config([override])
    group, typo = override.split("=")
    assert f"Could not find '{group}/{typo}'" in str(info.value)
    assert f"Available options in '{group}'" in str(info.value) and allowed in str(info.value)


def _file(tmp_path: Path) -> Path:
    """A regular file: a path below it can be neither read nor created, even by root."""
    path = tmp_path / "plain-file"
    path.write_text("not a folder")
    return path


@pytest.mark.parametrize("case", ["model_missing", "model_is_file",
                                  "model_not_safetensors", "benchmark_missing", "output_dir_under_file",
                                  "cache_dir_under_file"])
def test_local_paths_are_checked_before_any_work(case, tmp_path):
    plain = _file(tmp_path)
    pt_folder = tmp_path / "torch-checkpoint"
    pt_folder.mkdir()
    (pt_folder / "config.json").write_text("{}")
    (pt_folder / "model.pt").write_bytes(b"\0" * 8)
    pretrained = ["model.teacher.source=pretrained"]
    overrides, expected = {
        "model_missing": (pretrained + [f"model.teacher.name_or_path={tmp_path}/qwen"],
                          f"model.teacher.name_or_path='{tmp_path}/qwen': no such folder"),
        "model_is_file": (pretrained + [f"model.teacher.name_or_path={plain}"],
                          f"model.teacher.name_or_path='{plain}': is a file; give the folder"),
        "model_not_safetensors": (pretrained + [f"model.teacher.name_or_path={pt_folder}"],
                                  "no *.safetensors weights (found ['model.pt']); load it and save it again"),
        "benchmark_missing": ([f"+eval.benchmark_paths={{aime24:{tmp_path}/aime.jsonl}}"],
                              f"eval.benchmark_paths.aime24='{tmp_path}/aime.jsonl': no such file"),
        "output_dir_under_file": ([f"output_dir={plain}/out"], f"{plain} is a file, not a folder; choose another output_dir"),
        "cache_dir_under_file": ([f"cache_dir={plain}/cache"], f"{plain} is a file, not a folder; choose another cache_dir"),
    }[case]
    with pytest.raises(ConfigError) as info:
        validate(compose_config(overrides))
    assert expected in str(info.value)


def test_a_hub_id_is_not_mistaken_for_a_missing_folder():
    validate(compose_config(["model.teacher.source=pretrained", "model.teacher.name_or_path=Qwen/Qwen3-8B"]))
    # The same name written as a path is a folder, and a missing one is refused with the key.
    with pytest.raises(ConfigError, match=r"model\.teacher\.name_or_path='\./Qwen/Qwen3-8B': no such folder"):
        validate(compose_config(["model.teacher.source=pretrained", "model.teacher.name_or_path=./Qwen/Qwen3-8B"]))


# --- data -----------------------------------------------------------------------------------------

GOOD = [{"problem": f"p{i}", "reasoning": f"<think>t{i}</think>\\boxed{{{i}}}"} for i in range(3)]


@pytest.mark.parametrize("problem, reasoning, reason", [
    ("p", "thought only</think> 1", "no <think>"),
    ("p", "<think>never closed 1", "no </think>"),
    ("p", "</think>t<think> 1", "</think> before <think>"),
    ("p", "<think>a</think><think>b</think> 1", "repeated marker"),
    ("p", "<think> \n </think> 1", "empty thought"),
    ("p", "<think>t</think>\n  ", "empty answer"),
    ("p <think>", "<think>t</think> 1", "marker in the problem"),
])
def test_a_record_with_unusable_markers_is_dropped_counted_and_named(tmp_path, problem, reasoning, reason):
    path = tmp_path / "records.jsonl"
    rows = GOOD + [{"problem": problem, "reasoning": reasoning}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train, val, report = load_reasoning_dataset(str(path), source="json", n_train=2, n_val=1)
    assert dict(report.dropped) == {reason: 1} and len(train) + len(val) == 3
    assert f"first dropped: record 3: {reason}" in report.summary()
    with pytest.raises(SourceError, match=f"3 usable records.*record 3: {reason}"):  # too few: named too
        load_reasoning_dataset(str(path), source="json", n_train=3, n_val=1)


@pytest.mark.parametrize("source", ["json", "path"])
def test_a_missing_data_path_names_the_key(tmp_path, source):
    target = tmp_path / "none.jsonl" if source == "json" else _file(tmp_path)  # a file is no dataset folder
    what = "no such file; data.source=json reads" if source == "json" else "no such folder; data.source=path reads"
    with pytest.raises(SourceError) as info:
        load_reasoning_dataset(str(target), source=source, n_val=1)
    assert f"data.path='{target}': {what}" in str(info.value)


def test_an_empty_dataset_is_named(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(SourceError, match=f"'{path}' \\(json\\) holds no rows: point data.path at"):
        load_reasoning_dataset(str(path), source="json", n_val=1)


def test_a_line_that_is_not_json_is_named_with_file_and_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(GOOD[0]) + "\n{\"problem\": \"p\", \"reasoning\n")
    with pytest.raises(SourceError, match=f"{path}:2: not valid JSON"):
        load_reasoning_dataset(str(path), source="json", n_val=1)


def test_all_examples_longer_than_the_limit_name_the_key_and_the_fix():
    with pytest.raises(data.DataError) as info:
        data.encode(make_split(4, seed=0), build_tokenizer(), max_tokens=5)
    assert "4 longer than data.max_tokens=5" in str(info.value) and "raise data.max_tokens" in str(info.value)


def _tokenizer_without_markers():
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from kd_sweeps.tokenizer import CHAT_TEMPLATE

    backend = Tokenizer(tok_models.WordLevel({"<unk>": 0, "<pad>": 1, "hi": 2}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def test_a_tokenizer_without_the_markers_is_named_with_the_fix():
    with pytest.raises(data.DataError) as info:
        data.encode(make_split(2, seed=0), _tokenizer_without_markers(), 4096)
    assert "has no single token for '<think>'" in str(info.value)
    assert "model.student.name_or_path" in str(info.value) and "add_special_tokens" in str(info.value)


def test_a_tokenizer_without_a_chat_template_is_named_with_the_fix():
    tokenizer = build_tokenizer()
    tokenizer.chat_template = None
    with pytest.raises(data.DataError, match="has no chat template.*set tokenizer.chat_template"):
        data.encode(make_split(2, seed=0), tokenizer, 4096)


# --- models ---------------------------------------------------------------------------------------

def _pretrained_cfg(teacher: str, student: str):
    return compose_config(["model.teacher.source=pretrained", f"model.teacher.name_or_path={teacher}",
                           "model.student.source=pretrained", f"model.student.name_or_path={student}"])


def test_an_output_layer_smaller_than_the_vocabulary_fails_before_any_weights_load(tiny_hub, tmp_path):
    from transformers import AutoTokenizer

    teacher = tmp_path / "short-head"
    shutil.copytree(tiny_hub, teacher)
    config = json.loads((teacher / "config.json").read_text())
    (teacher / "config.json").write_text(json.dumps({**config, "vocab_size": 50}))
    (teacher / "model.safetensors").unlink()  # were the weights read, the error would be about this file
    cfg = _pretrained_cfg(str(teacher), str(tiny_hub))
    with pytest.raises(models.ModelError) as info:
        models.load_pair(cfg, AutoTokenizer.from_pretrained(tiny_hub), torch.device("cpu"))
    assert f"model.teacher ('{teacher}') has an output layer of 50 rows, fewer than the" in str(info.value)
    assert "vocab_size covers its tokenizer" in str(info.value)


def test_a_damaged_checkpoint_names_the_key_and_the_folder(tiny_hub, tmp_path):
    folder = tmp_path / "damaged"
    shutil.copytree(tiny_hub, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(models.ModelError) as info:
        models.load_pretrained(str(folder), "sdpa", False, torch.float32, "cpu", key="model.teacher.name_or_path")
    assert f"model.teacher.name_or_path='{folder}' could not be loaded" in str(info.value)
    assert "save them again with save_pretrained" in str(info.value)


def test_a_hub_id_that_cannot_be_reached_names_the_key():
    cfg = _pretrained_cfg("org/no-such-model", "org/no-such-model")
    with pytest.raises(models.ModelError, match="(?s)model.student.name_or_path='org/no-such-model' could "
                                                "not be loaded.*HF_HUB_OFFLINE"):
        models.load_tokenizer(cfg, Path("unused"))


# --- caches ---------------------------------------------------------------------------------------

def test_a_damaged_model_cache_is_rebuilt(tmp_path, caplog, monkeypatch):
    builds = []  # the preparation itself (training, evaluation) is not what is tested: count it only
    monkeypatch.setattr(models, "_prepare", lambda model, *args: builds.append(1) or {"accuracy": 0.0})
    tokenizer = models.embedded_tokenizer(tmp_path)
    folder = Path(models.prepare_embedded(TINY_SPEC, "base", tokenizer, tmp_path, "sdpa", "cpu").path)
    weights = folder / "model.safetensors"
    for damage in (lambda: weights.write_bytes(weights.read_bytes()[:100]),
                   lambda: (folder / "prep.json").write_text("{\"role\": ")):
        damage()  # (the loaded model maps the old file; truncating it in place is safe only once it is gone)
        with caplog.at_level(logging.WARNING, logger="kd_sweeps.models"):
            again = models.prepare_embedded(TINY_SPEC, "base", tokenizer, tmp_path, "sdpa", "cpu")
        assert f"cache {folder} is damaged" in caplog.text and "rebuilding it" in caplog.text
        caplog.clear()
        assert again.info["built_by_pid"] == os.getpid() and type(again.model).__name__ == "Qwen3ForCausalLM"
        del again
    assert len(builds) == 3 and models.prepare_embedded(TINY_SPEC, "base", tokenizer, tmp_path, "sdpa", "cpu")
    assert len(builds) == 3  # the rebuilt cache is used as it is


def test_a_damaged_tokenizer_cache_and_a_killed_builds_leftovers_are_replaced(tmp_path):
    tokenizer = models.embedded_tokenizer(tmp_path)
    folder = tmp_path / f"tokenizer-{models.TASK_VERSION}"
    (folder / "tokenizer.json").write_text("{\"truncated")
    leftover = tmp_path / f"{folder.name}.tmp999999"  # a build whose process was killed
    leftover.mkdir()
    again = models.embedded_tokenizer(tmp_path)
    assert again.get_vocab() == tokenizer.get_vocab() and not leftover.exists()


def test_a_damaged_teacher_cache_is_rebuilt(tmp_path, caplog):
    tokenizer = build_tokenizer()
    teacher, encoded = tiny_model(tokenizer, seed=0), encoded_split(tokenizer, 6, seed=1)
    folder = tmp_path / "teacher-topk"
    first = teacher_cache_build.build_cache(teacher, encoded, folder, 4, 1.0, 3, "cpu", shard_size=4)
    shard, expected = folder / first.meta["shards"][1]["file"], first.rows(5, 0, 3)[1].clone()
    del first  # it maps the shard: truncating a mapped file in place would crash this process (SIGBUS)
    shard.write_bytes(shard.read_bytes()[:64])
    with caplog.at_level(logging.WARNING, logger="kd_sweeps.teacher_cache_build"):
        again = teacher_cache_build.build_cache(teacher, encoded, folder, 4, 1.0, 3, "cpu", shard_size=4)
    assert again.built and f"{shard} is missing or truncated" in caplog.text and "rebuilding it" in caplog.text
    assert torch.equal(again.rows(5, 0, 3)[1], expected)


LOCK_HOLDER = """
import sys, time
from pathlib import Path
from kd_sweeps import models, teacher_cache_build
lock = getattr({module}, "_lock")(Path(sys.argv[1]))
lock.acquire()
print("held", flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize("module", ["models", "teacher_cache_build"])
def test_a_lock_held_by_a_killed_process_does_not_block_the_next_run(tmp_path, module):
    from filelock import Timeout

    owner = getattr(models if module == "models" else teacher_cache_build, "_lock")
    path = tmp_path / f"tokenizer-{models.TASK_VERSION}"
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER.format(module=module), str(path)],
                              stdout=subprocess.PIPE, text=True, env=child_env())
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(Timeout):  # really held: a live holder does block
            owner(path).acquire(timeout=0.2)
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
    assert Path(str(path) + ".lock").exists()  # the stale lock file is still there...
    started = time.perf_counter()
    with owner(path).acquire(timeout=5):  # ...and does not block
        pass
    if module == "models":
        models.embedded_tokenizer(tmp_path)  # the real cached build behind that lock goes through
    assert time.perf_counter() - started < 5


# --- tracking -------------------------------------------------------------------------------------

WANDB_ONLINE = """
import sys, time
from pathlib import Path
from omegaconf import OmegaConf
from kd_sweeps.tracking import Tracker
logger = OmegaConf.create({"mode": "online", "project": "kd-sweeps", "entity": None, "tags": []})
started = time.perf_counter()
try:
    with Tracker(Path(sys.argv[1]), "abc123", "s", {"trunc": 1.0}, logger):
        print("the run must not start training without its tracker")
except RuntimeError as err:
    print(f"{time.perf_counter() - started:.1f}s", err)
"""


@pytest.mark.slow  # a subprocess that starts W&B online (about 5 s)
def test_wandb_unreachable_online_fails_fast_names_the_mode_and_is_recorded(tmp_path):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # In a child: W&B keeps process-wide state (its service) that must not leak into other tests.
    env = {**child_env(), "WANDB_BASE_URL": f"http://127.0.0.1:{port}", "WANDB_API_KEY": "k" * 40,
           "WANDB_INIT_TIMEOUT": "3", "WANDB_CONFIG_DIR": str(tmp_path / "config")}
    env.pop("WANDB_MODE", None)
    child = subprocess.run([sys.executable, "-c", WANDB_ONLINE, str(tmp_path / "point")], env=env,
                           capture_output=True, text=True, timeout=120)
    seconds, _, message = child.stdout.strip().partition("s ")
    assert float(seconds) < 30, child.stdout + child.stderr
    assert "logger.mode=online: W&B did not start" in message and "run with logger.mode=offline" in message
    result = json.loads((tmp_path / "point" / RESULT_FILE).read_text())
    assert result["status"] == "failed" and "logger.mode=online" in result["error"]


DISK_FILLER = """
import json, resource, signal, sys
from pathlib import Path
import torch
from safetensors.torch import save_file
from omegaconf import OmegaConf
from kd_sweeps.tracking import Tracker
out, limit = Path(sys.argv[1]), int(sys.argv[2])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, like ENOSPC
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
logger = OmegaConf.create({"mode": "disabled", "project": "p", "entity": None, "tags": []})
with Tracker(out, "abc123", "s", {"trunc": 1.0}, logger):
    (out / "checkpoint").mkdir(exist_ok=True)
    save_file({"w": torch.zeros(64, 1024)}, str(out / "checkpoint" / "model.safetensors"))  # 256 KiB
"""


@pytest.mark.parametrize("limit", [64 * 1024, 100])
def test_a_disk_that_fills_mid_run_fails_clearly_and_keeps_a_readable_result(tmp_path, limit):
    previous = {"run_id": "abc123", "status": "ok", "summary": {"accuracy": 0.5, "pad": "x" * 4096}}
    write_json_atomic(tmp_path / RESULT_FILE, previous)
    child = subprocess.run([sys.executable, "-c", DISK_FILLER, str(tmp_path), str(limit)], env=child_env(),
                           capture_output=True, text=True, timeout=120)
    assert child.returncode != 0 and "File too large" in child.stderr
    result = json.loads((tmp_path / RESULT_FILE).read_text())  # never half a file
    assert not list(tmp_path.glob(f".{RESULT_FILE}.*"))  # no temporary file left behind
    if limit > 8192:  # room for the record: the failure is recorded, with where and what to do
        assert result["status"] == "failed" and "File too large" in result["error"]
        assert f"output_dir={tmp_path}: free disk space" in result["error"]
    else:  # not even the record fits: the previous complete one is still there, intact
        assert result == previous


def test_a_damaged_result_json_makes_the_point_run_again(tmp_path):
    from kd_sweeps.point_record import read_result

    (tmp_path / RESULT_FILE).write_text('{"run_id": "abc123", "status": "o')  # a copy cut short
    assert read_result(tmp_path) is None  # not "done": run.main trains the point again instead of skipping it
