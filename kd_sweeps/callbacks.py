"""End of a sweep: read every point's record, print one table, draw the FLOPs-vs-accuracy plot."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)


class SweepFailed(RuntimeError):
    """Some grid points failed; the summary above lists them."""


def summarize_sweep(sweep_dir: Path, title: str = "") -> tuple[str, Path | None, list[str]]:
    """(markdown table, plot path or None, failed-point descriptions) for a sweep directory."""
    from analysis.load import load_results
    from analysis.plots import plot_tradeoff, save_figure
    from analysis.tables import summary_table, to_markdown

    frame = load_results(sweep_dir)
    failed = [f"{row.run_id or '-'} ({row.error})" for row in frame.itertuples() if row.status != "ok"]
    ok = frame[frame["status"] == "ok"]
    if ok.empty:
        return "no grid point finished", None, failed
    table = summary_table(frame)
    table.to_csv(sweep_dir / "summary.csv", index=False)
    markdown = to_markdown(table)
    (sweep_dir / "summary.md").write_text(f"# {title}\n\n{markdown}\n")
    import matplotlib

    matplotlib.use("Agg")
    ax = plot_tradeoff(frame)
    if title:
        ax.set_title(title)
    paths = save_figure(ax.figure, sweep_dir, "tradeoff")
    png = next((p for p in paths if p.suffix == ".png"), None)
    return markdown, png, failed


class SweepSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        markdown, png, failed = summarize_sweep(sweep_dir, title=f"sweep {config.sweep}")
        print(f"\n{markdown}\n")
        if png is not None:
            print(f"tradeoff plot: {png}")
        if failed:
            print(f"{len(failed)} grid point(s) failed:\n  " + "\n  ".join(failed))
            raise SweepFailed(f"{len(failed)} grid point(s) failed; see {sweep_dir}")
