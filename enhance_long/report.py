"""Tables and plots from result rows: per job, at the root of a multirun, or later from any output folders.

    python -m enhance_long.report multirun/perplexity            # rebuild a sweep's report in place
    python -m enhance_long.report outputs/a outputs/b --out cmp  # merge several runs into cmp/

Writes ``results.csv`` (every row, nested values as JSON), ``table.md`` (one section per task, in the order the
tasks first appear) and each task's PNG plots (perplexity: ``ppl_vs_length.png``, ``ppl_by_position.png``;
passkey: ``passkey_heatmap.png``; RULER: ``ruler_heatmap.png``). Each task's own module renders its section and
plots (``Task.table``, ``Task.plots``); rows of a task this checkout does not have get a line that counts them.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from enhance_long.results import load_results, write_atomic
from enhance_long.tasks import find_task

log = logging.getLogger(__name__)

FIRST_COLUMNS = ("task", "model", "method", "rope", "alpha", "logn", "attention", "ctx", "depth", "doc")


def by_task(rows: Sequence[dict]) -> dict[str, list[dict]]:
    """Rows grouped by their ``task``, in the order the tasks first appear."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(str(row.get("task")), []).append(row)
    return groups


def tables(rows: Sequence[dict]) -> str:
    """The Markdown report: one section per task present in ``rows``."""
    parts = []
    for name, task_rows in by_task(rows).items():
        task = find_task(name)
        parts.append(task.table(task_rows) if task else f"### {name}\n\n{len(task_rows)} rows; see results.jsonl\n")
    return "\n".join(parts)


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
    for name, task_rows in by_task(rows).items():
        task = find_task(name)
        if task is not None:
            written += task.plots(task_rows, out_dir)
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
