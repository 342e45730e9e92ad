"""End of a sweep: keep this launch's grid, summarise every point of the sweep folder (table, CSV,
tradeoff plot; the latest launch's points marked) and log the summary to W&B."""

from __future__ import annotations

import datetime as dt
import logging
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from kd_sweeps.point_record import RESULT_FILE, read_result
from kd_sweeps.record_files import now_iso

log = logging.getLogger(__name__)
MULTIRUN_FILE = "multirun.yaml"  # what Hydra writes into the sweep dir at every launch
# Folder of the sweep's W&B summary runs, beside the point folders: the documented upload glob
# `wandb sync <sweep dir>/*/wandb/offline-run-*` takes them with the points' runs.
SUMMARY_RUN_DIR = "summary"


def launched_points(sweep_dir: Path, since: str) -> list[Path]:
    """Point folders whose result.json was written by a launch at or after ``since`` (ISO time)."""
    folders = []
    for path in sorted(Path(sweep_dir).glob(f"*/{RESULT_FILE}")):
        result = read_result(path.parent)
        if result and (result.get("launched_at") or "") >= since:
            folders.append(path.parent)
    return folders


def point_folders(sweep_dir: Path) -> list[Path]:
    """Every point folder of the sweep with a result.json, whichever launch wrote it."""
    return sorted(path.parent for path in Path(sweep_dir).glob(f"*/{RESULT_FILE}"))


def keep_launch(sweep_dir: Path, when: Optional[dt.datetime] = None) -> Optional[Path]:
    """Copy the sweep's multirun.yaml (call it after redaction) to
    ``launches/<UTC time>-multirun.yaml``: Hydra overwrites it at the next launch, and the grid
    of a sweep launched in parts is the union of these copies (analysis.grid.expected_grid)."""
    from analysis.grid import LAUNCH_SUFFIX, LAUNCHES_DIR
    from kd_sweeps.record_files import write_text_atomic

    source = Path(sweep_dir) / MULTIRUN_FILE
    if not source.is_file():
        return None
    when = when or dt.datetime.now(dt.timezone.utc)
    # Microseconds keep two launches in one second apart; the names sort by time.
    target = Path(sweep_dir) / LAUNCHES_DIR / f"{when:%Y-%m-%dT%H%M%S.%fZ}{LAUNCH_SUFFIX}"
    target.parent.mkdir(exist_ok=True)
    write_text_atomic(target, source.read_text())
    return target


def keep_unkept_launch(sweep_dir: Path) -> Optional[Path]:
    """At the start of a launch, multirun.yaml is still the previous launch's (Hydra rewrites it
    after the callbacks' start): keep it, dated by its file time, when that launch ended without
    keeping it (interrupted before its end)."""
    from analysis.grid import launch_files
    from kd_sweeps.redact import redact_yaml_files

    source = Path(sweep_dir) / MULTIRUN_FILE
    if not source.is_file():
        return None
    redact_yaml_files(Path(sweep_dir))  # that launch's end did not redact it either
    text = source.read_text()
    if any(path.read_text() == text for path in launch_files(sweep_dir)):
        return None
    when = dt.datetime.fromtimestamp(source.stat().st_mtime, dt.timezone.utc)
    return keep_launch(sweep_dir, when)


def _latest_marks(frame, sweep_dir: Path):
    """Per run: whether it stands for a point of the latest launch's grid (None: no grid known)."""
    from analysis.grid import latest_launch_runs

    try:
        return latest_launch_runs(frame, sweep_dir)
    except FileNotFoundError:  # summarised outside a multirun: no grid
        return None
    except Exception as err:  # noqa: BLE001 - Hydra's parse errors share no base class
        log.warning("%s: latest launch's points not marked (%s)", sweep_dir, err)
        return None


def _missing_points(frame, sweep_dir: Path) -> list[str]:
    """The sweep's grid points (every launch's) without a finished run, for the plot's footnote."""
    from analysis.cli import footnote_points
    from analysis.grid import grid_status

    try:
        return footnote_points(frame, grid_status(frame, sweep_dir))
    except Exception as err:  # noqa: BLE001 - as in _latest_marks
        if not isinstance(err, FileNotFoundError):
            log.warning("%s: grid not computed (%s)", sweep_dir, err)
        return []


def summarize_sweep(sweep_dir: Path, folders: Optional[list[Path]] = None,
                    title: str = "") -> tuple[str, Path | None]:
    """(markdown table, plot path or None) for the sweep's point folders (default: every one with
    a result.json, whichever launch ran it). Writes summary.md (runs of the latest launch's grid
    marked ✓), summary.csv (tables.summary_frame: numeric, ``latest_launch`` true/false) and
    tradeoff.png/pdf from all of them (x: plots.cost_column, total FLOPs where distill.mode varies)."""
    import pandas as pd

    from analysis.load import load_results
    from analysis.plots import plot_tradeoff, save_figure
    from analysis.tables import summary_frame, summary_table, to_markdown, unfinished_note

    folders = point_folders(sweep_dir) if folders is None else folders
    frames = [load_results(folder) for folder in folders]
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if frame.empty or not (frame["status"] == "ok").any():
        return "no grid point finished", None
    latest = _latest_marks(frame, sweep_dir)
    summary_frame(frame, latest).to_csv(sweep_dir / "summary.csv", index=False)
    markdown = to_markdown(summary_table(frame, latest)) + unfinished_note(frame)
    if latest is not None:
        ok = (frame["status"] == "ok").fillna(False).to_numpy()
        markdown = (f"{int(ok.sum())} finished point(s) in the sweep folder; "
                    f"{int((latest.to_numpy() & ok).sum())} of them (✓) in the latest launch's grid\n\n"
                    + markdown)
    (sweep_dir / "summary.md").write_text(f"# {title}\n\n{markdown}\n")
    from analysis.checks import sweep_curves
    from analysis.plots import cost_column

    # A sweep over loss, truncation mode, train.lr, distill.mode, ... draws one curve per value instead
    # of mixing them; distill modes are compared at their total FLOPs (training + generation).
    varying = sweep_curves(frame)
    ax = plot_tradeoff(frame, x=cost_column(frame), group_by=varying or None,
                       missing=_missing_points(frame, sweep_dir))
    if title:
        ax.set_title(f"{title}\n{ax.get_title()}".strip(), fontsize=9)
    paths = save_figure(ax.figure, sweep_dir, "tradeoff")
    return markdown, next((p for p in paths if p.suffix == ".png"), None)


def log_wandb_summary(sweep_dir: Path, sweep: str, logger_cfg, png: Optional[Path]) -> Optional[Path]:
    """One W&B run (job_type summary, group = the sweep, in logger.mode, under
    ``<sweep dir>/summary/wandb`` as a point's is under ``<point>/wandb``) holding summary.csv as
    a wandb.Table and the tradeoff plot as a wandb.Image; None when the logger is disabled or
    there is no summary. Names, tags, the table and the command line are redacted as the points'
    runs are (kd_sweeps.wandb_naming). Returns the run's folder."""
    import pandas as pd

    csv = Path(sweep_dir) / "summary.csv"
    if logger_cfg is None or logger_cfg.get("mode", "disabled") == "disabled" or not csv.is_file():
        return None
    import wandb

    from analysis.wandb_offline import SUMMARY_JOB_TYPE
    from kd_sweeps.redact import env_secrets, redact
    from kd_sweeps.tracking import _wait_for_offline_log
    from kd_sweeps.wandb_naming import _tag

    secrets = env_secrets()
    frame = pd.read_csv(csv)
    frame = frame.astype(object).where(frame.notna(), None)  # empty cells: None, not NaN in a text column
    table = wandb.Table(columns=[str(c) for c in frame.columns],
                        data=redact(frame.values.tolist(), secrets))
    run_parent = Path(sweep_dir) / SUMMARY_RUN_DIR
    run_parent.mkdir(exist_ok=True)
    argv = sys.argv[:]
    sys.argv[:] = redact(argv, secrets)  # W&B records the command line in the run's metadata
    try:
        run = wandb.init(
            project=logger_cfg.get("project"), entity=logger_cfg.get("entity"),
            job_type=SUMMARY_JOB_TYPE, group=redact(sweep, secrets),
            name=redact(f"summary {sweep}", secrets), dir=str(run_parent), mode=logger_cfg.get("mode"),
            tags=[_tag(t) for t in redact([*list(logger_cfg.get("tags") or []), SUMMARY_JOB_TYPE], secrets)],
            config={"sweep": redact(sweep, secrets), "points": int((frame["role"] == "grid_point").sum())},
            settings=wandb.Settings(silent=True, console="off"))
    finally:
        sys.argv[:] = argv
    try:
        media = {"summary": table}
        if png is not None and Path(png).is_file():
            media["tradeoff"] = wandb.Image(str(png))
        run.log(media)
    finally:
        run_dir = Path(run.dir).parent
        run.finish()
    if logger_cfg.get("mode") == "offline":
        _wait_for_offline_log(run_dir)  # the analysis reads it at once
    return run_dir


def wait_for_evaluations(folders: list[Path]) -> None:
    """Points trained with eval.separate_job=true on Slurm are evaluated by jobs queued after
    their training: wait for those, so the table has their accuracies."""
    pending = [f for f in folders if (read_result(f) or {}).get("status") == "evaluating"]
    if pending:
        from kd_sweeps import eval_job

        print(f"waiting for {len(pending)} evaluation job(s)")
        for folder in pending:
            eval_job.wait(folder)


def check_sweep_dir(config: DictConfig, key: str = "sweep") -> Path:
    """The sweep's (run's) folder ``hydra.<key>.dir``, once its name is valid (``${kd_sweep_name:}``
    raises) and it can be written: checked before the first point, so neither fails after points ran."""
    try:
        sweep_dir = Path(str(config.hydra[key].dir))
    except Exception as err:  # noqa: BLE001 - the resolver's message names the key and the rule
        cause = err.__cause__ or err
        raise SystemExit(f"hydra.{key}.dir cannot be used: {cause}") from None
    from kd_sweeps.validation import _writable_dir

    issues: list[str] = []
    _writable_dir(issues, f"hydra.{key}.dir", str(sweep_dir))
    if issues:
        raise SystemExit(issues[0])
    return sweep_dir


def launch_counts(outcomes: list[dict]) -> Counter:
    return Counter(o.get("outcome", "failed") for o in outcomes)


class SweepSummary(Callback):
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        check_sweep_dir(config, "run")
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from kd_sweeps.launcher import OUTCOMES

        self.started = now_iso()
        OUTCOMES.clear()  # one list per launch (tests may run several in one process)
        sweep_dir = check_sweep_dir(config)  # SystemExit: Hydra lets it through, before any folder is made
        try:  # an interrupted earlier launch's grid, before Hydra overwrites it
            keep_unkept_launch(sweep_dir)
        except (OSError, ValueError) as err:  # unreadable YAML: the sweep still runs, with a partial grid
            log.warning("%s/%s of an earlier launch not kept: %s", sweep_dir, MULTIRUN_FILE, err)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from kd_sweeps.launcher import OUTCOMES

        sweep_dir = Path(config.hydra.sweep.dir)
        from kd_sweeps.redact import redact_yaml_files

        redact_yaml_files(sweep_dir)  # Hydra's multirun.yaml holds the command line's overrides
        keep_launch(sweep_dir)  # the next launch overwrites multirun.yaml: the sweep's grid is all of them
        outcomes = list(OUTCOMES)
        if not outcomes:  # a launcher that does not report outcomes: the records this launch wrote
            outcomes = [{"outcome": r.get("last_action", "ran"), "point": str(f), "status": r.get("status"),
                         "error": r.get("error"), "overrides": r.get("overrides")}
                        for f in launched_points(sweep_dir, getattr(self, "started", ""))
                        for r in [read_result(f) or {}]]
        # A point claimed by another launch is that launch's to summarize (its record may be half-way).
        folders = sorted({Path(o["point"]) for o in outcomes if o.get("point") and o.get("outcome") != "claimed"
                          and read_result(Path(o["point"]))})
        wait_for_evaluations(folders)
        for o in outcomes:  # a point that ran ends failed if its evaluation job failed
            record = read_result(Path(o["point"])) if o.get("point") and o.get("outcome") == "ran" else None
            if record and record.get("status") not in ("ok", "evaluating"):
                o.update(outcome="failed", status=record.get("status"), error=record.get("error"))
        counts = launch_counts(outcomes)
        # Every point of the sweep folder, not only this launch's: re-running one point of a sweep
        # must not shrink its table and plot to that point. The counts below are this launch's.
        markdown, png = summarize_sweep(sweep_dir, title=f"sweep {config.sweep}")
        print(f"\n{markdown}\n")
        try:
            log_wandb_summary(sweep_dir, str(config.sweep), config.get("logger"), png)
        except Exception as err:  # noqa: BLE001 - the points are recorded; their summary run is extra
            log.warning("W&B summary run of sweep %s not logged: %s: %s", config.sweep,
                        type(err).__name__, err)
        extra = "".join(f", {counts[k]} {k}" for k in ("claimed", "interrupted") if counts[k])
        print(f"{len(outcomes)} grid point(s): {counts['ran']} ran, {counts['skipped']} skipped "
              f"(already done), {counts['failed']} failed{extra}  [{sweep_dir}]")
        if png is not None:
            print(f"tradeoff plot: {png}")
        _report_problems(outcomes, sweep_dir)


def _report_problems(outcomes: list[dict], sweep_dir: Path) -> None:
    """Name every point that did not end well in this launch, and make the exit status say so."""
    claimed = [o for o in outcomes if o.get("outcome") == "claimed"]
    if claimed:
        print("claimed by another launch (not run here; its result appears when it finishes):\n  "
              + "\n  ".join(f"{o['point']}: {o.get('error')}" for o in claimed))
    failed = [f"{' '.join(o.get('overrides') or [])}: {o.get('error')}" for o in outcomes
              if o.get("outcome") in ("failed", "interrupted")]
    if failed:
        print("failed:\n  " + "\n  ".join(failed))
        # Hydra turns a callback's exceptions into warnings; the exit status must still say
        # that points failed, for scripts and CI that run sweeps.
        raise SystemExit(f"{len(failed)} grid point(s) failed; see {sweep_dir}")
