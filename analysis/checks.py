"""Which runs form a curve, and the refusal to draw one through runs that are not comparable.

A curve (one sections preset, or one preset per value of the group_by columns)
stands for one setting varied along trunc; runs that also differ in the
teacher, the student, the data or the loss would be averaged into the same
points and the curve would describe none of them.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import pandas as pd

# What must be equal within a curve. The first four change what the student
# learns from; the rest change the objective or which tokens it sees, so a
# point averaging over them is as meaningless.
COMPARABLE = ("teacher", "student", "dataset", "loss", "kd_ratio", "temperature",
              "truncation_mode", "cut_after_think")

# Every other config key can change a result too, unless it is named here: where or how a run is
# kept and logged, how many processes, threads or micro-batches compute the same numbers (up to
# float rounding), and the curve's own axes (trunc along x, seed averaged over, sections one curve
# each). A key added to the schema is compared until someone lists it here.
NOT_RESULT_KEYS = ("logger", "output_dir", "cache_dir", "sweep", "extra", "force", "eval.job",
                   "eval.separate_job", "eval.batch_size", "data.num_proc", "train.num_threads",
                   "train.log_every", "train.checkpoint_every", "train.micro_batch_size",
                   "train.activation_checkpointing", "train.teacher_parallel", "model.name",
                   "model.trust_remote_code", "trunc", "seed", "sections",
                   "eval.baselines", "distill.batch_size", "data.assumed_lengths")
# Config keys a COMPARABLE column already checks (analysis.load reads the column from there).
COLUMN_KEYS = {"teacher": "model.teacher.name_or_path", "student": "model.student.name_or_path",
               "dataset": "data.name", "loss": "loss.name", "kd_ratio": "loss.kd_ratio",
               "temperature": "loss.temperature", "truncation_mode": "truncation.mode",
               "cut_after_think": "truncation.cut_after_think"}
_RESULT_KEYS: tuple[str, ...] = ()


def result_keys() -> tuple[str, ...]:
    """Dotted config keys that can change a run's result: the schema's leaves less NOT_RESULT_KEYS
    (and less those a COMPARABLE column covers). A dict-valued key is one leaf."""
    global _RESULT_KEYS
    if not _RESULT_KEYS:
        from omegaconf import DictConfig, OmegaConf

        from kd_sweeps.schema import Config

        def leaves(node, prefix: str) -> Iterable[str]:
            for key in node.keys():
                child = node._get_node(key)
                name = f"{prefix}{key}"
                if isinstance(child, DictConfig) and OmegaConf.get_type(child) is not dict:
                    yield from leaves(child, name + ".")
                else:
                    yield name

        skip = set(COLUMN_KEYS.values())
        _RESULT_KEYS = tuple(k for k in leaves(OmegaConf.structured(Config), "") if k not in skip
                             and not any(k == n or k.startswith(n + ".") for n in NOT_RESULT_KEYS))
    return _RESULT_KEYS


def settings_json(config) -> str | None:
    """The run's result_keys() values as canonical JSON (the ``settings`` column); None without a
    config. Keys the run's config lacks are left out (an older run: unknown, not different)."""
    import json

    if not isinstance(config, dict) or not config:
        return None
    found = {}
    for key in result_keys():
        node = config
        for part in key.split("."):
            node = node.get(part, _ABSENT) if isinstance(node, dict) else _ABSENT
        if node is _ABSENT and key in config:  # a config flattened by a logger
            node = config[key]
        if node is not _ABSENT:
            found[key] = node
    return json.dumps(found, sort_keys=True, default=str)


_ABSENT = object()


def setting_values(df: pd.DataFrame, key: str) -> pd.Series:
    """One config key's value per run (from the settings column), as text; missing: None."""
    import json

    if "settings" not in df:
        return pd.Series(None, index=df.index, dtype=object)

    def one(text):
        if not isinstance(text, str):
            return None
        value = json.loads(text).get(key, _ABSENT)
        return None if value is _ABSENT else json.dumps(value, sort_keys=True)
    return df["settings"].map(one).astype(object)


def varying_keys(df: pd.DataFrame) -> list[str]:
    """COMPARABLE columns and config keys whose value differs between the ok runs of ``df``
    (a sweep over them: one curve per value)."""
    ok = ok_runs(df)
    columns = [c for c in COMPARABLE if c in ok and ok[c].astype(str).nunique() > 1]
    keys = [k for k in result_keys() if setting_values(ok, k).dropna().nunique() > 1]
    return columns + keys


# distill.mode (kd_sweeps/distill.py) as a config key and as the runs frame's column.
DISTILL_KEY, DISTILL_COLUMN = "distill.mode", "distill_mode"


def varies_distill(df: pd.DataFrame) -> bool:
    """Whether the ok runs differ in distill.mode (offline / sequence / on_policy)."""
    ok = ok_runs(df)
    return DISTILL_COLUMN in ok and ok[DISTILL_COLUMN].dropna().nunique() > 1


def sweep_curves(df: pd.DataFrame) -> list[str]:
    """The group_by that draws a sweep one curve per varied setting: varying_keys, where a sweep over
    distill.mode is split by its column (labels ``distill_mode=on_policy``) and the distill.* keys its
    presets set along with the mode (lmbda, temperature) split no further where each mode has one
    value of them. They stay result keys: check_comparable still refuses a mode whose runs differ."""
    varying = varying_keys(df)
    if DISTILL_KEY not in varying or DISTILL_COLUMN not in df:
        return varying
    ok = ok_runs(df)
    mode = ok[DISTILL_COLUMN].astype(object).where(ok[DISTILL_COLUMN].notna(), "?")

    def follows_mode(key: str) -> bool:
        return bool((setting_values(ok, key).groupby(mode).nunique(dropna=False) <= 1).all())

    rest = [k for k in varying if k != DISTILL_KEY and not (k.startswith("distill.") and follows_mode(k))]
    return [DISTILL_COLUMN, *rest]


def ok_runs(df: pd.DataFrame) -> pd.DataFrame:
    """The runs that finished (status ok); the only ones figures and tables draw on."""
    status = df["status"] if "status" in df else pd.Series("ok", index=df.index)
    return df[(status == "ok").fillna(False).to_numpy()]


def as_columns(group_by: str | Iterable[str] | None) -> list[str]:
    """group_by as a list of column names (None -> [], 'a' -> ['a'])."""
    if group_by is None:
        return []
    if isinstance(group_by, str):
        return [group_by]
    return list(group_by)


def preset_labels(df: pd.DataFrame) -> pd.Series:
    """Sections preset name per row, with the included sections appended where one
    name covers several combinations (the 'custom' preset), so lines stay apart."""
    names = df["sections"].astype(object).where(df["sections"].notna(), "unknown") \
        if "sections" in df else pd.Series("unknown", index=df.index, dtype=object)
    if "sections_include" not in df:
        return names
    include = df["sections_include"].astype(object)
    ambiguous = include.groupby(names).transform(lambda s: s.nunique(dropna=False) > 1)
    return names.where(~ambiguous.astype(bool), names + " (" + include.fillna("?") + ")")


def curve_keys(df: pd.DataFrame, group_by: str | Iterable[str] | None = None) -> pd.Series:
    """The curve each row belongs to: its sections preset, then each group_by value."""
    labels = preset_labels(df).astype(str)
    for col in as_columns(group_by):
        if col in df.columns:
            values = df[col].astype(object).where(df[col].notna(), "?").astype(str)
        elif col in result_keys():  # a config key: its values from the settings column
            values = setting_values(df, col).where(lambda v: v.notna(), "?").astype(str)
        else:
            raise ValueError(f"group_by column {col!r} is not in the runs frame nor a config key; "
                             f"columns: {', '.join(map(str, df.columns))}")
        labels = labels + f" · {col}=" + values
    return labels


def _distinct(values: pd.Series) -> list[str]:
    # Missing counts as a value of its own: we cannot tell it equals the others.
    shown = values.astype(object).where(values.notna(), None)
    return sorted({"<missing>" if v is None else str(v) for v in shown})


def check_comparable(df: pd.DataFrame, group_by: str | Iterable[str] | None = None,
                     columns: Sequence[str] = COMPARABLE) -> None:
    """Raise ValueError if the runs of one curve differ in any of ``columns``.

    Only ok runs are checked (failed ones are not drawn). A column named in
    ``group_by`` splits the curves, so it can never differ within one. The
    message names every offending column with its distinct values.
    """
    grouped = as_columns(group_by)
    ok = ok_runs(df)
    if ok.empty:
        return
    checked = [c for c in columns if c in ok.columns and c not in grouped]
    keys = [k for k in result_keys() if k not in grouped] if "settings" in ok else []
    problems = []  # (curve, column, distinct values)
    for curve, runs in ok.groupby(curve_keys(ok, grouped), sort=True):
        for col in checked:
            values = _distinct(runs[col])
            if len(values) > 1:
                problems.append((curve, col, values))
        for key in keys:  # every other key that can change a result; unknown (None) is not compared
            values = sorted(set(setting_values(runs, key).dropna()))
            if len(values) > 1:
                problems.append((curve, key, values))
    if problems:
        order = [*columns, *result_keys()]
        differing = sorted({col for _, col, _ in problems}, key=order.index)
        lines = [f"  curve {curve!r}: {col} takes {len(values)} values: "
                 + ", ".join(repr(v) for v in values) for curve, col, values in problems]
        raise ValueError(
            "refusing to draw runs that differ in " + ", ".join(differing)
            + " within one curve:\n" + "\n".join(lines)
            + "\nfilter the runs to one setting, or group by the column(s) so each value "
            f"gets its own curve (group_by={differing!r}, CLI: --group-by "
            + " ".join(differing) + ")")
