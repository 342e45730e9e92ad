"""Reference accuracies: the student before KD ("step 0") and the teacher, evaluated exactly as the
grid points are (same benchmarks, problems, prompt, sampling and engine), for any model source.

A grid point's distance from these two is what a researcher reads first: a point below the student
it started from has been hurt by KD, and "% of teacher" is only meaningful against the teacher
evaluated the same way. Each reference is measured once per (model, evaluation settings) and cached
in ``<cache_dir>/baselines/`` (its completions in ``eval/``, its summary in ``summary.json``): the
first point of a sweep to reach it measures it, later points and later sweeps read it. A point that
finds another process measuring it does not wait (at paper scale the teacher's evaluation takes
hours): its record goes without that reference, and the analysis takes it from the runs that have it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from kd_sweeps.choices import Baseline, values
from kd_sweeps.identity import NON_IDENTITY_EVAL_KEYS  # where and how the evaluation runs: no completion changes
from kd_sweeps.record_files import write_json_atomic

log = logging.getLogger(__name__)

ROLES = values(Baseline)  # the choices of eval.baselines
PREFIX = {"student": "base", "teacher": "teacher"}  # summary keys: base_accuracy, teacher_accuracy


def baseline_folder(cfg: DictConfig, role: str, model_path: str) -> Path:
    """Where the reference of ``role`` (the model at ``model_path``) under this evaluation is cached."""
    evaluation = {k: v for k, v in OmegaConf.to_container(cfg.eval, resolve=True).items() if k not in NON_IDENTITY_EVAL_KEYS}
    fields = {"role": role, "model": model_version(model_path), "eval": evaluation,
              # sampled completions depend on the seed; greedy ones do not
              "seed": cfg.seed if cfg.eval.temperature > 0 else None,
              # the embedded benchmark is the data's held-out split
              "data": OmegaConf.to_container(cfg.data, resolve=True) if "synthetic" in cfg.eval.benchmarks else None}
    key = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Path(cfg.cache_dir).expanduser() / "baselines" / f"{role}-{key}"


def model_version(model_path: str) -> str:
    """What names one version of a model's weights: for a hub id its snapshot folder in the local
    Hugging Face cache (``…/snapshots/<revision>``: a new revision of the same id is another
    reference); for a local folder its path with the size and modification time of each weight
    file (the folder saved again is another reference); else the id as given."""
    folder = Path(model_path).expanduser()
    if not folder.is_dir():
        try:
            return str(local_folder(model_path))
        except FileNotFoundError:  # not cached: the measurement names it; the id keys nothing real
            return str(model_path)
    weights = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin"))
    return json.dumps([str(model_path), [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in weights]])


def local_folder(model_path: str) -> Path:
    """The folder holding a model's files: ``model_path`` itself, or for a hub id its snapshot in the
    local Hugging Face cache (the run loaded it from there; nothing is downloaded here). The
    evaluation keys its resumable results by the files' bytes, so it needs them on disk."""
    if Path(model_path).expanduser().is_dir():
        return Path(model_path).expanduser()
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(model_path), local_files_only=True))
    except Exception as err:  # noqa: BLE001 - the library's not-cached errors vary by version
        raise FileNotFoundError(f"{model_path!r} is neither a local folder nor in the local Hugging Face cache "
                                f"({type(err).__name__}); load it once (or set HF_HOME to where it is)") from err


def measure(cfg: DictConfig, role: str, model_path: str, tokenizer, device, eval_sets: dict) -> dict | None:
    """The evaluation summary of the untrained ``role`` model (``evaluate.evaluate_model``'s keys: the
    function that evaluates the grid points), from the cache or measured now; None when another
    process is measuring it at this moment."""
    from filelock import FileLock, Timeout

    from kd_sweeps import evaluate, selection

    folder = baseline_folder(cfg, role, model_path)
    folder.mkdir(parents=True, exist_ok=True)
    done = folder / "summary.json"
    try:
        with FileLock(str(folder) + ".lock", timeout=0):
            if done.exists():
                try:
                    return json.loads(done.read_text())
                except ValueError:  # a damaged file: measured again (its completions resume from eval/)
                    log.warning("reference %s is damaged; evaluating %s again", done, role)
            started = time.perf_counter()
            files = local_folder(model_path)
            engine = evaluate.resolve_engine(cfg.eval.engine, device)
            model = None if engine == "vllm" else selection.load_checkpoint(files, device,
                                                                            cfg.model.attn_implementation)
            summary = evaluate.evaluate_model(cfg, model, tokenizer, eval_sets, device, files, folder / "eval")
            summary.update(model=str(model_path), seconds=time.perf_counter() - started, eval_engine=engine)
            write_json_atomic(done, summary)
            log.info("reference %s (%s): accuracy %.3f, measured in %.0f s", role, model_path,
                     summary["accuracy"], summary["seconds"])
            return summary
    except Timeout:
        log.info("reference %s is being measured by another process; this point records none", role)
        return None


def reference_summary(cfg: DictConfig, paths: dict[str, str], tokenizer, device, eval_sets: dict) -> dict:
    """``base_accuracy`` / ``teacher_accuracy`` (+ ``_stderr``, per benchmark, and the seconds the one
    measurement took) for the roles in ``eval.baselines``; ``paths``: role -> folder or hub id."""
    summary: dict = {}
    for role in cfg.eval.baselines:
        prefix = PREFIX[role]
        try:
            found = measure(cfg, role, paths[role], tokenizer, device, eval_sets)
        except Exception as err:  # noqa: BLE001 - a reference that cannot be measured must not fail the point
            log.warning("reference %s (%s) not measured: %s: %s", role, paths[role], type(err).__name__, err)
            summary[f"{prefix}_reference_error"] = f"{type(err).__name__}: {err}"
            continue
        if found is None:
            continue
        summary[f"{prefix}_accuracy"] = found["accuracy"]
        summary[f"{prefix}_accuracy_stderr"] = found["accuracy_stderr"]
        for bench in cfg.eval.benchmarks:
            summary[f"{prefix}/{bench}/accuracy"] = found[f"eval/{bench}/accuracy"]
            summary[f"{prefix}/{bench}/stderr"] = found[f"eval/{bench}/stderr"]
        summary[f"{prefix}_eval_seconds"] = found["seconds"]
    return summary
