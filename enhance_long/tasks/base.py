"""The contract between the runner and an evaluation task: everything a task knows lives in its own module.

A task splits its work into *cells* (one context length, one depth, one dataset, ...). The runner asks the task
for its cells, skips those already measured (resume), and asks the task to measure each remaining cell. Each
measured cell yields result rows: flat JSON-able dicts that the runner extends with the run's identity (model,
method, attention, ...) and writes to ``results.jsonl``. The task also owns how its rows read: its Markdown table,
its one-line log summary, its plots. Adding a task is one module in ``enhance_long/tasks/`` that defines
``TASK = MyTask()`` and one YAML in ``conf/task/``::

    @dataclass
    class CountConfig:
        name: str = "count"  # the task's name
        words: int = 3  # words per sample

    class Count(Task):
        name, schema, uses_data = "count", CountConfig, False

        def cells(self, cfg, ctxs):
            return [{"ctx": int(ctx)} for ctx in ctxs]

        def measure(self, env, cell):
            return [{**cell, "score": 1.0}]

    TASK = Count()

The runner, the config, the report and the tracker read only what is declared here; none of them names a task.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class TaskEnv:
    """Everything a task may use while measuring: built once per job by the runner."""

    model: Any  # a transformers PreTrainedModel, already patched by enhance_long.apply
    tokenizer: Any
    cfg: Any  # the task's own config group (DictConfig)
    data_cfg: Any  # the data config group (DictConfig); tasks that bring their own data may ignore it
    out_dir: Path  # the job's output directory (tasks may write side files such as predictions.jsonl)
    seed: int = 0
    progress: bool = True  # show progress bars
    cache: dict = field(default_factory=dict)  # per-job memo shared across cells (e.g. tokenized documents)


class Task:
    """An evaluation task. Subclasses set ``name`` and implement :meth:`cells` and :meth:`measure`; every other
    member has a default that suits a task whose rows are one per cell with a ``score``."""

    name: str = ""
    schema: type | None = None  # the structured config of conf/task/<name>.yaml, registered as task/<name>_schema
    uses_data: bool = True  # whether rows depend on the data group (else data=... is left out of their identity)

    def check(self, cfg: Any, ctxs: Sequence[int]) -> None:
        """Refuse bad ``task.*`` values before anything is loaded: a one-line ``ValueError`` with the fix."""

    def cells(self, cfg: Any, ctxs: Sequence[int]) -> list[dict]:
        """The cells this task measures at these context lengths, each a small JSON-able dict (its identity)."""
        raise NotImplementedError

    def prepare(self, env: TaskEnv, cells: Sequence[dict]) -> None:
        """Called on each freshly patched model before its ``cells`` are measured: plan work shared between them."""

    def measure(self, env: TaskEnv, cell: dict) -> list[dict]:
        """Measure one cell and return its result rows (each row includes the cell's keys)."""
        raise NotImplementedError

    def summary(self, rows: Sequence[dict]) -> list[dict]:
        """The rows that stand for their cells in summaries and charts (all of them, unless a task also keeps
        finer rows, as perplexity keeps one per document beside the aggregate)."""
        return list(rows)

    def header(self, cfg: Any) -> list[str]:
        """Extra lines for the job's header in the log (what the knobs mean for this run)."""
        return []

    def brief(self, rows: Sequence[dict]) -> str:
        """One log line for a measured cell's rows."""
        row = self.summary(rows)[-1]
        return ", ".join(f"{k}={v:g}" for k, v in row.items() if _is_number(v) and k not in ("seconds", "ctx"))

    def table(self, rows: Sequence[dict]) -> str:
        """This task's rows as Markdown (rows of one task only)."""
        from enhance_long.tables import describe_rows, grid_table

        rows = self.summary(rows)
        return grid_table(rows, "score", f"### {self.name}, score ({describe_rows(rows)})")

    def plots(self, rows: Sequence[dict], out_dir: Path) -> list[Path]:
        """PNG files made from this task's rows in ``out_dir``; none by default."""
        return []


def require_positive(name: str, value: Any, example: str, integer: bool = False) -> None:
    """A one-line ``ValueError`` unless ``value`` is None or above 0 (the shared check of count-like knobs)."""
    if value is not None and value <= 0:
        kind = "an integer >= 1" if integer else "a number > 0"
        raise ValueError(f"{name}={value} is invalid; it must be {kind} (or null for the default), e.g. {example}")


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Number) and not isinstance(value, bool)


def metrics(row: dict, cell: dict) -> dict[str, float]:
    """A row's numbers named for a chart: ``<method>/<cell values besides ctx>/<field>``, so rows of different cells
    (RULER tasks, LongBench datasets, depths) never share a chart line."""
    prefix = "/".join([str(row.get("method")), *(str(v) for k, v in cell.items() if k != "ctx")])
    skip = {*cell, "seconds"}
    return {f"{prefix}/{name}": value for name, value in row.items() if _is_number(value) and name not in skip}
