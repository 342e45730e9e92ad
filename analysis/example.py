"""The paper's example figure: one real training sequence, P / CoT / A coloured, the cut marked.

The sequence is made by the project's own pipeline (chat template → tokenize →
spans on the full sequence → kept window → supervised mask), so the figure
shows exactly what a grid point trains on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

SECTION_COLORS = {"P": "#9ecae1", "CoT": "#fdae6b", "A": "#a1d99b"}
LINE_CHARS = 60  # characters per drawn line before a token wraps
# How whitespace tokens are drawn, so they stay visible.
VISIBLE = {" ": "·", "\n": "↵", "\t": "→"}


@dataclass
class Example:
    """One tokenized training sequence and what a grid point does with it."""

    tokens: list[str]
    spans: object  # kd_sweeps.sections.Spans on the full sequence
    window: tuple[int, int]  # kept tokens [start, end)
    supervised: list[bool]  # per kept token: a KD target
    trunc: float
    mode: str
    origin: str = ""  # where it comes from, shown under the figure


def example_from_config(seed: int = 42, trunc: float = 0.5, mode: str = "lead",
                        sections: Sequence[str] = ("P", "CoT", "A"),
                        cut_after_think: bool = False, min_steps: int = 2,
                        max_steps: int = 12, max_tokens: int = 4096,
                        tokenizer=None) -> Example:
    """The first training problem of the embedded task with data seed ``seed``
    (make_split draws problems in order, so it is the run's first example)."""
    # Imported here: they load torch and transformers, which plots never need.
    from kd_sweeps.data import encode
    from kd_sweeps.sections import supervised_tokens
    from kd_sweeps.synthetic import make_split
    from kd_sweeps.tokenizer import build_tokenizer

    tokenizer = tokenizer or build_tokenizer()
    records = make_split(1, seed, min_steps, max_steps)
    encoded, _ = encode(records, tokenizer, max_tokens)
    ids, spans = encoded[0].input_ids, encoded[0].spans
    if tokenizer.unk_token_id is not None and tokenizer.unk_token_id in ids:
        # A run's saved tokenizer that does not know the words the task makes now:
        # the task's code changed since that run, so this is not what it trained on.
        unknown = ids.count(tokenizer.unk_token_id)
        raise ValueError(f"{unknown} tokens of the regenerated example are unknown to the "
                         "tokenizer: the embedded task changed since it was built")
    window, mask = supervised_tokens(len(ids), spans, tuple(sections), trunc, mode,
                                     cut_after_think=cut_after_think, seed=seed)
    return Example(tokens=tokenizer.convert_ids_to_tokens(ids), spans=spans, window=window,
                   supervised=mask, trunc=trunc, mode=mode,
                   origin=f"first training problem of the embedded task, data seed {seed}, "
                          f"sections {'+'.join(sections)}")


def example_from_run(run_dir) -> Example:
    """The first training example of the run in run_dir, as its config makes it.

    Uses the tokenizer the run saved with its checkpoint when there is one.
    Only the embedded synthetic data can be regenerated here.
    """
    record = json.loads((Path(run_dir) / "result.json").read_text())
    config = record.get("config") or {}
    data = config.get("data") or {}
    if data.get("source") != "synthetic":
        raise ValueError(f"{run_dir}: data.source={data.get('source')!r}; the example can be "
                         "rebuilt only for the embedded synthetic data")
    tokenizer = None
    checkpoint = Path(run_dir) / "checkpoint"
    if (checkpoint / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    truncation = config.get("truncation") or {}
    example = example_from_config(
        seed=data.get("seed", 42), trunc=config.get("trunc", 1.0),
        mode=truncation.get("mode", "lead"),
        sections=tuple((config.get("sections") or {}).get("include") or ("P", "CoT", "A")),
        cut_after_think=bool(truncation.get("cut_after_think", False)),
        min_steps=data.get("min_steps", 2), max_steps=data.get("max_steps", 12),
        max_tokens=data.get("max_tokens", 4096), tokenizer=tokenizer)
    example.origin = f"run {record.get('run_id') or Path(run_dir).name}: {example.origin}"
    return example


def _section(spans, index: int) -> str:
    for name in ("P", "CoT", "A"):
        lo, hi = spans.of(name)
        if lo <= index < hi:
            return name
    return "A"  # past every span cannot happen for spans of this sequence


def _layout(tokens: Sequence[str]) -> list[tuple[int, int, str]]:
    """(row, column, shown text) per token; rows break after a newline token or when full."""
    places, row, col = [], 0, 0
    for token in tokens:
        shown = "".join(VISIBLE.get(ch, ch) for ch in token) or "∅"
        if col and col + len(shown) > LINE_CHARS:
            row, col = row + 1, 0
        places.append((row, col, shown))
        col += len(shown)
        if token.endswith("\n"):
            row, col = row + 1, 0
    return places


def _mark_cut(ax: Axes, places, index: int, text: str) -> None:
    """A red bar at the left edge of token ``index`` (or after the last token)."""
    if index < len(places):
        row, col, _ = places[index]
    else:
        row, col, shown = places[-1]
        col += len(shown)
    ax.plot([col, col], [row - 0.15, row + 0.95], color="red", linewidth=2.5, zorder=4)
    ax.annotate(text, (col, row - 0.15), xytext=(3, 1), textcoords="offset points",
                color="red", fontsize=7, ha="left", va="bottom", zorder=5,
                bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 1})


def plot_example(tokens: Sequence[str], spans, window: tuple[int, int], ax: Axes | None = None,
                 supervised: Sequence[bool] | None = None) -> Axes:
    """Tokens laid out as text, each boxed in its section's colour; tokens outside
    the kept window are faded and hatched, KD targets underlined, the cut in red."""
    if not tokens:
        raise ValueError("no tokens to draw")
    places = _layout(tokens)
    rows = places[-1][0] + 1
    if ax is None:
        ax = Figure(figsize=(11, 1.2 + 0.3 * rows), layout="constrained").subplots()
    start, end = window
    for index, (token_row, col, shown) in enumerate(places):
        kept = start <= index < end
        ax.add_patch(Rectangle((col, token_row), len(shown), 0.8,
                               facecolor=SECTION_COLORS[_section(spans, index)],
                               alpha=1.0 if kept else 0.35, hatch=None if kept else "///",
                               edgecolor="white", linewidth=0.5))
        ax.text(col + len(shown) / 2, token_row + 0.4, shown, ha="center", va="center",
                family="monospace", fontsize=8, color="black" if kept else "dimgrey")
        if kept and supervised is not None and supervised[index - start]:
            ax.add_patch(Rectangle((col, token_row + 0.82), len(shown), 0.1,
                                   facecolor="black", linewidth=0))
    if start > 0:
        _mark_cut(ax, places, start, f"window starts (token {start})")
    if end < len(tokens):
        _mark_cut(ax, places, end, f"cut: tokens {end}.. dropped")
    ax.set_xlim(-0.5, LINE_CHARS + 0.5)
    ax.set_ylim(rows + 0.2, -0.8)  # first token at the top
    ax.axis("off")
    legend = [Patch(facecolor=c, label=f"{name}") for name, c in SECTION_COLORS.items()]
    legend += [Patch(facecolor="lightgrey", hatch="///", label="dropped by truncation")]
    if supervised is not None:
        legend += [Patch(facecolor="black", label="KD target (underlined)")]
    ax.legend(handles=legend, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=len(legend),
              fontsize=7, frameon=False)
    ax.set_title(f"one training sequence: {len(tokens)} tokens, kept [{start}, {end})"
                 + ("" if supervised is None else f", {sum(supervised)} supervised"),
                 fontsize=9)
    return ax


def figure_example(tokens: Sequence[str], spans, window: tuple[int, int], ax: Axes | None = None,
                   supervised: Sequence[bool] | None = None, title: str | None = None) -> Figure:
    """The example figure (see plot_example); returns the Figure holding it."""
    ax = plot_example(tokens, spans, window, ax=ax, supervised=supervised)
    if title:
        ax.set_title(title, fontsize=9)
    return ax.figure


def figure_of(example: Example) -> Figure:
    """figure_example for an Example, titled with its truncation, its origin below."""
    from analysis.plots import add_footnote

    start, end = example.window
    fig = figure_example(
        example.tokens, example.spans, example.window, supervised=example.supervised,
        title=f"one training sequence ({len(example.tokens)} tokens) at trunc={example.trunc:g}, "
              f"mode {example.mode}: tokens [{start}, {end}) kept, "
              f"{sum(example.supervised)} of them KD targets")
    add_footnote(fig, example.origin)
    return fig
