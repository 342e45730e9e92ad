"""What ``python launch.py --help`` shows, and "did you mean" for a key the config does not have.

Every key's meaning is written once, as the comment beside its field in ``kd_sweeps/schema.py``;
the help reads those comments from the source at help time (resolver ``${kd_key_help:}`` in
``conf/hydra/help/kd_sweeps.yaml``), so it cannot drift from the schema.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import io
import re
import sys
import textwrap
import tokenize
import typing
from contextlib import contextmanager
from functools import lru_cache
from typing import Iterator, Optional

_COMMENT_WIDTH = 100  # characters of a key's comment shown in --help; the schema has the whole text
_OPEN_NODES = ("extra", "eval.benchmark_paths")  # free-form dicts: any key below them is allowed


def _field_comments(source: str) -> dict[tuple[str, str], str]:
    """{(class, field): comment} for each annotated field of each class in ``source``: the comment on
    its own line, else the comment block right above it."""
    comments = {tok.start[0]: tok.string.lstrip("# ").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    lines = source.splitlines()
    found = {}
    for cls in (n for n in ast.parse(source).body if isinstance(n, ast.ClassDef)):
        for node in (n for n in cls.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)):
            text = comments.get(node.lineno, "")
            line = node.lineno - 1  # 1-based line numbers: the one above this field
            block = []
            while not text and line in comments and lines[line - 1].lstrip().startswith("#"):
                block.insert(0, comments[line])
                line -= 1
            found[(cls.name, node.target.id)] = text or " ".join(block)
    return found


def _schema_fields(cls: type, prefix: str = "") -> Iterator[tuple[str, type, str, type]]:
    """(dotted key, its class, field name, type) for every field of the schema, depth first."""
    for name, hint in typing.get_type_hints(cls).items():
        yield prefix + name, cls, name, hint
        if dataclasses.is_dataclass(hint):
            yield from _schema_fields(hint, prefix + name + ".")


@lru_cache(maxsize=1)
def schema_keys() -> dict[str, str]:
    """{dotted key: comment} for every key of the schema, nodes (``train``) and leaves (``train.lr``)."""
    from kd_sweeps import schema

    comments = _field_comments(inspect.getsource(schema))
    return {key: comments.get((cls.__name__, name), "") for key, cls, name, _ in _schema_fields(schema.Config)}


@lru_cache(maxsize=1)
def schema_choices() -> dict[str, tuple[str, ...]]:
    """{dotted key: its allowed values} for every key the schema types by a closed choice
    (``kd_sweeps.choices``), alone (``loss.name``) or as a list's items (``eval.baselines``)."""
    from enum import Enum

    from kd_sweeps import schema
    from kd_sweeps.choices import values

    found: dict[str, tuple[str, ...]] = {}
    for key, _, _, hint in _schema_fields(schema.Config):
        inner = (typing.get_args(hint) or (hint,))[0] if typing.get_origin(hint) is list else hint
        if isinstance(inner, type) and issubclass(inner, Enum):
            found[key] = values(inner)
    return found


def _shown_value(root, key: str) -> str:
    """The key's composed value as one would type it on the command line (null, true, [P, CoT])."""
    import yaml
    from omegaconf import OmegaConf

    try:
        value = OmegaConf.select(root, key, throw_on_missing=True)
    except Exception:  # noqa: BLE001 - MISSING (???) or an interpolation help cannot resolve
        return "???"
    value = OmegaConf.to_container(value, resolve=True, enum_to_str=True) if OmegaConf.is_config(value) else value
    if isinstance(value, str):
        value = str(value)  # a choice (kd_sweeps.choices) as its plain string
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()  # a scalar document ends with "..."


def _first_sentence(comment: str) -> str:
    sentence = re.split(r"(?<=[a-z0-9)])\. (?=[A-Z])", comment, maxsplit=1)[0].rstrip(".")  # not "e.g. x"
    return textwrap.shorten(sentence, _COMMENT_WIDTH, placeholder=" …")


def _leaves(keys) -> list[str]:
    """The keys that hold values (``train.lr``), not those that hold other keys (``train``)."""
    return [k for k in keys if not any(other.startswith(k + ".") for other in keys)]


def key_help(root) -> str:
    """One line per leaf key of the schema: ``key = value  # comment``, the value as composed."""
    keys = schema_keys()
    leaves = _leaves(keys)
    rows = [(f"{key} = {_shown_value(root, key)}", keys[key]) for key in leaves]
    width = min(44, max(len(left) for left, _ in rows))
    lines = [f"  {left:<{width}}  # {_first_sentence(note)}" if note else f"  {left}"
             for left, note in rows]
    return "\n".join(lines).replace("$", "$$")  # Hydra fills the template with string.Template


def key_help_resolver(*, _root_) -> str:
    """OmegaConf resolver ``${kd_key_help:}`` for the help template."""
    return key_help(_root_)


def register_help() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("kd_key_help"):
        OmegaConf.register_new_resolver("kd_key_help", key_help_resolver)


def _groups() -> dict[str, list[str]]:
    """{group: its choices}, from the files in conf/<group>/."""
    from pathlib import Path

    conf = Path(__file__).resolve().parents[1] / "conf"
    return {d.name: sorted(p.stem for p in d.glob("*.yaml")) for d in conf.iterdir()
            if d.is_dir() and d.name != "hydra"}


def suggestions(overrides: list[str]) -> list[str]:
    """For each override naming a key the schema does not have (or a group choice that does not
    exist), one line with the closest names; nothing for overrides that are fine."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    keys, groups, choices = schema_keys(), _groups(), schema_choices()
    leaves = _leaves(keys)
    lines = []
    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.key_or_group
        if key.split(".")[0].split("/")[0] == "hydra" or _below_open_node(key) or override.is_delete():
            continue
        if key in choices:
            lines += _choice_lines(key, override, choices[key])
            continue
        if key in groups and not override.is_sweep_override():
            choice = override.value()
            if isinstance(choice, str) and choice not in groups[key]:
                close = difflib.get_close_matches(choice, groups[key], n=3, cutoff=0.5)
                lines.append(f"{key}={choice}: no such choice; {_did_you_mean(close, key + '=')}"
                             f"choices: {', '.join(groups[key])}")
            continue
        if key in keys or key in groups:
            continue
        close = difflib.get_close_matches(key, leaves, n=3, cutoff=0.75)
        if not close:  # the name misplaced (lr -> train.lr) or misspelt without its place (max_step)
            names = set(difflib.get_close_matches(key.rsplit(".", 1)[-1], [k.rsplit(".", 1)[-1] for k in leaves],
                                                  cutoff=0.8))
            close = [k for k in leaves if k.rsplit(".", 1)[-1] in names][:4]
        lines.append(f"{key}: no such key; {_did_you_mean(close)}"
                     "`python launch.py --help` lists every key")
    return lines


def _choice_lines(key: str, override, allowed: tuple[str, ...]) -> list[str]:
    """A line for each value of a closed-choice key that is not one of its values (sweeps and lists too)."""
    given = list(override.sweep_string_iterator()) if override.is_sweep_override() else [override.value()]
    flat = [item for value in given for item in (value if isinstance(value, list) else [value])]
    lines = []
    for value in flat:
        if isinstance(value, str) and value not in allowed:
            close = difflib.get_close_matches(value, allowed, n=3, cutoff=0.5)
            lines.append(f"{key}={value}: not a choice; {_did_you_mean(close, key + '=')}"
                         f"choices: {', '.join(allowed)}")
    return lines


def _below_open_node(key: str) -> bool:
    return any(key == node or key.startswith(node + ".") for node in _OPEN_NODES)


def _did_you_mean(close: list[str], prefix: str = "") -> str:
    return f"did you mean {' or '.join(f'`{prefix}{c}`' for c in close)}? " if close else ""


@contextmanager
def did_you_mean(argv: Optional[list[str]] = None) -> Iterator[None]:
    """Around ``hydra.main``: when it exits with an error (Hydra reports an unknown key, then exits
    1), name the closest keys or choices for each override that names none."""
    try:
        yield
    except SystemExit as stop:
        if stop.code not in (None, 0):
            _print_suggestions(sys.argv[1:] if argv is None else argv)
        raise
    except Exception:  # HYDRA_FULL_ERROR=1: Hydra raises instead of exiting
        _print_suggestions(sys.argv[1:] if argv is None else argv)
        raise


def command_line_overrides(argv: list[str]) -> list[str]:
    """The overrides among Hydra's command-line arguments: ``key=value``, ``+key=value``, ``~key``.
    Options (``-m``, ``--config-name=x``, ``-cn x``) start with ``-``; an option's separate value
    (``x`` above) holds no ``=`` and is no override either."""
    return [arg for arg in argv if not arg.startswith("-") and ("=" in arg or arg.startswith("~"))]


def _print_suggestions(argv: list[str]) -> None:
    try:
        lines = suggestions(command_line_overrides(argv))
    except Exception:  # noqa: BLE001 - a hint must never hide Hydra's own error message
        return
    for line in lines:
        print(line, file=sys.stderr)
