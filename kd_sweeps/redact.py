"""Secrets never leave the process: every record (result.json, the W&B run, Hydra's saved config)
goes through ``redact`` first.

A secret is (1) the value of an environment variable whose name looks secret (``WANDB_API_KEY``,
``HF_TOKEN``, ``*_TOKEN``, ``*_KEY``, ``*_SECRET``, ``*PASSWORD*``), wherever it appears; (2) a
string shaped like a well-known token (Hugging Face ``hf_…``, GitHub ``ghp_…`` / ``github_pat_…``,
``sk-…`` API keys, AWS ``AKIA…`` key ids, Slack ``xox…-``); (3) any string stored under a key that
looks secret (``api_key: …``, ``extra.wandb_key=…``), such as a W&B key (40 hex digits).
Each is replaced by ``REDACTED``; numbers, paths and the rest of the config are left as they are.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping, Optional

REDACTED = "<redacted>"
# Names of secret-holding variables or config keys, matched on the last dotted component.
_SECRET_NAME = re.compile(r"(?:^|[_-])(?:token|key|secret|apikey)$|password|passwd|secret|credential", re.I)
# Well-known token shapes; each is long enough that ordinary config values never match.
_TOKEN_PATTERNS = re.compile("|".join((
    r"\bhf_[A-Za-z0-9]{20,}",                 # Hugging Face user/org tokens
    r"\bgh[pousr]_[A-Za-z0-9]{30,}",          # GitHub classic tokens
    r"\bgithub_pat_[A-Za-z0-9_]{20,}",        # GitHub fine-grained tokens
    r"\bsk-[A-Za-z0-9_-]{20,}",               # OpenAI / Anthropic style API keys
    r"\bAKIA[0-9A-Z]{16}\b",                  # AWS access key ids
    r"\bxox[abposr]-[A-Za-z0-9-]{10,}",       # Slack tokens
)))
# ``name=value`` or ``name: value`` in free text (overrides, error messages) with a secret name.
_NAMED_VALUE = re.compile(r"(?<![A-Za-z0-9_.+-])((?:[A-Za-z0-9_.+-]*[_.+-])?"
                          r"(?:token|key|secret|password|passwd|credential|apikey)[\"']?\s*[=:]\s*[\"']?)"
                          r"([^\s\"',}]+)", re.I)
_MIN_ENV_SECRET = 8  # shorter values ("1", "true") would match everywhere and protect nothing


def looks_secret(name: str) -> bool:
    """Whether a variable or config key name says it holds a secret (``hf_token``, ``WANDB_API_KEY``).
    Counters such as ``max_new_tokens`` or ``teacher_topk`` do not."""
    return bool(_SECRET_NAME.search(name.rsplit(".", 1)[-1].lstrip("+~")))


def env_secrets(environ: Optional[Mapping[str, str]] = None) -> list[str]:
    """Values of the secret-looking environment variables, longest first."""
    environ = os.environ if environ is None else environ
    values = {v for k, v in environ.items() if looks_secret(k) and len(v) >= _MIN_ENV_SECRET}
    return sorted(values, key=len, reverse=True)


def redact_text(text: str, secrets: Optional[list[str]] = None) -> str:
    """``text`` with every secret replaced by REDACTED."""
    for secret in env_secrets() if secrets is None else secrets:
        text = text.replace(secret, REDACTED)
    text = _TOKEN_PATTERNS.sub(REDACTED, text)
    return _NAMED_VALUE.sub(lambda m: m.group(1) + (REDACTED if m.group(2) != REDACTED else m.group(2)), text)


def redact(value: Any, secrets: Optional[list[str]] = None, _key: str = "") -> Any:
    """A copy of ``value`` (dicts, lists, strings, numbers) with every secret replaced by REDACTED."""
    secrets = env_secrets() if secrets is None else secrets
    if isinstance(value, str):
        return REDACTED if value and looks_secret(_key) else redact_text(value, secrets)
    if isinstance(value, Mapping):
        return {k: redact(v, secrets, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v, secrets, _key) for v in value]
    return value


def redact_yaml_files(folder: Path) -> None:
    """Rewrite the YAML files Hydra saved in ``folder`` (config.yaml, hydra.yaml, overrides.yaml,
    multirun.yaml) without secrets. Hydra writes them before any of our code runs, so they are
    rewritten in place (atomically), and only when something was found."""
    import yaml

    from kd_sweeps.record_files import write_text_atomic

    for path in sorted(Path(folder).glob("*.yaml")):
        text = path.read_text()
        content = yaml.safe_load(text)
        clean = redact(content)
        if clean != content:
            write_text_atomic(path, yaml.safe_dump(clean, sort_keys=False, allow_unicode=True))
