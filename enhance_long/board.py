"""The leaderboard: one table over perplexity, passkey and RULER rows, with intervals, and its plots.

    python -m enhance_long.board multirun/leaderboard docs/leaderboard --out docs/leaderboard   # board.md, results, plots

One line per method (a short label: the rope method, the knobs it sets away from their defaults, ``+logn``):

* perplexity at each length, pooled over the windows (the task's ``doc="all"`` row) with an interval of +- 2
  standard errors of the per-window log-perplexity (each document contributes one window per length);
* ``helps``: the perplexity of the last ``task.tail_tokens`` tokens of each longest window read with the whole window before
  them, divided by their perplexity in a window of their own (the same tokens, so the ratio compares like with
  like; below 1 means the method uses the far context), with its interval over windows;
* ``cached``: perplexity at the lengths of ``task.cached_at``, fed through the KV cache in chunks (how generation
  reads a long prompt), beside the one-forward figure of the same windows; ``=`` where ``task.cached_for=dynamic``
  left the forward out because the method's keys keep their rotation once written (the same figure to rounding);
* passkey: keys found / asked at each length, over every depth and trial, with a Wilson 95% interval;
* RULER: the average over the tasks run at each length, and the effective length (the longest length whose average
  stays at or above the threshold, RULER's 85.6 by default).

Below the table, each method against the best row of each length on the same tokens (the ratio of perplexities over
the position ranges every window is split into, with +- 2 standard errors over those ranges): pairing removes what the
text contributes to both rows, so it resolves differences that two windows' intervals cannot; ``~`` marks the ones it
does not resolve either.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from enhance_long.methods.catalog import CATALOG
from enhance_long.plots import band_panels, length_plot
from enhance_long.report import by_task, write_csv
from enhance_long.results import RESULTS, load_results, read_rows, write_atomic, write_rows
from enhance_long.tables import markdown_table
from enhance_long.tasks import find_task
from enhance_long.tasks.perplexity import plot_ppl_by_position

Z = 2.0  # +- 2 standard errors for perplexity
WILSON_Z = 1.96  # 95% for passkey
PARTIAL = " (partial)"  # a passkey or RULER figure over fewer cells than other rows have: the sweep is still on it
ROUNDING = 1e-4  # relative: perplexities this close are one model to rounding (AVX2 vs AVX-512 kernels: ~1e-5)


def short_label(row: dict) -> str:
    """``consistent_ntk(schedule=per_forward,bucket=1)+logn``: the method, the knobs away from their defaults, LogN."""
    rope = str(row.get("rope"))
    defaults = CATALOG[rope].defaults if rope in CATALOG else {}
    changed = [f"{k}={_text(v)}" for k, v in (row.get("knobs") or {}).items() if defaults.get(k) != v]
    label = f"{rope}({','.join(changed)})" if changed else rope
    return label + ("+logn" if row.get("logn") else "")


def _text(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def interval(values: Sequence[float], z: float = Z) -> tuple[float, float] | None:
    """exp(mean +- z * standard error) of log-values; None for fewer than two."""
    if len(values) < 2:
        return None
    logs = [math.log(v) for v in values]
    mean = sum(logs) / len(logs)
    se = math.sqrt(sum((x - mean) ** 2 for x in logs) / (len(logs) - 1) / len(logs))
    return math.exp(mean - z * se), math.exp(mean + z * se)


def wilson(correct: int, trials: int, z: float = WILSON_Z) -> tuple[float, float]:
    """The Wilson score interval of a proportion."""
    p = correct / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return max(0.0, centre - half), min(1.0, centre + half)


def _band(value: float, bounds: tuple[float, float] | None, digits: int = 2) -> str:
    text = f"{value:.{digits}f}" if value < 1000 else f"{value:.3g}"
    return text if bounds is None else f"{text} [{bounds[0]:.{digits}f}, {bounds[1]:.{digits}f}]"


class Board:
    """The rows of a leaderboard sweep, by method and task."""

    def __init__(self, rows: Sequence[dict]):
        self.rows = list(rows)
        self.tasks = by_task(self.rows)
        self.methods = list(dict.fromkeys(short_label(r) for r in sorted(self.rows, key=_stock_first)))

    def of(self, task: str, method: str) -> list[dict]:
        return [r for r in self.tasks.get(task, []) if short_label(r) == method]

    def lengths(self, task: str) -> list[int]:
        return sorted({int(r["ctx"]) for r in self.tasks.get(task, [])})

    def partial(self, task: str, method: str) -> bool:
        """Whether ``method`` lacks cells of ``task`` that other methods have (lengths, depths, RULER tasks): a row
        the sweep has not finished."""
        every = {_cell(r) for r in self.tasks.get(task, [])}
        return {_cell(r) for r in self.of(task, method)} != every

    def perplexity(self, method: str, ctx: int, field: str = "ppl") -> tuple[float, tuple | None] | None:
        rows = [r for r in self.of("perplexity", method) if r["ctx"] == ctx]
        pooled = [r for r in rows if r.get("doc") == "all" and r.get(field) is not None]
        if not pooled:
            return None
        windows = [r[field] for r in rows if r.get("doc") != "all" and r.get(field) is not None]
        return pooled[-1][field], interval(windows)

    def blocks(self, method: str, ctx: int) -> dict[tuple[str, int], float]:
        """The log-perplexity of each position range (the task's ``buckets``) of each document's windows at ``ctx``,
        keyed by (document, range start): the same tokens for every method of one sweep."""
        return {
            (r["doc"], b["start"]): math.log(b["ppl"])
            for r in self.of("perplexity", method)
            if r["ctx"] == ctx and r.get("doc") != "all"
            for b in r.get("buckets") or []
            if b.get("tokens")
        }

    def paired(self, method: str, other: str, ctx: int) -> tuple[float, tuple | None] | None:
        """ppl(method) / ppl(other) on the same tokens: the geometric mean of the ratio over the position ranges both
        scored, with +- 2 standard errors over those ranges (None where they share none). Pairing removes what the
        text contributes to both, so it resolves differences that the per-row intervals over windows cannot."""
        mine, theirs = self.blocks(method, ctx), self.blocks(other, ctx)
        shared = sorted(mine.keys() & theirs.keys())
        if not shared:
            return None
        gaps = [mine[k] - theirs[k] for k in shared]  # log ratios
        return math.exp(sum(gaps) / len(gaps)), interval([math.exp(g) for g in gaps])

    def best(self, ctx: int) -> str | None:
        """The method with the lowest pooled perplexity at ``ctx``; of rows equal to ``ROUNDING`` (the same model
        inside its trained length, through other kernels) the first in the board's order, the stock model first."""
        scored = [(m, value[0]) for m in self.methods if (value := self.perplexity(m, ctx)) is not None]
        lowest = min((v for _, v in scored), default=None)
        return next((m for m, v in scored if v <= lowest * (1 + ROUNDING)), None)

    def longest_windows(self) -> list[dict]:
        """The pooled perplexity rows at the longest length, labelled by method: where each method breaks, by position
        in that window."""
        rows = [r for r in self.tasks.get("perplexity", []) if r.get("doc") == "all"]
        longest = max((r["ctx"] for r in rows), default=None)
        return [{**r, "method": short_label(r)} for r in rows if r["ctx"] == longest]

    def cached_same(self, method: str, ctx: int) -> bool:
        """Whether the cached column was left out at ``ctx`` as exact (``task.cached_for=dynamic``)."""
        return any(r.get("cached_same") for r in self.of("perplexity", method) if r["ctx"] == ctx)

    def helps(self, method: str) -> tuple[float, tuple | None] | None:
        rows = [r for r in self.of("perplexity", method) if r.get("tail_ppl") is not None]
        if not rows:
            return None
        longest = max(r["ctx"] for r in rows)
        rows = [r for r in rows if r["ctx"] == longest]
        pooled = [r for r in rows if r.get("doc") == "all"][-1]
        ratios = [r["tail_ppl"] / r["tail_alone_ppl"] for r in rows if r.get("doc") != "all"]
        return pooled["tail_ppl"] / pooled["tail_alone_ppl"], interval(ratios)

    def passkey(self, method: str, ctx: int) -> tuple[int, int] | None:
        rows = [r for r in self.of("passkey", method) if r["ctx"] == ctx]
        if not rows:
            return None
        return sum(r["correct"] for r in rows), sum(r["trials"] for r in rows)

    def ruler(self, method: str) -> tuple[dict[int, float], str] | None:
        rows = self.of("ruler", method)
        if not rows:
            return None
        from enhance_long.tasks.ruler import method_scores

        scores = next(iter(method_scores([{**r, "method": method} for r in rows]).values()))
        return scores.averages(), scores.effective()

    def table(self) -> str:
        ppl_ctxs, key_ctxs, ruler_ctxs = self.lengths("perplexity"), self.lengths("passkey"), self.lengths("ruler")
        cached_ctxs = sorted(
            {
                r["ctx"]
                for r in self.tasks.get("perplexity", [])
                if r.get("cached_ppl") is not None or r.get("cached_same")
            }
        )
        header = ["method", *(f"ppl {_k(c)}" for c in ppl_ctxs)]
        header += ["helps (tail ppl ratio)"] if any(self.helps(m) for m in self.methods) else []
        header += [f"ppl {_k(c)} cached" for c in cached_ctxs]
        header += [f"passkey {_k(c)}" for c in key_ctxs]
        header += [f"RULER {_k(c)}" for c in ruler_ctxs] + (["effective length"] if ruler_ctxs else [])
        body = []
        for method in self.methods:
            line = [method]
            for c in ppl_ctxs:
                value = self.perplexity(method, c)
                line.append(_band(*value) if value else "-")
            if "helps (tail ppl ratio)" in header:
                value = self.helps(method)
                line.append(_band(*value, digits=3) if value else "-")
            for c in cached_ctxs:
                value = self.perplexity(method, c, "cached_ppl")
                line.append(_band(value[0], None) if value else "=" if self.cached_same(method, c) else "-")
            for c in key_ctxs:
                found = self.passkey(method, c)
                low, high = wilson(*found) if found else (None, None)
                line.append(f"{found[0]}/{found[1]} [{low:.2f}, {high:.2f}]" if found else "-")
                line[-1] += PARTIAL if found and self.partial("passkey", method) else ""
            if ruler_ctxs:
                ruler = self.ruler(method)
                mark = PARTIAL if ruler and self.partial("ruler", method) else ""
                line += [f"{ruler[0][c]:.1f}{mark}" if ruler and c in ruler[0] else "-" for c in ruler_ctxs]
                line.append(ruler[1] + mark if ruler else "-")
            body.append(line)
        return markdown_table(header, body)

    def paired_table(self) -> str:
        """Each method's perplexity over the best one's at each length, paired over position ranges; ``~`` marks an
        interval that holds 1 or a ratio within ``ROUNDING`` of it (the difference from the best is not resolved, or
        is rounding)."""
        ctxs = self.lengths("perplexity")
        bests = {c: self.best(c) for c in ctxs}
        body = []
        for method in self.methods:
            line = [method]
            for c in ctxs:
                value = None if method == bests[c] else self.paired(method, bests[c], c)
                if value is None:
                    line.append("best" if method == bests[c] else "-")
                    continue
                inside = value[1] is not None and value[1][0] <= 1.0 <= value[1][1]
                same = inside or abs(math.log(value[0])) <= ROUNDING
                line.append(_band(*value, digits=3) + (" ~" if same else ""))
            body.append(line)
        return markdown_table(["method", *(f"ppl {_k(c)} / best" for c in ctxs)], body)

    def positions_table(self) -> str | None:
        """Each method's perplexity by position range in the longest windows (the task's buckets, pooled over the
        windows by their tokens): where each method breaks, in figures beside ``ppl_by_position.png``."""
        pooled = self.longest_windows()
        ranges = sorted({(b["start"], b["end"]) for r in pooled for b in r.get("buckets") or [] if b.get("tokens")})
        if not ranges:
            return None
        body = []
        for method in self.methods:
            nll: dict[int, list[float]] = {}
            for row in (r for r in pooled if r["method"] == method):
                for b in (b for b in row.get("buckets") or [] if b.get("tokens")):
                    total = nll.setdefault(b["start"], [0.0, 0.0])
                    total[0] += b["tokens"] * math.log(b["ppl"])
                    total[1] += b["tokens"]
            if nll:
                cells = [f"{math.exp(nll[a][0] / nll[a][1]):.1f}" if a in nll else "-" for a, _ in ranges]
                body.append([method, *cells])
        return markdown_table(["method", *(f"{_k(a) if a else 0}-{_k(b)}" for a, b in ranges)], body)

    def wall_table(self) -> str:
        """The wall time the runner recorded for each row's cells, in minutes by task (each cell once, however many
        rows it wrote), and the board's total: what the board cost on the machines listed below it."""
        tasks = [t for t in ("perplexity", "passkey", "ruler") if self.tasks.get(t)]
        tasks += [t for t in self.tasks if t not in tasks]
        seconds: dict[tuple[str, str], dict[str, float]] = {}
        for row in self.rows:
            if row.get("seconds") is not None:
                seconds.setdefault((short_label(row), row["task"]), {})[row["key"]] = row["seconds"]
        minutes = {k: sum(v.values()) / 60 for k, v in seconds.items()}
        body = []
        for method in self.methods:
            line = [f"{minutes[(method, t)]:.0f}" if (method, t) in minutes else "-" for t in tasks]
            mine = [minutes[(method, t)] for t in tasks if (method, t) in minutes]
            body.append([method, *line, f"{sum(mine):.0f}"])
        total = sum(minutes.values())
        body.append(["all rows", *(f"{sum(v for (_, t), v in minutes.items() if t == task):.0f}" for task in tasks)])
        body[-1].append(f"{total:.0f} ({total / 60:.1f} h)")
        return markdown_table(["method", *(f"{t} min" for t in tasks), "row min"], body)

    def coverage(self, plan: dict | None = None) -> str:
        """One line: for each task, the methods with rows (of the sweep's planned rows, where ``plan`` gives them), and
        those missing lengths that other methods have (a sweep still running)."""
        tasks = list(plan["tasks"]) if plan else list(self.tasks)
        parts = []
        for task in tasks:
            methods = [m for m in self.methods if self.of(task, m)]
            partial = [m for m in methods if self.partial(task, m)]
            text = f"{task} {len(methods)}" + (f" of {plan['rows']}" if plan else "")
            parts.append(text + (f" (partial: {', '.join(partial)})" if partial else ""))
        return "Rows measured: " + "; ".join(parts) + "."

    def report(self, plan: dict | None = None) -> str:
        """``board.md``: how much of the sweep it holds, the table, what its intervals are, and the paired comparison
        with the best row."""
        parts = [self.coverage(plan), self.table(), LEGEND]
        if self.tasks.get("perplexity"):
            parts += [PAIRED_LEGEND, self.paired_table()]
        positions = self.positions_table()
        if positions:
            longest = _k(max(self.lengths("perplexity")))
            parts += [POSITIONS_LEGEND.format(longest=longest), positions]
        if any(r.get("seconds") is not None for r in self.rows):
            parts += [WALL_LEGEND, self.wall_table()]
        return "\n\n".join([*parts, self.machines()]) + "\n"

    def machines(self) -> str:
        """Where the rows were measured: each machine with the (task, method) rows measured on it."""
        where: dict[str, dict[str, None]] = {}
        for row in self.rows:
            name = row.get("machine") or "not recorded (rows from before they carried it)"
            where.setdefault(name, {})[f"{row['task']} {short_label(row)}"] = None
        lines = [f"* {name}: {', '.join(rows)}" for name, rows in where.items()]
        return "Measured on (CPUs with other vector kernels differ by ~1e-5 of a perplexity):\n\n" + "\n".join(lines)

    def ppl_series(self) -> dict[str, list[tuple]]:
        """Each method's (length, perplexity, band) points."""
        series = {}
        for method in self.methods:
            values = [(c, self.perplexity(method, c)) for c in self.lengths("perplexity")]
            series[method] = [(c, v[0], v[1]) for c, v in values if v is not None]
        return series

    def plot_perplexity(self, path: Path) -> Path | None:
        if not self.lengths("perplexity"):
            return None
        return length_plot(self.ppl_series(), path, "perplexity (+- 2 SE over windows)", legend_cols=2, zoom=1.6)

    def plot_bands(self, path: Path) -> Path | None:
        """``ppl_bands.png``: each method's perplexity with its band in a panel of its own, the best row at the
        longest length in grey behind it."""
        ctxs = self.lengths("perplexity")
        if not ctxs:
            return None
        return band_panels(self.ppl_series(), path, "perplexity (+- 2 SE)", reference=self.best(ctxs[-1]))


LEGEND = (
    "Perplexity: pooled over the windows, [exp(mean +- 2 standard errors) of the per-window log-perplexity] (with two "
    "windows a rough band, not a 95% interval). helps: the last tail tokens of the longest window read after the rest "
    "of it, over the same tokens alone (below 1: the far context helps). cached: the same windows fed through the KV "
    "cache in chunks; `=` where the method's keys keep their rotation once written (the same figure to rounding). "
    "Passkey: keys found / asked [Wilson 95%]. RULER: the mean score over its tasks; the effective length is the "
    "longest length whose mean stays at or above the threshold."
)
PAIRED_LEGEND = (
    "Each method against the best row of each length on the same tokens: the geometric mean over position ranges "
    "(the perplexity task's buckets, in every window) of ppl(method) / ppl(best), [+- 2 standard errors over those "
    "ranges]; `~` where the interval holds 1, so the board does not resolve the difference from the best, or where "
    "the ratio is within 1e-4 of 1 (the same model to rounding, as every row is inside the trained length)."
)

POSITIONS_LEGEND = (
    "Perplexity by position in the {longest} windows (each position range pooled over the windows by its tokens): "
    "where each method breaks. The first ranges hold few tokens of context, so every row scores them alike."
)
WALL_LEGEND = (
    "Wall time the runner recorded, in minutes (each cell once; a perplexity cell that reads its length off a forward "
    "an earlier cell made records almost nothing of its own). The machines differ between rows (listed below), and some cells ran "
    "beside tests or benchmarks: a record of what this board cost, not a benchmark of the methods."
)


def _cell(row: dict) -> tuple:
    """What a row measures within its task, whatever the method: its length, passkey depth and RULER task."""
    return row["ctx"], row.get("depth"), row.get("ruler_task")


def _stock_first(row: dict) -> bool:
    return not (row.get("rope") == "none" and not row.get("logn"))


def _k(ctx: int) -> str:
    return f"{ctx // 1024}k" if ctx % 1024 == 0 else str(ctx)


def sweep_plan(dirs: Sequence[Path]) -> dict | None:
    """The tasks and the number of rows per task that the sweep under ``dirs`` plans, from its ``multirun.yaml``
    (Hydra's record of the sweep: rows = the product of the value counts of every swept key but ``task``); None where
    there is none, or where a key sweeps a range or a glob whose values it does not list."""
    from omegaconf import OmegaConf

    for folder in dirs:
        for path in sorted(Path(folder).rglob("multirun.yaml")):
            params = OmegaConf.select(OmegaConf.load(path), "hydra.sweeper.params", default=None) or {}
            values = {key: str(value).split(",") for key, value in params.items()}
            if any("(" in v for vs in values.values() for v in vs):
                return None
            rows = math.prod(len(vs) for key, vs in values.items() if key != "task")
            return {"tasks": values.get("task", []), "rows": rows}
    return None


def write_board(rows: Sequence[dict], out_dir: Path, plan: dict | None = None) -> list[Path]:
    """``board.md`` (with how much of ``plan``, a sweep's planned tasks and rows, it holds), ``results.csv`` (every
    row), ``results.jsonl`` (the same rows as the runner stores them, for ``reuse``) and the plots: perplexity vs
    length with bands, perplexity by position in the longest window, one heatmap per method for passkey and RULER."""
    out_dir = Path(out_dir)
    board = Board(rows)
    written = [write_csv(rows, out_dir / "results.csv"), write_rows(rows, out_dir / RESULTS)]
    write_atomic(out_dir / "board.md", board.report(plan))
    written.append(out_dir / "board.md")
    plots = [board.plot_perplexity(out_dir / "ppl_vs_length.png"), board.plot_bands(out_dir / "ppl_bands.png")]
    written += [plot for plot in plots if plot]
    written += plot_ppl_by_position(board.longest_windows(), out_dir, order=board.methods, zoom=1.6)
    for name in ("passkey", "ruler"):
        task = find_task(name)
        if task is not None and board.tasks.get(name):
            labelled = [{**r, "method": short_label(r)} for r in board.tasks[name]]
            labelled.sort(key=lambda r: board.methods.index(r["method"]))  # panels in the table's order
            written += task.plots(labelled, out_dir)
    return written


def in_earlier_order(rows: Sequence[dict], earlier: Path) -> list[dict]:
    """``rows`` with the cells of an earlier board's ``results.jsonl`` first, in its order, and the new cells after
    them in theirs: re-rendering a board only appends to its files, and its table keeps the order of its rows."""
    if not earlier.is_file():
        return list(rows)
    place = {key: i for i, key in enumerate(dict.fromkeys(r["key"] for r in read_rows(earlier)))}
    return sorted(rows, key=lambda row: place.get(row["key"], len(place)))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m enhance_long.board", description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", type=Path, help="output folders of the leaderboard (searched recursively)")
    parser.add_argument(
        "--out", type=Path, required=True, help="where board.md, results.csv, results.jsonl and the plots go"
    )
    args = parser.parse_args(argv)
    try:
        rows = load_results(args.dirs)
    except FileNotFoundError as error:
        parser.exit(1, f"error: {error}\n")
    if not rows:
        parser.exit(1, f"error: no result rows under {', '.join(map(str, args.dirs))}\n")
    written = write_board(in_earlier_order(rows, args.out / RESULTS), args.out, sweep_plan(args.dirs))
    print((args.out / "board.md").read_text())
    print("wrote " + ", ".join(str(p) for p in written), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
