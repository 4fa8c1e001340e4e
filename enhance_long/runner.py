"""config -> model (+ method) -> task -> rows -> report: one Hydra job of ``run.py``.

    python run.py                                         # perplexity, SmolLM2, Canterbury, 4k/8k/16k, + the stock model
    python run.py rope=consistent_ntk ctx=32768           # one length
    python run.py task=passkey ctxs=[4096,8192] task.trials=3
    python run.py -m rope=none,dynamic_ntk,consistent_ntk rope.alpha=1,2,4 ctx=8192,16384

A job validates its config (one-line errors, nothing loaded yet), works out its cells (task cells x variants: the
configured method and, with ``baseline=true``, the stock model) and skips those already measured here, in a
sibling job of the same sweep or in the earlier results that ``reuse`` names (a committed board's ``results.jsonl``:
a sweep goes on where another machine left it), copying their rows in. Only if something is left is the model
loaded, once; each variant is applied, its cells measured and stored atomically as they finish, then removed. The job ends by writing ``summary.json``,
``table.md`` and the plots into its output folder. See the README (Running experiments) for the output contract.

Everything task-specific comes from the task (``enhance_long/tasks/base.py``): its checks, cells, header lines, log
line, table and plots. A ``ValueError`` anywhere in a job ends it with one line ``enhance-long: ...`` and exit
status 1 (``HYDRA_FULL_ERROR=1`` shows the traceback instead).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from enhance_long.config import ConfigError, task_settings, validate
from enhance_long.methods.catalog import METHODS
from enhance_long.report import tables, write_report
from enhance_long.results import ResultStore, cell_key, group_by_key, load_results, machine, write_atomic
from enhance_long.tasks import Task, get_task
from enhance_long.tasks.base import TaskEnv
from enhance_long.tracking import start_tracker

log = logging.getLogger(__name__)

# Model settings that change where a model runs or is cached, not what it computes: left out of result keys.
PLACEMENT_KEYS = ("cache_dir", "device_map")


@dataclass(frozen=True)
class Variant:
    """One patched state of the model: what ``enhance_long.apply`` is called with."""

    rope: str
    knobs: dict[str, Any] = field(default_factory=dict)  # every knob the method takes, defaults filled in
    logn: bool = False
    logn_len: int | None = None

    @property
    def label(self) -> str:
        knobs = ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.knobs.items())
        label = f"{self.rope}({knobs})" if knobs else self.rope
        if self.logn:
            label += f"+logn(len={self.logn_len})" if self.logn_len else "+logn"
        return label

    def identity(self) -> dict:
        return {"rope": self.rope, "knobs": self.knobs, "logn": self.logn, "logn_len": self.logn_len}


STOCK = Variant("none")


def configured_variant(cfg: DictConfig, known: dict) -> tuple[Variant, list[str]]:
    """The variant the config asks for, and the knobs it sets that its method ignores (for a notice)."""
    takes = known[cfg.rope.name]
    rope = OmegaConf.to_container(cfg.rope, resolve=True)
    knobs = {k: rope[k] if rope.get(k) is not None else default for k, default in takes.items()}
    ignored = [f"rope.{k}={v}" for k, v in rope.items() if k != "name" and k not in takes and v is not None]
    logn_len = cfg.logn.len if cfg.logn.enabled else None
    return Variant(cfg.rope.name, knobs, bool(cfg.logn.enabled), logn_len), ignored


def variants_to_run(cfg: DictConfig, known: dict) -> tuple[list[Variant], list[str]]:
    """The stock model first when ``baseline`` asks for it and it is not the configured variant, then that one."""
    variant, ignored = configured_variant(cfg, known)
    return ([STOCK] if cfg.baseline and variant != STOCK else []) + [variant], ignored


def run_identity(cfg: DictConfig, task: Task, variant: Variant) -> dict:
    """Everything besides the cell that determines a result: hashed into each row's ``key``."""
    model = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items() if k not in PLACEMENT_KEYS}
    identity = {
        "model": model,
        "method": variant.identity(),
        "attention": cfg.attention.name,
        "task": OmegaConf.to_container(cfg.task, resolve=True),
        "seed": cfg.seed,
    }
    if task.uses_data:
        identity["data"] = OmegaConf.to_container(cfg.data, resolve=True)
    return identity


def row_fields(cfg: DictConfig, task: Task, variant: Variant) -> dict:
    """The identity columns every row starts with (the results.jsonl contract)."""
    settings = {k: v for k, v in OmegaConf.to_container(cfg.task, resolve=True).items() if k != "name"}
    return {
        "task": cfg.task.name,
        "model": cfg.model.name,
        "method": variant.label,
        "rope": variant.rope,
        "alpha": variant.knobs.get("alpha"),
        "knobs": variant.knobs,
        "logn": variant.logn,
        "logn_len": variant.logn_len,
        "attention": cfg.attention.name,
        "data": cfg.data.name if task.uses_data else None,
        "seed": cfg.seed,
        "settings": settings,
    }


@dataclass(frozen=True)
class Work:
    """One cell to measure with one variant: its result key and the identity columns of its rows."""

    variant: Variant
    cell: dict
    key: str
    fields: dict


@dataclass
class Job:
    """What one job will do, worked out before anything heavy is loaded."""

    task: Task
    ctxs: list[int]
    variants: list[Variant]
    work: list[Work]  # in run order
    ignored: list[str]


def prepare_job(cfg: DictConfig) -> Job:
    """Validate ``cfg`` and list the cells to measure; every problem is a one-line :class:`ConfigError`."""
    try:
        ctxs = validate(cfg)
        task = get_task(cfg.task.name)
        cells = task.cells(cfg.task, ctxs)
    except ConfigError:
        raise
    except ValueError as error:
        raise ConfigError(str(error)) from None
    variants, ignored = variants_to_run(cfg, METHODS)
    work = []
    for variant in variants:
        identity, fields = run_identity(cfg, task, variant), row_fields(cfg, task, variant)
        work += [Work(variant, cell, cell_key(identity, cell), fields) for cell in cells]
    return Job(task, ctxs, variants, work, ignored)


def _hydra_dirs() -> tuple[Path, Path | None]:
    """This job's output folder and, in a multirun, the sweep folder."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    out_dir = Path(hydra_cfg.runtime.output_dir)
    return out_dir, Path(hydra_cfg.sweep.dir) if hydra_cfg.mode == RunMode.MULTIRUN else None


def _header(cfg: DictConfig, job: Job, todo: int, out_dir: Path) -> str:
    lines = [
        f"enhance-long: task={cfg.task.name} model={cfg.model.name} attention={cfg.attention.name}",
        f"  methods: {', '.join(v.label for v in job.variants)}",
        f"  lengths: {', '.join(map(str, job.ctxs))}",
    ]
    if job.task.uses_data:
        lines.append(f"  data: {cfg.data.name} (max_docs={cfg.data.max_docs})")
    lines += job.task.header(cfg.task)
    if job.ignored:
        lines.append(f"  ignored (rope={cfg.rope.name} does not take them): {', '.join(job.ignored)}")
    lines.append(f"  cells: {todo} to measure, {len(job.work) - todo} already done")
    lines.append(f"  results -> {out_dir}")
    return "\n".join(lines)


def run(cfg: DictConfig, out_dir: Path | None = None, sweep_dir: Path | None = None) -> list[dict]:
    """Run one job and return its summary rows. ``out_dir``/``sweep_dir`` default to Hydra's folders.

    A bad config, or any ``ValueError`` later (a model path that is not there, a corpus too short, ...), exits
    with one line (``SystemExit``); a bad config before anything is loaded or written.
    """
    try:
        return _run(cfg, out_dir, sweep_dir)
    except ValueError as error:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        raise SystemExit(f"enhance-long: {error}") from None


def _run(cfg: DictConfig, out_dir: Path | None, sweep_dir: Path | None) -> list[dict]:
    cfg = task_settings(cfg)
    job = prepare_job(cfg)
    if out_dir is None:
        out_dir, sweep_dir = _hydra_dirs()
    out_dir = Path(out_dir)
    store = ResultStore(out_dir)
    done = store.keys() if cfg.resume else set()
    elsewhere = {}
    sources = ([sweep_dir] if sweep_dir is not None else []) + [Path(p) for p in cfg.reuse]
    if cfg.resume and sources:
        elsewhere = group_by_key(r for r in load_results(sources) if r["key"] not in done)
    for item in job.work:
        if item.key in elsewhere and item.key not in done:
            store.put(item.key, elsewhere[item.key])
            done.add(item.key)
            log.info("%s %s: already measured in this sweep or in reuse; reused", item.variant.label, item.cell)
    todo = [item for item in job.work if item.key not in done]
    log.info("\n%s", _header(cfg, job, len(todo), out_dir))

    config = OmegaConf.to_container(cfg, resolve=True)
    tracker = start_tracker(cfg.logger, config, out_dir, group=cfg.name, job_type=cfg.task.name, run_name=out_dir.name)
    started, failed = time.time(), True
    try:
        if todo:
            _measure(cfg, job, todo, store, tracker, out_dir)
        keys = {item.key for item in job.work}
        rows = [row for row in store.rows if row["key"] in keys]
        summary_rows = job.task.summary(rows)
        table = tables(rows)
        summary = {"config": config, "rows": summary_rows, "output_dir": str(out_dir), "seconds": time.time() - started}
        write_atomic(out_dir / "summary.json", _json(summary))
        images = [p for p in write_report(rows, out_dir, with_csv=False) if p.suffix == ".png"]
        tracker.log_report(rows, table, images)
        log.info("\n%s", table)
        failed = False
        return summary_rows
    finally:
        tracker.finish(failed=failed)


def _measure(cfg: DictConfig, job: Job, todo: Sequence[Work], store: ResultStore, tracker, out_dir: Path) -> None:
    import enhance_long
    from enhance_long.models import load_model

    model, tokenizer = load_model(cfg.model, attention=cfg.attention.name)
    env = TaskEnv(model, tokenizer, cfg.task, cfg.data, out_dir, seed=cfg.seed, progress=cfg.progress)
    for variant in job.variants:
        items = [item for item in todo if item.variant == variant]
        if not items:
            continue
        extra = {"logn_len": variant.logn_len} if variant.logn_len else {}
        enhance_long.apply(
            model, rope=variant.rope, logn=variant.logn, train_len=cfg.model.train_len, **variant.knobs, **extra
        )
        try:
            job.task.prepare(env, [item.cell for item in items])
            for item in tqdm(items, desc=variant.label, unit="cell", disable=not cfg.progress):
                started = time.time()
                rows = job.task.measure(env, item.cell)
                seconds = round(time.time() - started, 3)
                where = machine()
                rows = [{**item.fields, **row, "key": item.key, "seconds": seconds, "machine": where} for row in rows]
                store.put(item.key, rows)
                tracker.log_cell(job.task.summary(rows), item.cell)
                log.info("%s %s: %s", variant.label, item.cell, job.task.brief(rows))
        finally:
            enhance_long.remove(model)


def _json(value: Any) -> str:
    import json

    return json.dumps(value, indent=2, default=str) + "\n"
