"""Small statistics over runs frames; pure functions, no I/O."""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

# What a run shares with its trunc=1.0 reference (the same setting, distill mode included, but trunc).
RETAINED_BY = ("sections", "teacher", "student", "dataset", "truncation_mode", "loss", "distill_mode")
FULL_TRUNC = 1.0


def _finite(values: Iterable) -> np.ndarray:
    """Values as floats with missing ones (None, NaN, pd.NA) dropped."""
    array = pd.to_numeric(pd.Series(list(values), dtype=object), errors="coerce")
    array = array.to_numpy(dtype=float, na_value=np.nan)
    return array[np.isfinite(array)]


def mean_stderr(values: Iterable) -> tuple[float, float]:
    """Mean and standard error of the mean (sample std, ddof=1, over sqrt n).

    Missing values are ignored; the stderr is NaN with fewer than two values,
    because one value says nothing about the spread.
    """
    array = _finite(values)
    if array.size == 0:
        return math.nan, math.nan
    mean = float(array.mean())
    if array.size < 2:
        return mean, math.nan
    return mean, float(array.std(ddof=1) / math.sqrt(array.size))


def bootstrap_ci(values: Iterable, n_boot: int = 2000, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean, reproducible via seed."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    array = _finite(values)
    if array.size == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    resampled = rng.choice(array, size=(n_boot, array.size), replace=True).mean(axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(resampled, [tail, 1 - tail])
    return float(low), float(high)


def _keys(df: pd.DataFrame, by: Sequence[str]) -> list[tuple]:
    # Missing keys compare equal to each other (NaN != NaN would orphan them).
    columns = [df[col].astype(object).where(df[col].notna(), None) for col in by]
    return list(zip(*columns)) if columns else [()] * len(df)


def retained(df: pd.DataFrame, metric: str = "accuracy",
             by: Sequence[str] = RETAINED_BY) -> pd.Series:
    """Each row's metric over that of its trunc == 1.0 reference.

    The reference shares the ``by`` keys (columns absent from df are ignored);
    it is the trunc == 1.0 run with the same seed when there is one, else the
    mean over the reference's seeds.  NaN where no reference has the metric.
    """
    by = [col for col in by if col in df.columns]
    values = pd.to_numeric(df[metric], errors="coerce").astype(float)
    trunc = pd.to_numeric(df["trunc"], errors="coerce").astype(float)
    seeds = df["seed"].astype(object).where(df["seed"].notna(), None) \
        if "seed" in df.columns else pd.Series([None] * len(df), index=df.index)
    is_ref = np.isclose(trunc.to_numpy(), FULL_TRUNC) & values.notna().to_numpy()

    per_seed: dict[tuple, dict] = {}
    for key, seed, value in zip(_keys(df[is_ref], by), seeds[is_ref], values[is_ref]):
        per_seed.setdefault(key, {}).setdefault(seed, []).append(value)
    # Average repeated runs of one seed first, so no seed weighs more than another.
    per_seed = {key: {seed: float(np.mean(v)) for seed, v in runs.items()}
                for key, runs in per_seed.items()}
    overall = {key: float(np.mean(list(runs.values()))) for key, runs in per_seed.items()}

    out = []
    for key, seed, value in zip(_keys(df, by), seeds, values):
        runs = per_seed.get(key)
        if runs is None:
            out.append(math.nan)
            continue
        ref = runs[seed] if seed is not None and seed in runs else overall[key]
        out.append(value / ref if ref != 0 else math.nan)
    return pd.Series(out, index=df.index, dtype=float, name=f"{metric}_retained")


def pareto_front(df: pd.DataFrame, x: str = "train_flops", y: str = "accuracy") -> pd.DataFrame:
    """Rows no other row dominates (≤ x and ≥ y, one strictly), sorted by x.

    Rows missing x or y are left out; exact duplicates do not dominate each
    other, so both stay.
    """
    xs = pd.to_numeric(df[x], errors="coerce").astype(float)
    ys = pd.to_numeric(df[y], errors="coerce").astype(float)
    valid = (xs.notna() & ys.notna()).to_numpy()
    px, py = xs.to_numpy()[valid], ys.to_numpy()[valid]
    # dominated[i, j]: point j dominates point i; O(n^2), fine for sweep-sized grids.
    no_worse = (px[None, :] <= px[:, None]) & (py[None, :] >= py[:, None])
    better = (px[None, :] < px[:, None]) | (py[None, :] > py[:, None])
    on_front = ~(no_worse & better).any(axis=1)
    front = df[valid][on_front]
    order = np.lexsort((-py[on_front], px[on_front]))
    return front.iloc[order]


def normal_ci(mean: float, stderr: float, level: float = 0.95) -> tuple[float, float]:
    """mean ± z·stderr, the normal-approximation interval (NaN if stderr is unknown)."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if not (math.isfinite(mean) and math.isfinite(stderr)):
        return math.nan, math.nan
    z = NormalDist().inv_cdf(0.5 + level / 2)  # 1.95996... for 95 %
    return mean - z * stderr, mean + z * stderr


def interval(values: Iterable, stderrs: Iterable = (), per_problem: Sequence | None = None,
             level: float = 0.95, n_boot: int = 2000, seed: int = 0,
             bounds: tuple[float, float] | None = None) -> dict:
    """Mean of one grid point's runs and a confidence interval, saying how it was made.

    With two or more runs (seeds) the interval is a seeded percentile bootstrap
    over the runs. With one run it is a bootstrap over that run's per-problem
    scores when they were recorded, else the normal interval from the stderr
    its evaluation reported; with neither it is NaN. ``bounds``: the values the
    metric can take (an accuracy: (0, 1)); the normal interval, which knows
    nothing of them, is clipped to them (a bootstrap stays inside by itself).
    """
    runs = _finite(values)
    out = {"mean": math.nan, "ci_low": math.nan, "ci_high": math.nan, "runs": int(runs.size),
           "interval": "none"}
    if runs.size == 0:
        return out
    out["mean"] = float(runs.mean())
    problems = _finite(per_problem) if per_problem is not None else np.empty(0)
    errs = _finite(stderrs)
    if runs.size > 1:
        low, high = bootstrap_ci(runs, n_boot=n_boot, level=level, seed=seed)
        method = f"bootstrap over {runs.size} runs"
    elif problems.size > 1:
        low, high = bootstrap_ci(problems, n_boot=n_boot, level=level, seed=seed)
        method = f"bootstrap over {problems.size} problems"
    elif errs.size == 1:
        low, high = normal_ci(out["mean"], float(errs[0]), level)
        if bounds is not None:  # 2 % ± 1.3 % is [0 %, 4.5 %], not [-0.5 %, 4.5 %]
            low, high = max(low, bounds[0]), min(high, bounds[1])
        method = "normal, from eval stderr"
    else:
        return out
    out.update(ci_low=low, ci_high=high, interval=method)
    return out


def retained_averages(accuracy: Mapping[str, float],
                      reference: Mapping[str, float]) -> tuple[float, float]:
    """(mean of ratios, ratio of means) of accuracy vs reference over shared benchmarks.

    Mean of ratios weighs every benchmark equally in relative terms (a hard
    benchmark at 0.1 → 0.05 counts as 50 %); ratio of means weighs benchmarks by
    their accuracy (the same drop barely moves it). Benchmarks missing on
    either side, or whose reference is 0, are left out of both.
    """
    pairs = [(_finite([accuracy[b]]), _finite([reference[b]])) for b in accuracy if b in reference]
    pairs = [(a[0], r[0]) for a, r in pairs if a.size and r.size and r[0] != 0]
    if not pairs:
        return math.nan, math.nan
    acc, ref = np.array(pairs, dtype=float).T
    return float(np.mean(acc / ref)), float(acc.mean() / ref.mean())
