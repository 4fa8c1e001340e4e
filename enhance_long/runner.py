"""config -> model (+ method) -> task -> rows -> report: one Hydra job of ``run.py``.

    python run.py                                         # perplexity, SmolLM2, Canterbury, 4k/8k/16k, + baseline
    python run.py rope=consistent_ntk ctx=32768           # one length
    python run.py task=passkey ctxs=[4096,8192] task.trials=3
    python run.py -m rope=none,dynamic_ntk,consistent_ntk rope.alpha=1,2,4 ctx=8192,16384

A job validates its config (one-line errors, nothing loaded yet), works out its cells (task cells x methods: the
configured method and, with ``baseline=true``, the stock model) and skips those already measured here or in a
sibling job of the same sweep. Only if something is left is the model loaded, once; each method is applied,
its cells measured and stored atomically as they finish, then removed. The job ends by writing ``summary.json``,
``table.md`` and the plots into its output folder. See the README (Running experiments) for the output contract.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from enhance_long.config import ConfigError, task_settings, validate
from enhance_long.report import aggregate_rows, tables, write_report
from enhance_long.results import ResultStore, cell_key, group_by_key, load_results, write_atomic
from enhance_long.tasks import get_task
from enhance_long.tasks.base import TaskEnv
from enhance_long.tracking import start_tracker

log = logging.getLogger(__name__)

# Model settings that change where a model runs or is cached, not what it computes: left out of result keys.
PLACEMENT_KEYS = ("cache_dir", "device_map")


@dataclass(frozen=True)
class Method:
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


def configured_method(cfg: DictConfig, known: dict) -> tuple[Method, list[str]]:
    """The method the config asks for, and the knobs it sets that this method ignores (for a notice)."""
    takes = known[cfg.rope.name]
    rope = OmegaConf.to_container(cfg.rope, resolve=True)
    knobs = {k: rope[k] if rope[k] is not None else default for k, default in takes.items()}
    ignored = [f"rope.{k}={v}" for k, v in rope.items() if k != "name" and k not in takes and v is not None]
    logn_len = cfg.logn.len if cfg.logn.enabled else None
    return Method(cfg.rope.name, knobs, bool(cfg.logn.enabled), logn_len), ignored


def methods_to_run(cfg: DictConfig, known: dict) -> tuple[list[Method], list[str]]:
    """The baseline (stock model) first when asked for and different, then the configured method."""
    method, ignored = configured_method(cfg, known)
    baseline = Method("none")
    return ([baseline] if cfg.baseline and method != baseline else []) + [method], ignored


def run_identity(cfg: DictConfig, task: Any, method: Method) -> dict:
    """Everything besides the cell that determines a result: hashed into each row's ``key``."""
    model = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items() if k not in PLACEMENT_KEYS}
    identity = {
        "model": model,
        "method": method.identity(),
        "attention": cfg.attention.name,
        "task": OmegaConf.to_container(cfg.task, resolve=True),
        "seed": cfg.seed,
    }
    if getattr(task, "uses_data", True):
        identity["data"] = OmegaConf.to_container(cfg.data, resolve=True)
    return identity


def row_fields(cfg: DictConfig, task: Any, method: Method) -> dict:
    """The identity columns every row starts with (the results.jsonl contract)."""
    settings = {k: v for k, v in OmegaConf.to_container(cfg.task, resolve=True).items() if k != "name"}
    return {
        "task": cfg.task.name,
        "model": cfg.model.name,
        "method": method.label,
        "rope": method.rope,
        "alpha": method.knobs.get("alpha"),
        "knobs": method.knobs,
        "logn": method.logn,
        "logn_len": method.logn_len,
        "attention": cfg.attention.name,
        "data": cfg.data.name if getattr(task, "uses_data", True) else None,
        "seed": cfg.seed,
        "settings": settings,
    }


@dataclass
class Job:
    """What one job will do, worked out before anything heavy is loaded."""

    task: Any
    ctxs: list[int]
    methods: list[Method]
    work: list[tuple[Method, dict, str, dict]]  # (method, cell, key, row fields) in run order
    ignored: list[str]


def plan(cfg: DictConfig) -> Job:
    """Validate ``cfg`` and list the cells to measure; every problem is a one-line :class:`ConfigError`."""
    import enhance_long

    try:
        ctxs = validate(cfg, list(enhance_long.METHODS))
        task = get_task(cfg.task.name)
        cells = task.cells(cfg.task, ctxs)  # tasks may check their own knobs here (longbench does)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    methods, ignored = methods_to_run(cfg, enhance_long.METHODS)
    work = []
    for method in methods:
        identity, fields = run_identity(cfg, task, method), row_fields(cfg, task, method)
        work += [(method, cell, cell_key(identity, cell), fields) for cell in cells]
    return Job(task, ctxs, methods, work, ignored)


def _hydra_dirs() -> tuple[Path, Path | None]:
    """This job's output folder and, in a multirun, the sweep folder."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    out_dir = Path(hydra_cfg.runtime.output_dir)
    return out_dir, Path(hydra_cfg.sweep.dir) if hydra_cfg.mode == RunMode.MULTIRUN else None


def _header(cfg: DictConfig, job: Job, todo: int, out_dir: Path) -> str:
    task = cfg.task
    lines = [
        f"enhance-long: task={task.name} model={cfg.model.name} attention={cfg.attention.name}",
        f"  methods: {', '.join(m.label for m in job.methods)}",
        f"  lengths: {', '.join(map(str, job.ctxs))}",
    ]
    if getattr(job.task, "uses_data", True):
        lines.append(f"  data: {cfg.data.name} (max_docs={cfg.data.max_docs})")
    if task.name == "perplexity":
        budget = f"max_windows={task.max_windows} per length" if task.max_windows else "every full window"
        lines.append(f"  windows: stride={task.stride or 'ctx'}, {budget}, mode={task.mode}")
        if task.max_windows:
            lines.append("  (a sample that keeps a CPU run short; task.max_windows=null scores every window)")
    if job.ignored:
        lines.append(f"  ignored (rope={cfg.rope.name} does not take them): {', '.join(job.ignored)}")
    lines.append(f"  cells: {todo} to measure, {len(job.work) - todo} already done")
    lines.append(f"  results -> {out_dir}")
    return "\n".join(lines)


def run(cfg: DictConfig, out_dir: Path | None = None, sweep_dir: Path | None = None) -> list[dict]:
    """Run one job and return its aggregate rows. ``out_dir``/``sweep_dir`` default to Hydra's folders.

    A bad config exits with a one-line message (``SystemExit``) before anything is loaded.
    """
    try:
        cfg = task_settings(cfg)
        job = plan(cfg)
    except ConfigError as error:
        raise SystemExit(f"enhance-long: {error}") from None
    if out_dir is None:
        out_dir, sweep_dir = _hydra_dirs()
    out_dir = Path(out_dir)
    store = ResultStore(out_dir)
    done = store.keys() if cfg.resume else set()
    elsewhere = {}
    if cfg.resume and sweep_dir is not None:
        elsewhere = group_by_key(r for r in load_results([sweep_dir]) if r["key"] not in done)
    for method, cell, key, _ in job.work:
        if key in elsewhere and key not in done:
            store.put(key, elsewhere[key])
            done.add(key)
            log.info("%s %s: same cell already measured in this sweep; reused", method.label, cell)
    todo = [item for item in job.work if item[2] not in done]
    log.info("\n%s", _header(cfg, job, len(todo), out_dir))

    config = OmegaConf.to_container(cfg, resolve=True)
    tracker = start_tracker(cfg.logger, config, out_dir, group=cfg.name, job_type=cfg.task.name, run_name=out_dir.name)
    started, failed = time.time(), True
    try:
        if todo:
            _measure(cfg, job, todo, store, tracker, out_dir)
        keys = {key for _, _, key, _ in job.work}
        rows = [row for row in store.rows if row["key"] in keys]
        aggregate = aggregate_rows(rows)
        table = tables(rows)
        summary = {"config": config, "rows": aggregate, "output_dir": str(out_dir), "seconds": time.time() - started}
        write_atomic(out_dir / "summary.json", _json(summary))
        images = [p for p in write_report(rows, out_dir, with_csv=False) if p.suffix == ".png"]
        tracker.log_report(rows, table, images)
        log.info("\n%s", table)
        failed = False
        return aggregate
    finally:
        tracker.finish(failed=failed)


def _measure(cfg: DictConfig, job: Job, todo: Sequence[tuple], store: ResultStore, tracker, out_dir: Path) -> None:
    import enhance_long
    from enhance_long.models import load_model

    model, tokenizer = load_model(cfg.model, attention=cfg.attention.name)
    env = TaskEnv(model, tokenizer, cfg.task, cfg.data, out_dir, seed=cfg.seed, progress=cfg.progress)
    for method in job.methods:
        cells = [item for item in todo if item[0] == method]
        if not cells:
            continue
        extra = {"logn_len": method.logn_len} if method.logn_len else {}
        enhance_long.apply(
            model, rope=method.rope, logn=method.logn, train_len=cfg.model.train_len, **method.knobs, **extra
        )
        try:
            if hasattr(job.task, "prepare"):  # optional hook: a task may plan shared work across the cells
                job.task.prepare(env, [cell for _, cell, _, _ in cells])
            for _, cell, key, fields in tqdm(cells, desc=method.label, unit="cell", disable=not cfg.progress):
                started = time.time()
                rows = job.task.measure(env, cell)
                seconds = round(time.time() - started, 3)
                rows = [{**fields, **row, "key": key, "seconds": seconds} for row in rows]
                store.put(key, rows)
                tracker.log_cell(rows)
                log.info("%s %s: %s", method.label, cell, _brief(rows))
        finally:
            enhance_long.remove(model)


def _brief(rows: Sequence[dict]) -> str:
    row = aggregate_rows(rows)[-1] if aggregate_rows(rows) else rows[-1]
    if "ppl" in row:
        return f"ppl={row['ppl']:.3f} over {row['tokens']} tokens"
    if "accuracy" in row:
        return f"accuracy={row['accuracy']:.2f} ({row.get('correct')}/{row.get('trials')})"
    return ", ".join(f"{k}={v}" for k, v in row.items() if isinstance(v, int | float) and k != "seconds")


def _json(value: Any) -> str:
    import json

    return json.dumps(value, indent=2, default=str) + "\n"
