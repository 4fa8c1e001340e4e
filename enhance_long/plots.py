"""PNG plots from result rows: figures without pyplot (no global state, no display), a style per method, and the
heatmap panels passkey and RULER draw. Nothing here knows a task; each task's ``plots`` composes these."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path

from enhance_long.results import write_atomic


def figure(ncols: int, nrows: int = 1, width: float = 5.0, height: float = 3.8):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def save(fig, path: Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    write_atomic(path, buffer.getvalue())
    return path


def styles(order: Sequence[str]) -> dict[str, dict]:
    """A distinct line per method: the ten default colours, then the same colours dashed, dotted, ..."""
    from matplotlib import colormaps

    colours = colormaps["tab10"].colors
    lines, markers = ("-", "--", ":", "-."), ("o", "s", "^", "D")
    return {
        label: {"color": colours[i % 10], "linestyle": lines[i // 10 % 4], "marker": markers[i // 10 % 4]}
        for i, label in enumerate(order)
    }


BANDS_TOGETHER = 6  # up to this many series share one panel's bands; more would hide each other
LEGEND_INSIDE = 8  # up to this many legend entries sit inside the axes; more go beside the figure


def legend(fig, ax, entries: int, fontsize: float = 7, ncol: int = 1) -> None:
    """The legend inside ``ax`` for a few entries; for many, outside the axes where it hides no line: beside a
    figure of one column of panels, below a wider one."""
    if entries <= LEGEND_INSIDE:
        ax.legend(fontsize=fontsize, ncol=ncol)
    elif ax.get_gridspec().ncols == 1:
        width, height = fig.get_size_inches()
        fig.set_size_inches(width + 3.5, max(height, 0.16 * entries + 0.8))  # room for the labels, the axes kept
        fig.legend(*ax.get_legend_handles_labels(), loc="outside right upper", fontsize=fontsize)
    else:
        fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", fontsize=fontsize, ncol=max(ncol, 4))


def _length_axes(ax, lengths: Sequence[int], ylabel: str) -> None:
    ax.set(xscale="log", yscale="log", xlabel="context length (tokens)", ylabel=ylabel)
    ax.set_xticks(lengths, [str(c) for c in lengths])
    ax.tick_params(axis="x", which="minor", labelbottom=False)
    ax.grid(True, which="both", alpha=0.3)


def _band(ax, points: Sequence[tuple], color) -> None:
    bands = [p for p in points if p[2] is not None]
    if bands:
        low, high = [b[2][0] for b in bands], [b[2][1] for b in bands]
        ax.fill_between([b[0] for b in bands], low, high, alpha=0.15, color=color)


def length_plot(
    series: dict[str, list[tuple]], path: Path, ylabel: str, title: str = "", legend_cols: int = 1, zoom: float = 0.0
) -> Path:
    """Lines over context length on log-log axes: ``series`` maps a label to its (length, value, band) points, ``band``
    a (low, high) pair shaded around the line, or None (for more than ``BANDS_TOGETHER`` series the bands would hide
    each other: :func:`band_panels` draws them apart). ``zoom`` > 1 adds a panel of the same lines cut to values
    within ``zoom`` x the lowest, lines only, where the good methods are told apart."""
    panels = 2 if zoom > 1 else 1
    fig, axes = figure(panels, width=6.5 + legend_cols - 1, height=4.5 + (legend_cols - 1) / 2)
    style = styles(list(series))
    lengths = sorted({p[0] for points in series.values() for p in points})
    banded = sum(1 for points in series.values() if points) <= BANDS_TOGETHER
    for column, ax in enumerate(axes[0]):
        for label, points in series.items():
            if not points:
                continue
            ax.plot([p[0] for p in points], [p[1] for p in points], label=label, **style[label])
            if column == 0 and banded:  # bands would hide a close zoom
                _band(ax, points, style[label]["color"])
        _length_axes(ax, lengths, ylabel if column == 0 else "")
    if panels == 2:
        zoom_in(axes[0][1], min(p[1] for points in series.values() for p in points), zoom)
    if title:
        axes[0][0].set_title(title, fontsize=9)
    legend(fig, axes[0][0], len(series), fontsize=7 if legend_cols == 1 else 6, ncol=legend_cols)
    return save(fig, path)


def zoom_in(ax, lowest: float, zoom: float, title: str = "") -> None:
    """Cut ``ax``'s log y axis to values within ``zoom`` x ``lowest``, labelled in plain numbers: the panel where close
    methods are told apart while the full one beside it shows how far the others go."""
    from matplotlib.ticker import FormatStrFormatter

    ax.set_ylim(lowest / 1.05, lowest * zoom)
    ax.yaxis.set_major_formatter(FormatStrFormatter("%.0f"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%.0f"))
    ax.set_title(f"{title}within {zoom:g}x of the lowest (lines only)", fontsize=9)


def _sparse_label(value: float, _position=None) -> str:
    """A minor log tick's label where it leads with 1, 2, 3 or 5 (14, 20, 30, 50; not 40, 60, 70, 80, 90)."""
    text = f"{value:g}"
    return text if text[0] in "1235" else ""


def band_panels(series: dict[str, list[tuple]], path: Path, ylabel: str, reference: str | None = None) -> Path:
    """One small panel per series (four to a row), its line and band, with the ``reference`` series in grey behind
    it: each interval readable alone, and against the same yardstick."""
    from matplotlib.ticker import FormatStrFormatter, FuncFormatter

    drawn = {label: points for label, points in series.items() if points}
    ncols = min(4, len(drawn))
    nrows = -(-len(drawn) // ncols)
    fig, axes = figure(ncols, nrows, width=3.4, height=2.8)
    fig.get_layout_engine().set(w_pad=0.02, h_pad=0.02)
    style = styles(list(series))
    lengths = sorted({p[0] for points in drawn.values() for p in points})
    for ax in axes.flat[len(drawn) :]:
        ax.set_axis_off()
    for ax, (label, points) in zip(axes.flat, drawn.items(), strict=False):
        if reference in drawn and reference != label:
            ref = drawn[reference]
            ax.plot([p[0] for p in ref], [p[1] for p in ref], color="0.6", linewidth=1, label=reference)
        ax.plot([p[0] for p in points], [p[1] for p in points], **style[label])
        _band(ax, points, style[label]["color"])
        _length_axes(ax, lengths, ylabel if ax in axes[:, 0] else "")
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(FuncFormatter(_sparse_label))
        ax.set_title(label, fontsize=7)
        ax.tick_params(which="both", labelsize=6)
        ax.xaxis.label.set_fontsize(7)
        ax.yaxis.label.set_fontsize(7)
    if reference in drawn:
        fig.suptitle(f"each method with its band; grey: {reference}", fontsize=9)
    return save(fig, path)


class Panel:
    """One heatmap: ``grid[r][c]`` (NaN for no value) with its row and column labels, a title, and a line drawn
    under the first ``rule`` rows (0: none)."""

    def __init__(self, title: str, rows: Sequence[str], columns: Sequence, grid, rule: int = 0):
        self.title, self.rows, self.columns, self.grid, self.rule = title, list(rows), list(columns), grid, rule


def heatmaps(panels: Sequence[Panel], path: Path, vmax: float, text, xlabel: str, ylabel: str, bar: str) -> Path:
    """Red-yellow-green heatmaps over 0..``vmax``, four panels to a row, each cell written with ``text(value)``."""
    ncols = min(4, len(panels))
    nrows = -(-len(panels) // ncols)
    width = max(3.0, 1.1 * max(len(p.columns) for p in panels) + 1.5)
    height = max(3.0, 0.45 * max(len(p.rows) for p in panels) + 1.5)
    fig, axes = figure(ncols, nrows, width=width, height=height)
    for ax in axes.flat[len(panels) :]:
        ax.set_axis_off()
    image = None
    for ax, panel in zip(axes.flat, panels, strict=False):
        image = ax.imshow(panel.grid, cmap="RdYlGn", vmin=0.0, vmax=vmax, aspect="auto")
        for i, line in enumerate(panel.grid):
            for j, value in enumerate(line):
                if not math.isnan(value):
                    ax.text(j, i, text(value), ha="center", va="center", fontsize=8)
        if panel.rule:
            ax.axhline(panel.rule - 0.5, color="black", linewidth=1)
        ax.set_xticks(range(len(panel.columns)), [str(c) for c in panel.columns])
        ax.set_yticks(range(len(panel.rows)), panel.rows)
        ax.set(xlabel=xlabel, ylabel=ylabel, title=panel.title)
        ax.title.set_fontsize(8)
        ax.tick_params(labelsize=7)
    fig.colorbar(image, ax=axes.ravel().tolist(), label=bar)
    return save(fig, path)
