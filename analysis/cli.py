"""``python -m analysis {tradeoff,paper} SOURCE --out DIR``: tables and figures of a sweep.

SOURCE is a sweep's output directory (result.json files), a folder of offline
W&B runs, or an online W&B project ``entity/project[:group]``. The command
prints the table, the failed runs and the grid points without a result, and
the paths it wrote.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

import pandas as pd

log = logging.getLogger("analysis")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m analysis", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    tradeoff = commands.add_parser("tradeoff", help="FLOPs-vs-accuracy plot and per-run table")
    paper = commands.add_parser("paper", help="the paper's four figures, generation vs trunc, "
                                              "and the accuracy table")
    for sub in (tradeoff, paper):
        sub.add_argument("source", help="sweep dir, folder of offline W&B runs, or "
                                        "entity/project[:group]")
        sub.add_argument("--out", type=Path, default=Path("figures"),
                         help="folder for figures and tables (default: figures)")
        sub.add_argument("--group", help="W&B group (the sweep name) to read, online only")
        sub.add_argument("--tags", nargs="+", help="online: runs with any of these tags")
        sub.add_argument("--state", help="online: runs in this W&B state, e.g. finished")
        sub.add_argument("--sweep-dir", type=Path, action="append",
                         help="sweep dir whose multirun.yaml gives the full grid (default: "
                              "every one found in a local SOURCE); repeatable")
        sub.add_argument("--group-by", nargs="+", default=None, metavar="COLUMN",
                         help="split curves by these columns, e.g. loss teacher")
    tradeoff.add_argument("--x", default=None,
                          help="cost column (log x axis; default train_flops, or total_flops where the "
                               "runs differ in distill.mode: training + generation)")
    tradeoff.add_argument("--y", default="accuracy", help="metric column")
    paper.add_argument("--sections-trunc", type=float, default=1.0,
                       help="trunc at which the section figure compares presets (default 1.0)")
    paper.add_argument("--retained-average", choices=("ratio_of_means", "mean_of_ratios"),
                       default="ratio_of_means", help="how %% retained averages benchmarks")
    paper.add_argument("--example-seed", type=int, default=None,
                       help="data seed of the example sequence (default: that of a run)")
    return parser


def grid_report(df: pd.DataFrame, source: str, sweep_dirs: Sequence[Path] | None) -> pd.DataFrame:
    """grid_status of every sweep dir (given, or found below a local source)."""
    from analysis.grid import grid_status, sweep_dirs as find_sweep_dirs

    dirs = list(sweep_dirs or [])
    if not dirs and Path(source).is_dir():
        dirs = find_sweep_dirs(source)
    frames = []
    for sweep_dir in dirs:
        try:
            frames.append(grid_status(df, sweep_dir))
        except (OSError, ValueError) as exc:  # one odd multirun.yaml should not hide the rest
            log.warning("%s: grid not computed: %s", sweep_dir, exc)
    if not frames:
        from analysis.grid import GRID_STATUS_COLUMNS

        return pd.DataFrame(columns=GRID_STATUS_COLUMNS)
    return pd.concat(frames, ignore_index=True)


def _point_line(row, several: bool) -> str:
    sweep = Path(row.sweep_dir)  # multirun/<sweep>/<date>: name both when several
    earlier = "" if bool(getattr(row, "latest_launch", True)) else " (earlier launch)"
    return (f"{sweep.parent.name}/{sweep.name} " if several else "") \
        + f"job {row.job}: {row.point}{earlier}"


def missing_descriptions(grid: pd.DataFrame) -> list[str]:
    """'job 3: trunc=0.25 sections=cot' per point without any result (with the sweep
    dir's name when there are several)."""
    several = grid["sweep_dir"].nunique() > 1
    return [_point_line(r, several) for r in grid[grid["status"] == "missing"].itertuples()]


def footnote_points(df: pd.DataFrame, grid: pd.DataFrame) -> list[str]:
    """Grid points a figure's footnote must add to the frame's failed runs: those
    without a result, and those that failed before their run got an id the frame
    would list (an online frame never saw them)."""
    several = grid["sweep_dir"].nunique() > 1
    known = set(df["run_id"].dropna().astype(str))
    lines = []
    for row in grid[grid["status"] != "ok"].itertuples():  # in job order
        if row.status == "missing":
            lines.append(_point_line(row, several))
        elif row.run_id is None or str(row.run_id) not in known:
            lines.append(f"{_point_line(row, several)} ({row.status}: {row.error})")
    return lines


def print_problems(df: pd.DataFrame, grid: pd.DataFrame) -> None:
    failed = df[(df["status"] != "ok").fillna(True).to_numpy()]
    print(f"\nfailed or unfinished runs: {len(failed)}")
    for row in failed.itertuples():
        print(f"  {row.run_id if pd.notna(row.run_id) else '-'} [{row.status}] "
              f"sections={row.sections} trunc={row.trunc}: {row.error}")
    if grid.empty:
        print("grid: no multirun.yaml found, so missing points cannot be known")
        return
    missing = missing_descriptions(grid)
    print(f"grid: {len(grid)} points, {int((grid['status'] == 'ok').sum())} ok, "
          f"{len(missing)} without any result")
    for line in missing:
        print(f"  missing {line}")
    for row in grid[~grid["status"].isin(["ok", "missing"])].itertuples():
        print(f"  {row.status} job {row.job}: {row.point} ({row.error})")


def write_table(table: pd.DataFrame, out: Path, name: str,
                frame: pd.DataFrame | None = None) -> list[Path]:
    """Print table and write it as Markdown; the CSV holds ``frame`` (the machine-readable
    version: tables.summary_frame, tables.paper_frame) where given, else the table."""
    from analysis.tables import to_markdown, write_csv, write_markdown

    print("\n" + to_markdown(table))
    return [write_csv(table if frame is None else frame, out / f"{name}.csv"),
            write_markdown(table, out / f"{name}.md")]


def run_tradeoff(df: pd.DataFrame, args, missing: list[str]) -> list[Path]:
    from analysis.figures import figure_tradeoff
    from analysis.plots import save_figure
    from analysis.tables import summary_frame, summary_table, unfinished_note

    paths = write_table(summary_table(df), args.out, "summary", summary_frame(df))
    print(unfinished_note(df), end="")
    from analysis.plots import cost_column

    fig = figure_tradeoff(df, missing, args.group_by, x=args.x or cost_column(df), y=args.y)
    return paths + save_figure(fig, args.out, "tradeoff")


def _example_runs(source: Path) -> list[Path]:
    """Dirs of ok local runs with trunc < 1, trunc nearest 0.5 first (a cut worth showing)."""
    found = []
    for path in source.rglob("result.json"):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        trunc = (record.get("config") or {}).get("trunc") if isinstance(record, dict) else None
        if record.get("status") == "ok" and isinstance(trunc, (int, float)) and trunc < 1:
            found.append((abs(trunc - 0.5), str(path.parent), path.parent))
    return [run_dir for *_, run_dir in sorted(found)]


def _example(df: pd.DataFrame, args):
    """The example sequence of a local run, else of the embedded task at a swept trunc."""
    from analysis.example import example_from_config, example_from_run

    source = Path(args.source)
    if args.example_seed is None and source.is_dir():
        for run_dir in _example_runs(source):
            try:
                return example_from_run(run_dir)
            except (ValueError, OSError) as exc:
                log.info("%s: no example from this run (%s)", run_dir, exc)
    truncs = sorted(t for t in df["trunc"].dropna().astype(float) if t < 1) or [0.5]
    return example_from_config(seed=42 if args.example_seed is None else args.example_seed,
                               trunc=truncs[len(truncs) // 2])


def run_paper(df: pd.DataFrame, args, missing: list[str]) -> list[Path]:
    from analysis.example import figure_of
    from analysis.figures import (figure_generation, figure_sections, figure_tradeoff,
                                  figure_truncation)
    from analysis.plots import cost_column, save_figure
    from analysis.tables import paper_frame, paper_table
    from analysis.windows import figure_windows, varies_windows

    paths = write_table(paper_table(df, args.group_by), args.out, "accuracy",
                        paper_frame(df, args.group_by))
    fig = figure_tradeoff(df, missing, args.group_by, x=cost_column(df))
    paths += save_figure(fig, args.out, "tradeoff")
    try:
        fig = figure_sections(df, args.sections_trunc, missing, args.group_by)
        paths += save_figure(fig, args.out, "sections")
    except ValueError as exc:  # no finished run at that trunc: the other figures still come
        print(f"sections figure skipped: {exc}")
    fig = figure_truncation(df, missing, args.group_by, args.retained_average)
    paths += save_figure(fig, args.out, "truncation")
    fig = figure_generation(df, missing, args.group_by)
    paths += save_figure(fig, args.out, "generation")
    if varies_windows(df):  # a window sweep (conf/experiment/paper_windows.yaml)
        paths += save_figure(figure_windows(df, missing, args.group_by), args.out, "windows")
    example = _example(df, args)
    print(f"example: {example.origin}")
    return paths + save_figure(figure_of(example), args.out, "example")


def _split_windows(df: pd.DataFrame, args) -> None:
    """A window sweep (runs differing in truncation.mode) is drawn one curve per mode, as the
    end-of-sweep summary draws any varied setting, instead of being refused."""
    from analysis.windows import MODE, varies_windows

    if varies_windows(df) and MODE not in (args.group_by or []):
        args.group_by = [*(args.group_by or []), MODE]
        print(f"runs differ in truncation.mode: one curve per mode (--group-by {' '.join(args.group_by)})")


def _split_distill(df: pd.DataFrame, args) -> None:
    """Runs that differ in distill.mode are drawn one curve per mode (checks.sweep_curves), as the
    end-of-sweep summary draws them, at their total FLOPs by default."""
    from analysis.checks import DISTILL_COLUMN, DISTILL_KEY, varies_distill

    grouped = args.group_by or []
    if varies_distill(df) and DISTILL_COLUMN not in grouped and DISTILL_KEY not in grouped:
        args.group_by = [*grouped, DISTILL_COLUMN]
        print(f"runs differ in distill.mode: one curve per mode (--group-by {' '.join(args.group_by)})")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import matplotlib

    matplotlib.use("Agg")  # files only, no screen needed
    from analysis.checks import check_comparable
    from analysis.load import load

    # Before any loading: an --out below a file fails now, not after the figures are drawn.
    existing = next(p for p in (args.out.absolute(), *args.out.absolute().parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        why = "is a file, not a folder" if not existing.is_dir() else "is not writable"
        print(f"error: --out {args.out}: {existing} {why}; choose another --out", file=sys.stderr)
        return 2
    try:
        df = load(args.source, group=args.group, tags=args.tags, state=args.state)
        grid = grid_report(df, args.source, args.sweep_dir)
        _split_windows(df, args)
        _split_distill(df, args)
        check_comparable(df, args.group_by)  # refuse before writing anything
    except (FileNotFoundError, NotADirectoryError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{len(df)} run{'' if len(df) == 1 else 's'} from {args.source}")
    if df.empty or not (df["status"] == "ok").fillna(False).any():  # nothing to draw: not a success
        print(f"error: no finished (ok) run in {args.source}; see the warnings above and the failed "
              "runs below", file=sys.stderr)
        print_problems(df, grid)
        return 1
    missing = footnote_points(df, grid)
    run = run_tradeoff if args.command == "tradeoff" else run_paper
    paths = run(df, args, missing)
    print_problems(df, grid)
    print("\nwrote:")
    for path in paths:
        print(f"  {path}")
    return 0
