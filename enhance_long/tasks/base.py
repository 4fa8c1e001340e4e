"""The contract between the runner and an evaluation task.

A task splits its work into *cells* (one context length, one depth, one dataset, ...). The runner asks the
task for its cells, skips those already measured (resume), and asks the task to measure each remaining cell.
Each measured cell yields result rows: flat JSON-able dicts that the runner extends with the run's identity
(model, rope, alpha, logn, attention, ...) and writes to ``results.jsonl``.

    class Perplexity:
        name = "perplexity"
        def cells(self, cfg, ctxs): return [{"ctx": c} for c in ctxs]
        def measure(self, env, cell): return [{"doc": "all", "ppl": 12.3, "tokens": 4096}]

A task may also define ``prepare(env, cells)``: the runner calls it with the cells it is about to measure on each
freshly patched model, so the task can plan work shared between them (perplexity scores shorter lengths from the
prefix of one longer forward).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


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


class Task(Protocol):
    name: str

    def cells(self, cfg: Any, ctxs: Sequence[int]) -> list[dict]:
        """The cells this task measures at these context lengths, each a small JSON-able dict (its identity)."""

    def measure(self, env: TaskEnv, cell: dict) -> list[dict]:
        """Measure one cell and return its result rows (each row includes the cell's keys)."""
