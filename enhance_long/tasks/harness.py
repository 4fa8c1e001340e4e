"""Any lm-evaluation-harness task through the patched model: ``task=lm_eval`` (``pip install "enhance-long[lm_eval]"``).

    python run.py task=lm_eval 'task.tasks=[longbench2]' model=llama3_8b rope=consistent_ntk ctx=32768
    python run.py task=lm_eval 'task.tasks=[ruler]' model=llama2_7b ctxs=[4096,8192,16384] task.limit=100
    python run.py task=lm_eval 'task.tasks=[my_qa]' task.include_path=/data/my_tasks task.include_defaults=false

One cell per (context length, requested name). The loaded, patched model is wrapped in the harness's own Hugging Face
class (``HFLM``) with ``max_length=ctx``, ``task.batch_size`` and the model's own tokenizer, and
``lm_eval.simple_evaluate`` runs the name as the harness's CLI would, so the scores are the harness's. A group or tag
(``ruler``, ``longbench2``) is one cell: one harness run whose rows cover every task in it and the group's aggregate.

A cell yields one row per (subtask, metric, filter): ``ctx``, ``harness_task`` (the name asked for), ``subtask`` (the
task or group the metric belongs to; ``harness_task`` itself for a plain task), ``metric``, ``filter``, ``value``,
``stderr`` (null where the harness gives none), ``samples``, ``truncated``, ``task_version`` and ``lm_eval`` (the
harness's version, also part of the cell: an upgrade measures again). The harness's per-sample log (``log_samples``)
goes to ``lm_eval_samples/<harness_task>_<ctx>.jsonl`` in the job folder, one line per (document, filter) with
``ctx``, ``harness_task``, ``method``, ``subtask``, ``request_tokens`` (the document's longest request) and
``truncated`` in front of the harness's own fields; a cell's lines replace that cell's earlier lines at once.

What the harness would get silently wrong at long lengths, and what the bridge does instead:

* Given a model object, HFLM's ``max_length`` falls back to ``max_position_embeddings`` (4096 for Llama-2) and the
  prompts are cut to it: here ``max_length`` is always ``ctx``.
* A request longer than ``ctx`` is left-truncated with only a warning. Every request is measured first, with the
  harness's own encoding: for ``loglikelihood`` the tokens fed (context + continuation - 1), for ``generate_until``
  the prompt plus the task's ``max_gen_toks``. With ``task.on_overflow=refuse`` (default) a cell with any such request
  stops, in one line, before that request type runs; with ``truncate`` the harness cuts them as it always does and
  the documents are counted in ``truncated``. Rolling loglikelihood (perplexity tasks) scores long documents in
  windows of ``ctx`` by design and is not truncation.
* ``batch_size=auto`` probes from 64 sequences at full length: the schema takes a fixed integer (default 1).
* RULER sizes its synthetic prompts with a tokenizer and lengths that only come through ``metadata``:
  ``max_seq_lengths`` defaults to ``[ctx]`` and ``tokenizer`` to a copy of the loaded model's tokenizer, unless
  ``task.metadata`` sets them. RULER names its score after the length and reports -1 for its default 4096 when
  it generated no samples of that length; those -1 rows are dropped. BABILong reads ``max_seq_lengths`` as one of its dataset names (``4k``) and is refused
  without one.
* A dataset the hub must provide while it is offline (``HF_HUB_OFFLINE``) or unreachable fails deep in ``datasets``:
  here it is one line naming the task and the fix (a local copy through ``task.include_path``).

No chat template unless ``task.apply_chat_template=true`` (then few-shot examples are chat turns, the harness's
default with a template). lm-eval is imported only when this task runs, so the rest of the project works without it.
"""

from __future__ import annotations

import difflib
import json
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf

from enhance_long.results import replace_cell_lines
from enhance_long.tasks.base import Task

INSTALL = 'pip install "enhance-long[lm_eval]"'
SUPPORTED = ("0.4.9", "0.5")  # the harness versions this bridge drives: >= the first, < the second
ON_OVERFLOW = ("refuse", "truncate")
BABILONG_LENGTHS = ("0k", "1k", "2k", "4k", "8k", "16k", "32k", "64k", "128k")
SAMPLES_DIR = "lm_eval_samples"


@dataclass
class LmEvalConfig:
    """The ``task=lm_eval`` group (``conf/task/lm_eval.yaml`` comments every key)."""

    name: str = "lm_eval"
    tasks: list[str] = MISSING  # harness task, group or tag names
    num_fewshot: int | None = None  # None = each task's own
    limit: int | float | None = None  # first N documents per task, or a fraction < 1; None = all
    # the harness's TaskManager metadata; the two keys the bridge fills in when null are listed so overrides need no +
    metadata: dict[str, Any] = field(default_factory=lambda: {"max_seq_lengths": None, "tokenizer": None})
    include_path: str | None = None  # a folder of local task YAMLs
    include_defaults: bool = True  # also index the harness's own tasks
    batch_size: int = 1
    apply_chat_template: bool = False
    on_overflow: str = "refuse"  # refuse | truncate


def harness_version() -> str:
    """The installed lm-eval's version, or a one-line error that says how to install a supported one."""
    try:
        import lm_eval
    except ImportError:
        raise ValueError(
            f"task=lm_eval needs EleutherAI's lm-evaluation-harness, which is not installed; {INSTALL}"
        ) from None
    from packaging.version import Version

    low, high = SUPPORTED
    if not Version(low) <= Version(lm_eval.__version__) < Version(high):
        raise ValueError(
            f"task=lm_eval drives lm-eval >= {low}, < {high} and lm-eval {lm_eval.__version__} is installed; {INSTALL}"
        )
    return lm_eval.__version__


@cache
def known_names(include_path: str | None, include_defaults: bool) -> frozenset[str]:
    """Every task, group and tag name the harness indexes (its own tasks take ~10 s to index on a small CPU)."""
    from lm_eval.tasks import TaskManager

    return frozenset(TaskManager(include_path=include_path, include_defaults=include_defaults).all_tasks)


def _include_path(cfg: Any) -> str | None:
    return str(Path(cfg.include_path).expanduser().resolve()) if cfg.include_path else None


def check(cfg: Any, ctxs: Sequence[int]) -> str:
    """Refuse bad ``task.*`` values in one line before a model loads; returns the harness's version."""
    version = harness_version()
    if OmegaConf.is_missing(cfg, "tasks") or not cfg.tasks:
        raise ValueError("task.tasks is empty; name harness tasks, groups or tags, e.g. 'task.tasks=[ruler]'")
    repeated = sorted({name for name in cfg.tasks if list(cfg.tasks).count(name) > 1})
    if repeated:
        raise ValueError(f"task.tasks names {repeated} twice; list each task once")
    if cfg.on_overflow not in ON_OVERFLOW:
        raise ValueError(f"task.on_overflow={cfg.on_overflow}; choose one of {', '.join(ON_OVERFLOW)}")
    if cfg.batch_size < 1:
        raise ValueError(
            f"task.batch_size={cfg.batch_size}; use a fixed batch of >= 1 sequences, e.g. task.batch_size=1"
        )
    if cfg.num_fewshot is not None and cfg.num_fewshot < 0:
        raise ValueError(f"task.num_fewshot={cfg.num_fewshot}; use >= 0, or null for each task's own")
    limit = cfg.limit
    if limit is not None and not (0 < limit < 1 or (limit >= 1 and float(limit).is_integer())):
        raise ValueError(f"task.limit={limit}; use a whole number of documents >= 1, a fraction in (0, 1), or null")
    include_path = _include_path(cfg)
    if include_path and not Path(include_path).is_dir():
        raise ValueError(f"task.include_path={cfg.include_path} is not a folder; give the folder of your task YAMLs")
    if not include_path and not cfg.include_defaults:
        raise ValueError("task.include_defaults=false indexes only task.include_path, which is not set; set both")
    babilong = [name for name in cfg.tasks if name.startswith("babilong")]
    if babilong and cfg.metadata.get("max_seq_lengths") not in BABILONG_LENGTHS:
        raise ValueError(
            f"{babilong[0]} reads task.metadata.max_seq_lengths as one of its datasets ({', '.join(BABILONG_LENGTHS)}), "
            f"not a list of lengths; set one, e.g. task.metadata.max_seq_lengths=4k (with ctx above its prompts)"
        )
    names = known_names(include_path, bool(cfg.include_defaults))
    for name in cfg.tasks:
        if name not in names:
            close = difflib.get_close_matches(name, names, n=3)
            where = (
                f" in {include_path}" + (" or its own tasks" if cfg.include_defaults else "") if include_path else ""
            )
            hint = f"close: {', '.join(close)}" if close else "`lm-eval ls tasks` lists them"
            raise ValueError(f"task.tasks has {name!r}, which lm-eval {version} does not know{where}; {hint}")
    return version


def harness_metadata(cfg: Any, ctx: int, tokenizer: Any, folder: str) -> dict:
    """What the harness hands its tasks' dataset builders: ``task.metadata``, with RULER's ``max_seq_lengths``
    (null: ``[ctx]``) and ``tokenizer`` (null: the loaded model's, saved into ``folder``) filled in."""
    given = OmegaConf.to_container(cfg.metadata, resolve=True) if isinstance(cfg.metadata, DictConfig) else cfg.metadata
    metadata = {**given, "max_seq_lengths": given.get("max_seq_lengths") or [ctx]}
    if not metadata.get("tokenizer"):
        tokenizer.save_pretrained(folder)
        metadata["tokenizer"] = folder
    return metadata


@cache
def guarded_lm_class() -> type:
    """HFLM that measures every request against ``max_length`` before the harness would left-truncate it."""
    from lm_eval.models.huggingface import HFLM

    try:
        from lm_eval.models.utils import normalize_gen_kwargs
    except ImportError:  # lm-eval < 0.4.11 reads the generation budget from max_gen_toks only

        def normalize_gen_kwargs(gen_kwargs: dict, default: int) -> dict:
            return {"max_gen_toks": gen_kwargs.get("max_gen_toks", default)}

    class CtxGuardedLM(HFLM):
        def __init__(self, model, tokenizer, ctx: int, batch_size: int, on_overflow: str):
            super().__init__(
                pretrained=model, tokenizer=tokenizer, backend="causal", max_length=ctx, batch_size=batch_size
            )
            self.on_overflow = on_overflow
            self.request_tokens: dict[tuple[str, int], int] = {}  # (task, doc_id) -> its longest request
            self._encoding = None  # the Instances whose encodings _loglikelihood_tokens is about to get

        def _admit(self, kind: str, sized: list[tuple[Any, int]]) -> None:
            for instance, tokens in sized:
                key = (instance.task_name, instance.doc_id)
                self.request_tokens[key] = max(tokens, self.request_tokens.get(key, 0))
            over = [(instance.task_name, tokens) for instance, tokens in sized if tokens > self.max_length]
            if over and self.on_overflow == "refuse":
                raise ValueError(
                    f"lm-eval task {', '.join(sorted({task for task, _ in over}))}: {len(over)} of {len(sized)} {kind} "
                    f"requests need more than ctx={self.max_length} tokens (up to {max(t for _, t in over)}), which "
                    f"the harness would cut from the left; raise ctx, or set task.on_overflow=truncate to let it cut "
                    f"them and count them in the truncated column"
                )

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            self._encoding = requests  # TemplateLM encodes them in this order and hands them to _loglikelihood_tokens
            try:
                return super().loglikelihood(requests, disable_tqdm=disable_tqdm)
            finally:
                self._encoding = None

        def _loglikelihood_tokens(self, requests, *args, **kwargs):
            if self._encoding is not None:  # not from loglikelihood_rolling, whose windows fit max_length by design
                instances, self._encoding = self._encoding, None
                # the model is fed the context and the continuation without its last token
                fed = [len(context) + len(continuation) - 1 for _, context, continuation in requests]
                self._admit("loglikelihood", list(zip(instances, fed, strict=True)))
            return super()._loglikelihood_tokens(requests, *args, **kwargs)

        def generate_until(self, requests, disable_tqdm: bool = False):
            sized = []
            for instance in requests:
                context, gen_kwargs = instance.args[:2]
                budget = int(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)["max_gen_toks"])
                if budget >= self.max_length:
                    raise ValueError(
                        f"lm-eval task {instance.task_name} generates up to {budget} tokens, which leaves no room for "
                        f"a prompt at ctx={self.max_length}; use ctx > {budget}"
                    )
                sized.append((instance, self.tok_batch_encode([context])[0].shape[1] + budget))
            self._admit("generate_until", sized)
            return super().generate_until(requests, disable_tqdm=disable_tqdm)

    return CtxGuardedLM


def network_failure(error: BaseException) -> BaseException | None:
    """The exception in ``error``'s chain saying that the network was needed and not there, if there is one."""
    import httpx
    import requests
    from huggingface_hub import errors as hub_errors

    kinds = (
        ConnectionError,  # datasets' "Couldn't reach ... on the Hub", hub's OfflineModeIsEnabled
        TimeoutError,
        requests.exceptions.ConnectionError,
        requests.exceptions.Timeout,
        httpx.TransportError,
        hub_errors.LocalEntryNotFoundError,  # offline, and not in the cache
    )
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, kinds):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _offline_message(name: str, failure: BaseException) -> str:
    import datasets.config
    from huggingface_hub import constants

    offline = constants.HF_HUB_OFFLINE or datasets.config.HF_DATASETS_OFFLINE
    lines = str(failure).strip().splitlines()
    return (
        f"lm-eval task {name} needs the network ({type(failure).__name__}: {lines[0] if lines else 'no detail'}), "
        f"and {'HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set' if offline else 'it is unreachable'}; run it once where "
        f"the hub is reachable to fill the cache, or copy its data over and point a task YAML in task.include_path at "
        f"the local files (dataset_path: json, dataset_kwargs.data_files)"
    )


def evaluate(env: Any, ctx: int, name: str) -> tuple[dict, dict[tuple[str, int], int]]:
    """The harness's results for one cell, and the token length of each document's longest request."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    cfg = env.cfg
    if cfg.apply_chat_template and not getattr(env.tokenizer, "chat_template", None):
        raise ValueError("task.apply_chat_template=true but the model's tokenizer has no chat template; set it false")
    lm = guarded_lm_class()(env.model, env.tokenizer, ctx, int(cfg.batch_size), cfg.on_overflow)
    with tempfile.TemporaryDirectory(prefix="enhance_long_tokenizer_") as folder:
        manager = TaskManager(
            include_path=_include_path(cfg),
            include_defaults=bool(cfg.include_defaults),
            metadata=harness_metadata(cfg, ctx, env.tokenizer, folder),
        )
        try:
            results = simple_evaluate(
                model=lm,
                tasks=[name],
                num_fewshot=cfg.num_fewshot,
                limit=cfg.limit,
                log_samples=True,
                task_manager=manager,
                apply_chat_template=bool(cfg.apply_chat_template),
                fewshot_as_multiturn=bool(cfg.apply_chat_template),
            )
        except Exception as error:
            failure = network_failure(error)
            if failure is None:
                raise
            raise RuntimeError(_offline_message(name, failure)) from error
    return results, lm.request_tokens


def _leaves(results: dict, name: str) -> list[str]:
    children = results.get("group_subtasks", {}).get(name)
    return [leaf for child in children for leaf in _leaves(results, child)] if children else [name]


def result_rows(results: dict, request_tokens: dict[tuple[str, int], int], cell: dict) -> list[dict]:
    """One row per (subtask, metric, filter) of the harness's results, in its order; see the module docstring."""
    ctx = int(cell["ctx"])
    rows = []
    for subtask, values in results["results"].items():
        leaves = _leaves(results, subtask)
        samples = sum(results["n-samples"][leaf]["effective"] for leaf in leaves if leaf in results["n-samples"])
        truncated = sum(tokens > ctx for (task, _), tokens in request_tokens.items() if task in leaves)
        for key, value in values.items():
            metric, comma, filter_name = key.partition(",")
            if not comma or metric.endswith("_stderr"):
                continue
            if metric.isdigit() and value == -1:  # RULER: no samples of this length in this cell
                continue
            stderr = values.get(f"{metric}_stderr,{filter_name}")
            rows.append(
                {
                    **cell,
                    "subtask": subtask,
                    "metric": metric,
                    "filter": filter_name,
                    "value": value,
                    "stderr": stderr if isinstance(stderr, int | float) else None,
                    "samples": samples,
                    "truncated": truncated,
                    "task_version": results.get("versions", {}).get(subtask),
                }
            )
    return json_able(rows)


def json_able(value: Any) -> Any:
    """``value`` with the harness's numpy scalars and sets made plain JSON, as its own log writer does."""
    from lm_eval.utils import handle_non_serializable

    return json.loads(json.dumps(value, default=handle_non_serializable, ensure_ascii=False))


def sample_lines(results: dict, request_tokens: dict[tuple[str, int], int], identity: dict) -> list[dict]:
    """The harness's logged samples, each headed by the cell's identity and its longest request's length."""
    lines = []
    for subtask, samples in results.get("samples", {}).items():
        for sample in samples:
            tokens = request_tokens.get((subtask, sample["doc_id"]))
            head = {
                "subtask": subtask,
                "request_tokens": tokens,
                "truncated": tokens is not None and tokens > identity["ctx"],
            }
            lines.append({**identity, **head, **sample})
    return json_able(lines)


def _metric_label(row: dict) -> str:
    metric = "<ctx>" if row["metric"] == str(row["ctx"]) else row["metric"]  # RULER names its score after the length
    return metric if row.get("filter") in (None, "none") else f"{metric} [{row['filter']}]"


def _value_label(row: dict) -> str:
    value = row["value"]
    text = f"{value:.4f}" if isinstance(value, int | float) else str(value)
    if row.get("stderr") is not None:
        text += f" ± {row['stderr']:.4f}"
    return text + (f" ({row['truncated']} cut)" if row.get("truncated") else "")


def harness_table(rows: Iterable[dict]) -> str:
    """The harness's scores as Markdown: one line per (subtask, metric), one column per setting ("8192, <method>",
    model first when rows mix models), settings by model, length, then the stock model first. The last row for a
    (line, setting) wins; ``(N cut)`` marks documents the harness truncated (``task.on_overflow=truncate``)."""
    rows = [row for row in rows if row.get("task", "lm_eval") == "lm_eval" and "metric" in row]
    models = list(dict.fromkeys(str(row.get("model")) for row in rows))
    versions = sorted({str(row["lm_eval"]) for row in rows if row.get("lm_eval")})
    cells: dict[tuple, dict[tuple, str]] = {}
    for row in rows:
        method = str(row["method"])
        setting = (models.index(str(row.get("model"))), int(row["ctx"]), method != "none", method)
        cells.setdefault((row["subtask"], _metric_label(row)), {})[setting] = _value_label(row)
    settings = sorted({setting for by_setting in cells.values() for setting in by_setting})
    names = [f"{models[s[0]]}, " * (len(models) > 1) + f"{s[1]}, {s[3]}" for s in settings]
    lines = [
        f"### lm-evaluation-harness (model {', '.join(models)}; lm-eval {', '.join(versions)})",
        "",
        "| task | metric | " + " | ".join(names) + " |",
        "|---" * (len(names) + 2) + "|",
    ]
    for (subtask, metric), by_setting in cells.items():
        lines.append(f"| {subtask} | {metric} | " + " | ".join(by_setting.get(s, "-") for s in settings) + " |")
    return "\n".join(lines) + "\n"


def harness_brief(rows: Sequence[dict]) -> str:
    """One log line for a cell's rows: the requested task's (or group's) own metrics."""
    if not rows:
        return "no results"
    name = rows[0]["harness_task"]
    headline = [row for row in rows if row["subtask"] == name] or list(rows)
    metrics = ", ".join(f"{_metric_label(row)}={_value_label(row)}" for row in headline)
    return f"{name}: {metrics} over {headline[0]['samples']} samples"


class LmEval(Task):
    """The ``lm_eval`` task: one cell per (ctx, harness task name); see the module docstring."""

    name = "lm_eval"
    schema = LmEvalConfig
    uses_data = False  # the harness brings its own datasets

    def check(self, cfg: Any, ctxs: Sequence[int]) -> str:
        return check(cfg, ctxs)

    def cells(self, cfg: Any, ctxs: Sequence[int]) -> list[dict]:
        version = self.check(cfg, ctxs)
        return [{"ctx": int(ctx), "harness_task": name, "lm_eval": version} for ctx in ctxs for name in cfg.tasks]

    def measure(self, env: Any, cell: dict) -> list[dict]:
        from enhance_long.patch import describe

        ctx, name = int(cell["ctx"]), cell["harness_task"]
        results, request_tokens = evaluate(env, ctx, name)
        identity = {"ctx": ctx, "harness_task": name, "method": describe(env.model)}
        folder = Path(env.out_dir) / SAMPLES_DIR
        folder.mkdir(parents=True, exist_ok=True)
        replace_cell_lines(folder / f"{name}_{ctx}.jsonl", identity, sample_lines(results, request_tokens, identity))
        return result_rows(results, request_tokens, dict(cell))

    def table(self, rows: Iterable[dict]) -> str:
        return harness_table(rows)

    def brief(self, rows: Sequence[dict]) -> str:
        return harness_brief(rows)


TASK = LmEval()
