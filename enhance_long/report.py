"""Tables and plots from result rows: per job, at the root of a multirun, or later from any output folders.

    python -m enhance_long.report multirun/perplexity            # rebuild a sweep's report in place
    python -m enhance_long.report outputs/a outputs/b --out cmp  # merge several runs into cmp/

Writes ``results.csv`` (every row, nested values as JSON), ``table.md`` (methods x lengths per task) and PNG plots:
``ppl_vs_length.png`` (one line per method, log scale), ``ppl_by_position.png`` (perplexity per position bucket,
one panel per length) and ``passkey_heatmap.png`` (depth x length per method, red-yellow-green). A method's label
is its ``method`` field plus whichever other settings (model, attention, data, task knobs) vary across the rows.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import io
import json
import logging
import math
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from enhance_long.results import load_results, write_atomic
from enhance_long.tasks import get_task

log = logging.getLogger(__name__)

LABEL_FIELDS = ("model", "attention", "data", "seed")  # besides the method, shown in a label when they vary
FIRST_COLUMNS = ("task", "model", "method", "rope", "alpha", "logn", "attention", "ctx", "depth", "doc")


def aggregate_rows(rows: Iterable[dict]) -> list[dict]:
    """The rows that summarise a cell: perplexity's ``doc == "all"``, and every row of tasks without documents."""
    return [row for row in rows if row.get("doc", "all") == "all"]


def labels(rows: Sequence[dict]) -> dict[str, str]:
    """A readable, unique label per result key: the method plus the settings that vary among these rows."""
    varying = [f for f in LABEL_FIELDS if len({json.dumps(r.get(f), default=str) for r in rows}) > 1]
    knobs = sorted({k for r in rows for k in r.get("settings", {})})
    varying_knobs = [k for k in knobs if len({json.dumps(r.get("settings", {}).get(k)) for r in rows}) > 1]
    out = {}
    for row in rows:
        parts = [str(row.get("method"))]
        parts += [f"{f}={row.get(f)}" for f in varying]
        parts += [f"{k}={row.get('settings', {}).get(k)}" for k in varying_knobs]
        out[row["key"]] = ", ".join(parts)
    return out


def _ordered_labels(rows: Sequence[dict], label_of: dict[str, str]) -> list[str]:
    """Labels in first-seen order, the stock model (rope=none without LogN) first."""
    first = {}
    for index, row in enumerate(rows):
        label = label_of[row["key"]]
        baseline = row.get("rope") == "none" and not row.get("logn")
        first.setdefault(label, (not baseline, index))
    return sorted(first, key=first.get)


def _grid(rows: Sequence[dict], value: str) -> tuple[list[str], list[int], dict[tuple[str, int], list[float]]]:
    label_of = labels(rows)
    ctxs = sorted({row["ctx"] for row in rows})
    cells: dict[tuple[str, int], list[float]] = {}
    for row in rows:
        if row.get(value) is not None:
            cells.setdefault((label_of[row["key"]], row["ctx"]), []).append(row[value])
    return _ordered_labels(rows, label_of), ctxs, cells


def markdown_table(header: Sequence[str], body: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(map(str, line)) + " |" for line in body]
    return "\n".join(lines) + "\n"


def _fmt_ppl(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value:.2f}" if value < 1000 else f"{value:.3g}"


def _describe(rows: Sequence[dict]) -> str:
    models = ", ".join(sorted({str(r.get("model")) for r in rows}))
    data = sorted({str(r.get("data")) for r in rows if r.get("data")})
    return f"model {models}" + (f", data {', '.join(data)}" if data else "")


def perplexity_table(rows: Sequence[dict]) -> str:
    """Methods x lengths of the aggregate perplexity (lower is better)."""
    rows = aggregate_rows(r for r in rows if r.get("task") == "perplexity")
    order, ctxs, cells = _grid(rows, "ppl")
    body = [
        [label, *(_fmt_ppl(cells[(label, c)][-1]) if (label, c) in cells else "-" for c in ctxs)] for label in order
    ]
    title = f"### Perplexity (lower is better; {_describe(rows)})\n\n"
    return title + markdown_table(["method", *ctxs], body)


def passkey_table(rows: Sequence[dict]) -> str:
    """Methods x lengths of passkey accuracy, averaged over depths."""
    rows = [r for r in rows if r.get("task") == "passkey"]
    order, ctxs, cells = _grid(rows, "accuracy")

    def cell(label, ctx):
        values = cells.get((label, ctx))
        return f"{100 * sum(values) / len(values):.0f}%" if values else "-"

    body = [[label, *(cell(label, c) for c in ctxs)] for label in order]
    title = f"### Passkey accuracy, mean over depths ({_describe(rows)})\n\n"
    return title + markdown_table(["method", *ctxs], body)


def tables(rows: Sequence[dict]) -> str:
    """The Markdown report: one table per task present in ``rows``."""
    tasks = list(dict.fromkeys(row.get("task") for row in rows))
    parts = []
    for task in tasks:
        if task == "perplexity":
            parts.append(perplexity_table(rows))
        elif task == "passkey":
            parts.append(passkey_table(rows))
        elif task == "longbench" and importlib.util.find_spec("enhance_long.tasks.longbench"):
            from enhance_long.tasks.longbench import longbench_table

            parts.append(longbench_table([r for r in rows if r.get("task") == "longbench"]))
        elif task == "ruler":
            parts.append(get_task("ruler").table([r for r in rows if r.get("task") == "ruler"]))
        elif task == "lm_eval" and importlib.util.find_spec("enhance_long.tasks.harness"):
            from enhance_long.tasks.harness import harness_table

            parts.append(harness_table([r for r in rows if r.get("task") == "lm_eval"]))
        else:
            parts.append(f"### {task}\n\n{sum(r.get('task') == task for r in rows)} rows; see results.jsonl\n")
    return "\n".join(parts)


def _figure(ncols: int, nrows: int = 1, width: float = 5.0, height: float = 3.8):
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _save(fig, path: Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    write_atomic(path, buffer.getvalue())
    return path


def _styles(order: Sequence[str]) -> dict[str, dict]:
    """A distinct line per method: the ten default colours, then the same colours dashed, dotted, ..."""
    from matplotlib import colormaps

    colours = colormaps["tab10"].colors
    lines, markers = ("-", "--", ":", "-."), ("o", "s", "^", "D")
    return {
        label: {"color": colours[i % 10], "linestyle": lines[i // 10 % 4], "marker": markers[i // 10 % 4]}
        for i, label in enumerate(order)
    }


def plot_ppl_vs_length(rows: Sequence[dict], path: Path) -> Path | None:
    rows = aggregate_rows(r for r in rows if r.get("task") == "perplexity")
    if not rows:
        return None
    order, ctxs, cells = _grid(rows, "ppl")
    fig, axes = _figure(1, width=6.5, height=4.5)
    ax = axes[0][0]
    styles = _styles(order)
    for label in order:
        points = [(c, cells[(label, c)][-1]) for c in ctxs if (label, c) in cells]
        ax.plot([p[0] for p in points], [p[1] for p in points], label=label, **styles[label])
    ax.set(xscale="log", yscale="log", xlabel="context length (tokens)", ylabel="perplexity")
    ax.set_xticks(ctxs, [str(c) for c in ctxs])
    ax.set_title(f"Perplexity vs length ({_describe(rows)})", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_ppl_by_position(rows: Sequence[dict], path: Path) -> Path | None:
    rows = [r for r in aggregate_rows(rows) if r.get("task") == "perplexity" and r.get("buckets")]
    if not rows:
        return None
    label_of = labels(rows)
    order = _ordered_labels(rows, label_of)
    ctxs = sorted({row["ctx"] for row in rows})
    fig, axes = _figure(len(ctxs))
    styles = _styles(order)
    for ax, ctx in zip(axes[0], ctxs, strict=True):
        for label in order:
            matching = [r for r in rows if r["ctx"] == ctx and label_of[r["key"]] == label]
            if not matching:
                continue
            buckets = [b for b in matching[-1]["buckets"] if b["ppl"] is not None]
            style = {**styles[label], "marker": "."}
            ax.plot([b["end"] for b in buckets], [b["ppl"] for b in buckets], label=label, **style)
        ax.set(yscale="log", xlabel="position in window (bucket end, tokens)", ylabel="perplexity", title=f"ctx={ctx}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    return _save(fig, path)


def plot_passkey_heatmap(rows: Sequence[dict], path: Path) -> Path | None:
    rows = [r for r in rows if r.get("task") == "passkey"]
    if not rows:
        return None
    label_of = labels(rows)
    order = _ordered_labels(rows, label_of)
    ctxs = sorted({r["ctx"] for r in rows})
    depths = sorted({r["depth"] for r in rows})
    ncols = min(4, len(order))  # wrap: a leaderboard has a dozen methods
    nrows = -(-len(order) // ncols)
    width, height = max(3.0, 1.1 * len(ctxs) + 1.5), max(3.0, 0.45 * len(depths) + 1.5)
    fig, axes = _figure(ncols, nrows, width=width, height=height)
    for ax in axes.flat[len(order) :]:
        ax.set_axis_off()
    for ax, label in zip(axes.flat, order, strict=False):
        grid = [[math.nan] * len(ctxs) for _ in depths]
        for r in rows:
            if label_of[r["key"]] == label:
                grid[depths.index(r["depth"])][ctxs.index(r["ctx"])] = r["accuracy"]
        image = ax.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
        for i in range(len(depths)):
            for j in range(len(ctxs)):
                if not math.isnan(grid[i][j]):
                    ax.text(j, i, f"{100 * grid[i][j]:.0f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(ctxs)), [str(c) for c in ctxs])
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set(xlabel="context length", ylabel="depth", title=label)
        ax.title.set_fontsize(8)
    fig.colorbar(image, ax=axes.ravel().tolist(), label="accuracy")
    return _save(fig, path)


def _csv_value(value: Any) -> Any:
    return json.dumps(value, default=str) if isinstance(value, dict | list) else value


def write_csv(rows: Sequence[dict], path: Path) -> Path:
    columns = [c for c in FIRST_COLUMNS if any(c in r for r in rows)]
    columns += [c for c in dict.fromkeys(k for r in rows for k in r) if c not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows({c: _csv_value(r.get(c)) for c in columns} for r in rows)
    write_atomic(path, buffer.getvalue())
    return path


def write_report(rows: Sequence[dict], out_dir: Path, with_csv: bool = True) -> list[Path]:
    """Write ``table.md``, the plots and (``with_csv``) ``results.csv`` for ``rows`` into ``out_dir``."""
    out_dir = Path(out_dir)
    written = [write_csv(rows, out_dir / "results.csv")] if with_csv else []
    table = out_dir / "table.md"
    write_atomic(table, tables(rows))
    written.append(table)
    for plot, name in (
        (plot_ppl_vs_length, "ppl_vs_length.png"),
        (plot_ppl_by_position, "ppl_by_position.png"),
        (plot_passkey_heatmap, "passkey_heatmap.png"),
    ):
        path = plot(rows, out_dir / name)
        if path is not None:
            written.append(path)
    if any(row.get("task") == "ruler" for row in rows):
        written += get_task("ruler").plots([r for r in rows if r.get("task") == "ruler"], out_dir)
    return written


def build_report(paths: Sequence[Path], out_dir: Path) -> list[Path]:
    """Merge the results under ``paths`` (one copy per cell) and write the report into ``out_dir``."""
    rows = load_results(paths)
    if not rows:
        raise FileNotFoundError(f"no result rows under {', '.join(map(str, paths))}; nothing to report")
    return write_report(rows, out_dir)


class MultirunReport(Callback):
    """Hydra callback: when a multirun ends, write the merged report at the sweep root (conf/hydra/default.yaml)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            written = build_report([sweep_dir], sweep_dir)
        except FileNotFoundError as error:
            log.warning("no sweep report: %s", error)
            return
        log.info("sweep report: %s", ", ".join(str(p) for p in written))
        print((sweep_dir / "table.md").read_text())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m enhance_long.report",
        description="Merge results.jsonl files of run.py output folders into results.csv, table.md and plots.",
    )
    parser.add_argument("dirs", nargs="+", type=Path, help="output folders (searched recursively) or result files")
    parser.add_argument("--out", type=Path, help="where to write; default: the folder, when exactly one is given")
    args = parser.parse_args(argv)
    if args.out is None and not (len(args.dirs) == 1 and args.dirs[0].is_dir()):
        parser.error("several inputs given; choose where the merged report goes with --out DIR")
    try:
        written = build_report(args.dirs, args.out or args.dirs[0])
    except FileNotFoundError as error:
        parser.exit(1, f"error: {error}\n")
    print((Path(args.out or args.dirs[0]) / "table.md").read_text())
    print("wrote " + ", ".join(str(p) for p in written), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
