"""Structured-config schemas for ``run.py`` and the checks Hydra's types cannot express.

The schemas are registered in Hydra's ConfigStore on import, so composing ``conf/config.yaml`` type-checks every
group: a misspelt key or a wrong type fails at composition time, with Hydra's message, before any model is loaded.
:func:`validate` then refuses nonsense values (``ctx=0``, ``rope.alpha=-1``, a passkey depth of 2, ...) with a
one-line :class:`ConfigError` that names the value, what is allowed, and the fix.

Experiments are the YAML files under ``experiments/`` at the repository root; each is registered as an option
of the ``experiment`` group (``python run.py experiment=quick``) with the package its ``# @package`` header names.
"""

from __future__ import annotations

import hashlib
import importlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, make_dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from enhance_long.attention import BACKENDS, check_backend
from enhance_long.data import SOURCES, local_files
from enhance_long.methods.catalog import CATALOG, knob_specs
from enhance_long.models import model_dtype
from enhance_long.results import find_result_files
from enhance_long.tasks import all_tasks, get_task
from enhance_long.tasks.base import require_positive

EXPERIMENTS_DIR = Path(__file__).resolve().parent.parent / "experiments"
PLUGINS = "ENHANCE_LONG_PLUGINS"  # comma-separated modules imported before the schemas are built
LOGGERS = ("none", "wandb")
WANDB_MODES = ("online", "offline", "disabled")


class ConfigError(ValueError):
    """A configuration value that cannot work; the message is one line with the fix."""


@dataclass
class RandomModelConfig:
    """A tiny randomly initialised Llama with an offline tokenizer (tests, smoke runs)."""

    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 128
    max_position_embeddings: int = 256
    rope_theta: float = 10000.0
    seed: int = 0


@dataclass
class ModelConfig:
    name: str = MISSING  # short name used in result rows and tables
    path: str | None = None  # hub id or local directory
    gguf_file: str | None = None  # a GGUF file inside ``path``
    revision: str | None = None
    train_len: int | None = None  # trained context length; None = read from the model config
    dtype: str | None = None
    device_map: str | None = None  # "auto" spreads a large model over the available devices
    cache_dir: str | None = None
    random: RandomModelConfig | None = None  # set = build a tiny random model instead of loading weights


@dataclass
class DataConfig:
    name: str = MISSING
    source: str = "canterbury"  # canterbury | hf | local
    path: Any = None  # a path, glob, or list of them (local); dataset id (hf)
    config_name: str | None = None
    split: str | None = None
    text_field: str | None = None
    max_docs: int | None = None


def rope_schema() -> type:
    """The ``rope`` group's schema: ``name`` plus every knob of the catalogue, each optional (``null`` = not set), so
    a sweep may set a knob some of its methods do not take (``rope=none,ntk rope.alpha=2``); the runner passes a
    method only its own knobs."""
    kinds = {True: int, False: float}
    fields = [("name", str, field(default=MISSING))]
    for name, knob in knob_specs().items():
        kind = str if knob.choices else kinds[knob.integer]
        fields.append((name, kind | None, field(default=None)))
    return make_dataclass("RopeConfig", fields)


@dataclass
class LognConfig:
    enabled: bool = True
    len: int | None = None  # LogN's T; None = the trained length


@dataclass
class AttentionConfig:
    name: str = "sdpa"


@dataclass
class LoggerConfig:
    name: str = "none"  # none | wandb
    project: str = "enhance-long"
    entity: str | None = None
    mode: str | None = None  # online | offline | disabled; None = $WANDB_MODE, else online
    tags: list[str] = field(default_factory=list)
    init_timeout: float = 30.0


@dataclass
class RunConfig:
    name: str = "${task.name}"  # names the output folder: outputs/<name>/..., multirun/<name>/...
    model: ModelConfig = MISSING
    rope: Any = MISSING  # typed by rope_schema(), registered as rope/rope_schema
    logn: LognConfig = MISSING
    attention: AttentionConfig = MISSING
    task: Any = MISSING  # typed by the task's own schema (task/perplexity.yaml lists perplexity_schema)
    data: DataConfig = MISSING
    logger: LoggerConfig = MISSING
    ctx: int | None = None  # one context length; overrides ctxs
    ctxs: list[int] = field(default_factory=lambda: [4096, 8192, 16384])
    baseline: bool = True  # also measure the stock model (rope=none, logn off) for the table
    seed: int = 0
    resume: bool = True  # skip cells already in results.jsonl
    reuse: list[str] = field(default_factory=list)  # results.jsonl files or folders whose cells count as measured
    progress: bool = True  # progress bars
    per_task: dict[str, Any] = field(default_factory=dict)  # task name -> overrides of this config for that task


def task_settings(cfg: DictConfig) -> DictConfig:
    """``cfg`` with ``per_task[<task name>]`` merged over it, so one experiment can sweep several tasks, each with
    its own lengths and knobs (``per_task: {passkey: {ctxs: [8192], task: {trials: 2}}}``)."""
    overrides = cfg.per_task.get(cfg.task.name)
    if not overrides:
        return cfg
    unknown = sorted(set(overrides) - set(cfg) - {"per_task"})
    if unknown:
        raise ConfigError(
            f"per_task.{cfg.task.name} sets {', '.join(unknown)}, which are not config keys; "
            f"use top-level keys such as ctxs or task"
        )
    merged = OmegaConf.merge(cfg, overrides)
    merged.per_task = {}
    return merged


def experiment_package(path: Path) -> str:
    """The package named by a YAML file's ``# @package`` header (Hydra's default, ``_group_``, without one)."""
    for line in path.read_text().splitlines():
        if line.startswith("# @package"):
            return line.removeprefix("# @package").strip()
        if line.strip() and not line.startswith("#"):
            break
    return "_group_"


def register_configs(experiments_dir: Path = EXPERIMENTS_DIR) -> None:
    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
    cs.store(group="rope", name="rope_schema", node=rope_schema())
    for task in all_tasks():
        if task.schema is not None:  # a task's own schema lives with the task
            cs.store(group="task", name=f"{task.name}_schema", node=task.schema)
    for path in sorted(experiments_dir.glob("*.yaml")):
        cs.store(group="experiment", name=path.stem, node=OmegaConf.load(path), package=experiment_package(path))


def job_dirname(overrides: str) -> str:
    """A job's folder name from Hydra's ``override_dirname``: ``default`` when empty, slashes made safe, and long
    names shortened with a hash so they stay unique."""
    name = overrides.replace("/", "_") or "default"
    if len(name) > 160:
        name = f"{name[:120]}-{hashlib.sha1(name.encode()).hexdigest()[:12]}"
    return name


def import_plugins() -> None:
    """Import the modules ``$ENHANCE_LONG_PLUGINS`` names, so methods they register (``enhance_long.register_method``)
    and their knobs are in the catalogue before the ``rope`` schema is built from it."""
    for name in filter(None, (part.strip() for part in os.environ.get(PLUGINS, "").split(","))):
        try:
            importlib.import_module(name)
        except ImportError as error:
            raise ImportError(
                f"{PLUGINS} names {name!r}, which does not import ({error}); put the module on PYTHONPATH or drop it"
            ) from None


import_plugins()
register_configs()
if not OmegaConf.has_resolver("job_dirname"):
    OmegaConf.register_new_resolver("job_dirname", job_dirname)


def lengths(cfg: DictConfig) -> list[int]:
    """The context lengths this job measures: ``ctx`` if set, else ``ctxs`` in order without repeats."""
    values = [cfg.ctx] if cfg.ctx is not None else list(cfg.ctxs)
    if not values:
        raise ConfigError("ctxs=[] measures nothing; give at least one length, e.g. ctxs=[4096,8192] or ctx=4096")
    for value in values:
        if value <= 0:
            name = "ctx" if cfg.ctx is not None else "ctxs"
            raise ConfigError(
                f"{name} has {value}; a context length must be a positive number of tokens, e.g. ctx=4096"
            )
    return list(dict.fromkeys(values))


def validate(cfg: DictConfig, methods: Sequence[str] | None = None) -> list[int]:
    """Refuse nonsense values before anything is loaded (the task's own through its ``check``, the attention
    backend, the dtype, local files); returns the lengths to measure. ``methods``: the rope names allowed (default:
    the catalogue's). Every problem is a one-line :class:`ConfigError`."""
    try:
        return _validate(cfg, list(CATALOG) if methods is None else methods)
    except ConfigError:
        raise
    except ValueError as error:
        raise ConfigError(str(error)) from None


def _validate(cfg: DictConfig, methods: Sequence[str]) -> list[int]:
    ctxs = lengths(cfg)
    rope = cfg.rope
    if rope.name not in methods:
        raise ConfigError(f"rope={rope.name} is unknown; choose one of {', '.join(methods)} (e.g. rope=consistent_ntk)")
    for name, knob in knob_specs().items():
        value = rope.get(name)
        if value is not None and not knob.valid(value):
            raise ConfigError(
                f"rope.{name}={value} is invalid; it must be {knob.requirement} (or null for the default), "
                f"e.g. rope.{name}={knob.default}"
            )
    if cfg.logn.len is not None and cfg.logn.len <= 1:
        raise ConfigError(f"logn.len={cfg.logn.len} is invalid; it must be > 1, or null for the trained length")
    if cfg.model.train_len is not None and cfg.model.train_len <= 1:
        raise ConfigError(
            f"model.train_len={cfg.model.train_len} is invalid; it must be > 1, or null to read it from the model"
        )
    if cfg.attention.name not in BACKENDS:
        raise ConfigError(
            f"attention={cfg.attention.name} is unknown; choose one of {', '.join(BACKENDS)} (e.g. attention=sdpa)"
        )
    check_backend(cfg.attention.name)  # flash-attn installed, a GPU there
    model_dtype(cfg.model.get("dtype"))
    if cfg.data.source not in SOURCES:
        raise ConfigError(f"data.source={cfg.data.source} is unknown; choose one of {', '.join(SOURCES)}")
    if cfg.data.source in ("hf", "local") and (OmegaConf.is_missing(cfg.data, "path") or not cfg.data.path):
        raise ConfigError(
            f"data={cfg.data.name} (source {cfg.data.source}) needs data.path, e.g. data.path='/data/books/*.txt'"
        )
    require_positive("data.max_docs", cfg.data.max_docs, "data.max_docs=1", integer=True)
    task = get_task(cfg.task.name)
    if task.uses_data and cfg.data.source == "local":
        local_files(cfg.data.path)  # the files are there and are texts
    if cfg.logger.name not in LOGGERS:
        raise ConfigError(
            f"logger={cfg.logger.name} is unknown; choose one of {', '.join(LOGGERS)} (e.g. logger=wandb)"
        )
    if cfg.logger.mode is not None and cfg.logger.mode not in WANDB_MODES:
        raise ConfigError(
            f"logger.mode={cfg.logger.mode} is unknown; choose one of {', '.join(WANDB_MODES)}, or null for $WANDB_MODE"
        )
    for path in cfg.reuse:
        path = Path(path)
        if not path.exists() or (path.is_file() and path.suffix != ".jsonl") or not find_result_files([path]):
            raise ConfigError(
                f"reuse has {path}, which is not a results.jsonl file or a folder holding one; give earlier results "
                f"(e.g. reuse=[docs/leaderboard]) or reuse=[] to measure every cell here"
            )
    task.check(cfg.task, ctxs)
    return ctxs
