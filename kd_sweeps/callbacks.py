"""End of a sweep: read the points this launch touched, print one table, draw the tradeoff plot."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from kd_sweeps.tracking import RESULT_FILE, now_iso, read_result

log = logging.getLogger(__name__)


def launched_points(sweep_dir: Path, since: str) -> list[Path]:
    """Point folders whose result.json was written by a launch at or after ``since`` (ISO time)."""
    folders = []
    for path in sorted(Path(sweep_dir).glob(f"*/{RESULT_FILE}")):
        result = read_result(path.parent)
        if result and (result.get("launched_at") or "") >= since:
            folders.append(path.parent)
    return folders


def summarize_sweep(sweep_dir: Path, folders: list[Path], title: str = "") -> tuple[str, Path | None]:
    """(markdown table, plot path or None) for the given point folders of a sweep."""
    import pandas as pd

    from analysis.load import load_results
    from analysis.plots import plot_tradeoff, save_figure
    from analysis.tables import summary_table, to_markdown, unfinished_note

    frames = [load_results(folder) for folder in folders]
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if frame.empty or not (frame["status"] == "ok").any():
        return "no grid point finished", None
    table = summary_table(frame)
    table.to_csv(sweep_dir / "summary.csv", index=False)
    markdown = to_markdown(table) + unfinished_note(frame)
    (sweep_dir / "summary.md").write_text(f"# {title}\n\n{markdown}\n")
    from analysis.checks import varying_keys

    # A sweep over loss, truncation mode, train.lr, ... draws one curve per value instead of mixing them.
    varying = varying_keys(frame)
    ax = plot_tradeoff(frame, group_by=varying or None)
    if title:
        ax.set_title(title)
    paths = save_figure(ax.figure, sweep_dir, "tradeoff")
    return markdown, next((p for p in paths if p.suffix == ".png"), None)


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
        check_sweep_dir(config)  # SystemExit: Hydra lets it through, before any folder is made

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from kd_sweeps.launcher import OUTCOMES

        sweep_dir = Path(config.hydra.sweep.dir)
        from kd_sweeps.redact import redact_yaml_files

        redact_yaml_files(sweep_dir)  # Hydra's multirun.yaml holds the command line's overrides
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
        markdown, png = summarize_sweep(sweep_dir, folders, title=f"sweep {config.sweep}")
        print(f"\n{markdown}\n")
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
