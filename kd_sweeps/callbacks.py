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
    from analysis.checks import COMPARABLE

    # A sweep over loss, truncation mode, ... draws one curve per value instead of mixing them.
    ok = frame[frame["status"] == "ok"]
    varying = [c for c in COMPARABLE if c in ok and ok[c].astype(str).nunique() > 1]
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


class SweepSummary(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.started = now_iso()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        from kd_sweeps.redact import redact_yaml_files

        redact_yaml_files(sweep_dir)  # Hydra's multirun.yaml holds the command line's overrides
        folders = launched_points(sweep_dir, getattr(self, "started", ""))
        wait_for_evaluations(folders)
        results = [read_result(folder) for folder in folders]
        counts = Counter(r.get("last_action", "ran") for r in results)
        markdown, png = summarize_sweep(sweep_dir, folders, title=f"sweep {config.sweep}")
        print(f"\n{markdown}\n")
        print(f"{len(folders)} grid point(s): {counts['ran']} ran, {counts['skipped']} skipped "
              f"(already done), {counts['failed']} failed  [{sweep_dir}]")
        if png is not None:
            print(f"tradeoff plot: {png}")
        failed = [f"{' '.join(r.get('overrides') or [])}: {r.get('error')}" for r in results
                  if r.get("status") != "ok"]
        if failed:
            print("failed:\n  " + "\n  ".join(failed))
            # Hydra turns a callback's exceptions into warnings; the exit status must still say
            # that points failed, for scripts and CI that run sweeps.
            raise SystemExit(f"{len(failed)} grid point(s) failed; see {sweep_dir}")
