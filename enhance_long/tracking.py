"""Weights & Biases logging, off by default (``logger=wandb`` turns it on).

A run logs the resolved config, every cell as it is measured (each number named ``<method>/<cell>/<field>``, so
cells of different datasets or RULER tasks never share a chart line), and at the end the summary table, all rows and
the plots; its ``group`` is the sweep (``name``) and its ``job_type`` the task. ``WANDB_MODE=offline`` and
``disabled`` (or ``logger.mode=...``) work as usual. Every W&B call is guarded: if W&B is missing, not logged
in or unreachable, a single warning is printed and the job goes on; local results never depend on it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from enhance_long.tasks.base import metrics

log = logging.getLogger(__name__)


class Tracker:
    """The no-op tracker (``logger=none``) and the interface the runner uses."""

    def log_cell(self, rows: Sequence[dict], cell: dict) -> None:
        """Called after each measured cell with its summary rows."""

    def log_report(self, rows: Sequence[dict], table_md: str, images: Sequence[Path]) -> None:
        """Called once at the end of the job."""

    def finish(self, failed: bool = False) -> None:
        """Always called, also when the job fails, so that a multirun's next job starts clean."""


class WandbTracker(Tracker):
    def __init__(self, run: Any):
        self.run = run
        self.step = 0

    def _guard(self, what: str, fn, *args) -> None:
        if self.run is None:
            return
        try:
            fn(*args)
        except Exception as error:  # W&B must never cost the local results
            log.warning("W&B %s failed (%s: %s); going on without W&B", what, type(error).__name__, error)
            self.run = None

    def log_cell(self, rows: Sequence[dict], cell: dict) -> None:
        self._guard("log", self._log_cell, rows, cell)

    def _log_cell(self, rows: Sequence[dict], cell: dict) -> None:
        for row in rows:
            self.run.log({"ctx": row["ctx"], **metrics(row, cell)}, step=self.step)
            self.step += 1

    def log_report(self, rows: Sequence[dict], table_md: str, images: Sequence[Path]) -> None:
        self._guard("report", self._log_report, rows, table_md, images)

    def _log_report(self, rows: Sequence[dict], table_md: str, images: Sequence[Path]) -> None:
        import wandb

        columns = list(dict.fromkeys(k for row in rows for k in row))
        data = [[_plain(row.get(c)) for c in columns] for row in rows]
        payload: dict[str, Any] = {"results": wandb.Table(columns=columns, data=data)}
        payload["table"] = wandb.Html(f"<pre>{table_md}</pre>")
        payload.update({Path(p).stem: wandb.Image(str(p)) for p in images})
        self.run.log(payload, step=self.step)

    def finish(self, failed: bool = False) -> None:
        self._guard("finish", lambda: self.run.finish(exit_code=1 if failed else 0))
        self.run = None


def _plain(value: Any) -> Any:
    if isinstance(value, dict | list):
        return json.dumps(value, default=str)
    return value


def start_tracker(logger_cfg, config: dict, out_dir: Path, group: str, job_type: str, run_name: str) -> Tracker:
    """A tracker for ``logger_cfg`` (``logger=none`` -> no-op); a failing W&B start yields the no-op tracker."""
    if logger_cfg.name != "wandb":
        return Tracker()
    try:
        import wandb

        run = wandb.init(
            project=logger_cfg.project,
            entity=logger_cfg.entity,
            group=group,
            job_type=job_type,
            name=run_name,
            tags=list(logger_cfg.tags),
            config=config,
            dir=str(out_dir),
            mode=logger_cfg.mode,
            settings=wandb.Settings(init_timeout=logger_cfg.init_timeout, silent=True),
        )
    except Exception as error:  # no package, no login, no network: the local results go on regardless
        log.warning("W&B did not start (%s: %s); results are still written locally", type(error).__name__, error)
        return Tracker()
    return WandbTracker(run)
