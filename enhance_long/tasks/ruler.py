"""RULER (NVIDIA; Hsieh et al. 2024): synthetic long-context tasks generated offline, and the effective length.

    python run.py task=ruler ctxs=[4096,8192] task.samples=5
    python run.py task=ruler 'task.tasks=[niah_single_1,niah_multikey_1,vt,cwe]' ctxs=[2048,4096,8192]
    python run.py task=ruler 'task.tasks=[qa_1,qa_2]' task.qa_path=/data/ruler_qa   # squad.json, hotpotqa.json

One cell per (context length, RULER task). Each cell generates ``task.samples`` prompts of exactly ``ctx`` tokens
including the task's tokens to generate (:mod:`enhance_long.tasks.ruler_data`), decodes greedily through the patched
model and its KV cache (:func:`generate`), and scores the answers with RULER's metric
(:mod:`enhance_long.tasks.ruler_metrics`). A cell yields one row ``{ctx, ruler_task, category, score, samples,
nulls, tokens_to_generate, prefix_reuse}`` and writes one line per sample to ``predictions.jsonl``. The table lays
out task x length per method with the category means, the average and the effective length (the longest length up
to which the average stays >= ``task.threshold``, RULER's 85.6 by default); ``ruler_heatmap.png`` plots it.

Followed (NVIDIA/RULER): ``scripts/synthetic.yaml`` (the 13 tasks and their arguments),
``scripts/data/synthetic/constants.py`` (templates, answer prefixes, tokens to generate),
``scripts/data/synthetic/{niah,variable_tracking,common_words_extraction,freq_words_extraction,qa}.py`` (needles,
haystacks, depths, word lists, the vt example, the cwe example, the fwe Zipf counts, the QA documents),
``scripts/data/prepare.py`` and ``scripts/data/template.py`` (model template + answer prefix),
``scripts/pred/call_api.py`` (prompt = input + answer prefix, greedy), ``scripts/eval/evaluate.py`` and
``scripts/eval/synthetic/constants.py`` (postprocessing, ``string_match_all`` / ``string_match_part``).

Deliberate differences:

- Haystack: the ``data=`` corpus (the Canterbury books by default) in place of the Paul Graham essays, all its
  documents joined with whitespace collapsed, cut into sentences by a punctuation rule in place of NLTK's Punkt,
  and counted in sentences (RULER counts words, then splits the words it took into sentences). RULER's noise
  sentence is the ``noise`` haystack, as in RULER.
- Length: every prompt plus its generation is exactly ``ctx`` tokens, special tokens and chat template included
  (RULER stops at ``<= max_seq_length``, counting neither). Pieces are tokenized on their own and concatenated; the
  haystack size is bisected for the smallest one that fills the budget and the surplus tokens come off the end of
  the last haystack piece.
- Chat: the tokenizer's own chat template (``task.chat_template``) in place of RULER's per-model strings; the
  answer prefix follows its generation prompt, as RULER's follows its template. cwe's answered example becomes its
  own user/assistant exchange (RULER repeats its whole model template for it, which is that exchange in the
  model's format); niah's singular rewording ("Some ... are" -> "A ... is") touches the task text only, not the
  chat template.
- Words: wonderwords' lists (the package, pinned to RULER's 2.2.0), read from its files; a niah word key draws
  its adjective and noun independently (the same distribution as RULER's list of all pairs). cwe refuses lengths
  that need more distinct words than those lists hold (8169) where RULER falls back to ``english_words.json``, a
  Git LFS file not published on PyPI.
- Randomness: one ``random.Random`` per sample seeded by (seed, ctx, task, index), for RULER's global seed and
  fixed-seed shuffles. vt draws distinct names and its example's names and value directly (RULER writes 12345 and
  substitutes) and sizes the example (<= 500 tokens) per sample; fwe's Zipf exponent is RULER's 2.0, fixed.
- Not included: RULER's ``remove_newline_tab`` option, its weighted averages (wAvg), and arguments the 13 tasks do
  not use (vt with the essay haystack or several chains, other fwe exponents).

Cheaper where exact: samples of one cell share the leading ids of their prompts (chat head, template head, the
haystack up to the first needle); where the method scores a prefix as it scores it alone (every method but
``dynamic_ntk`` and the ``per_forward`` schedule), that prefix is prefilled once per cell and each sample continues
from a copy of its KV cache (``tasks/generation.py``). Each row's ``prefix_reuse`` is the share of the cell's prefill
that saves.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from enhance_long.patch import describe
from enhance_long.plots import Panel, heatmaps
from enhance_long.results import replace_cell_lines
from enhance_long.tasks.base import Task, TaskEnv, require_positive
from enhance_long.tasks.generation import greedy, leading_special
from enhance_long.tasks.ruler_data import (
    CATEGORIES,
    QA_FILES,
    QA_READERS,
    SYNTHETIC,
    TASKS,
    Encoder,
    Prompt,
    Sources,
    build_prompt,
    chat_frame,
    raw_frame,
    split_sentences,
)
from enhance_long.tasks.ruler_metrics import METRICS, effective_length, postprocess

CHAT_TEMPLATE_CHOICES = ("auto", True, False)
THRESHOLD = 85.6  # RULER: Llama-2-7B's average at 4k, the bar for "effective"


@dataclass
class RulerConfig:
    """``task=ruler``: which of RULER's tasks, how many samples, how to prompt and score them."""

    name: str = "ruler"  # registry name in enhance_long.tasks
    tasks: list[str] = field(default_factory=lambda: list(SYNTHETIC))  # RULER tasks to run; qa_1/qa_2 need qa_path
    samples: int = 5  # prompts per (task, length); RULER uses 500
    threshold: float = THRESHOLD  # the effective length is the longest whose average stays >= this, in (0, 100]
    chat_template: Any = "auto"  # auto: the tokenizer's chat template if it has one; true: require it; false: raw
    qa_path: str | None = None  # folder with RULER's squad.json (SQuAD 2.0 dev) and hotpotqa.json (HotpotQA dev)
    batch_size: int = 1  # prompts per generate call, grouped by length


def check(cfg: Any, ctxs: Sequence[int]) -> None:
    """Refuse bad ``task.*`` values before a model is loaded, each with a one-line message and the fix."""
    names = list(cfg.tasks)
    if not names:
        raise ValueError(f"task.tasks is empty; choose from {list(TASKS)}, e.g. task.tasks=[niah_single_1,vt]")
    for name in names:
        if name not in TASKS:
            raise ValueError(f"task.tasks has {name!r}, not a RULER task; choose from {list(TASKS)}")
        if names.count(name) > 1:
            raise ValueError(f"task.tasks lists {name} {names.count(name)} times; list each task once")
        dataset = TASKS[name].dataset
        if dataset is not None:
            file = QA_FILES[dataset]
            if cfg.qa_path is None:
                raise ValueError(
                    f"task.tasks has {name}, which reads {dataset} from {file}; set task.qa_path to the folder "
                    f"holding it (RULER's scripts/data/synthetic/json/download_qa_dataset.sh fetches it) or drop {name}"
                )
            if not (Path(cfg.qa_path).expanduser() / file).is_file():
                raise ValueError(f"task.qa_path={cfg.qa_path} has no {file}; put RULER's {file} there or drop {name}")
    if not (isinstance(cfg.samples, int) and cfg.samples >= 1):
        raise ValueError(f"task.samples={cfg.samples!r}; use an integer >= 1 (RULER uses 500), e.g. task.samples=5")
    if not (isinstance(cfg.threshold, int | float) and 0 < cfg.threshold <= 100):
        raise ValueError(
            f"task.threshold={cfg.threshold!r} is outside (0, 100]; RULER's is 85.6, e.g. task.threshold=85.6"
        )
    if cfg.chat_template not in CHAT_TEMPLATE_CHOICES:
        raise ValueError(f"task.chat_template={cfg.chat_template!r}; choose one of {CHAT_TEMPLATE_CHOICES}")
    require_positive("task.batch_size", cfg.batch_size, "task.batch_size=4", integer=True)
    for ctx in ctxs:
        for name in names:
            if ctx <= TASKS[name].tokens_to_generate:
                raise ValueError(
                    f"ctx={ctx} leaves no prompt for RULER's {name}, which generates "
                    f"{TASKS[name].tokens_to_generate} tokens; use longer lengths (RULER's shortest is 4096)"
                )


def use_chat_template(setting: Any, tokenizer) -> bool:
    """``task.chat_template``: auto uses the tokenizer's template when it has one; true requires one; false never."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if setting is True and not has_template:
        raise ValueError("task.chat_template=true but the tokenizer has no chat template; use auto or false")
    return has_template and setting is not False


def essay_sentences(data_cfg: Any) -> tuple[str, ...]:
    """The essay haystack: every document of the ``data=`` corpus, joined, cut into sentences."""
    from enhance_long.data import iter_texts

    return tuple(split_sentences(" ".join(text for _, text in iter_texts(data_cfg))))


class Ruler(Task):
    """The ``ruler`` task: one cell per (ctx, RULER task); see the module docstring."""

    name = "ruler"
    schema = RulerConfig
    uses_data = True  # the essay haystack is the data= corpus, so data=... changes the results

    def check(self, cfg: Any, ctxs: Sequence[int]) -> None:
        check(cfg, ctxs)

    def cells(self, cfg: Any, ctxs: Sequence[int]) -> list[dict]:
        """One cell per (ctx, RULER task), after checking ``cfg`` (the ``task`` group)."""
        check(cfg, ctxs)
        return [{"ctx": int(ctx), "ruler_task": name} for ctx in ctxs for name in cfg.tasks]

    def sources(self, env: TaskEnv, task: str) -> Sources:
        """What ``task`` draws on, read once per job: the essay sentences, or its QA file."""
        spec = TASKS[task]
        if spec.haystack == "essay" and spec.family == "niah":
            if "ruler.sentences" not in env.cache:  # one data= corpus per job
                env.cache["ruler.sentences"] = essay_sentences(env.data_cfg)
            return Sources(sentences=env.cache["ruler.sentences"])
        if spec.dataset is not None:
            key = ("ruler.qa", spec.dataset, env.cfg.qa_path)
            if key not in env.cache:
                path = Path(env.cfg.qa_path).expanduser() / QA_FILES[spec.dataset]
                env.cache[key] = QA_READERS[spec.dataset](path)
            return Sources(qa={spec.dataset: env.cache[key]})
        return Sources()

    def prompts(self, env: TaskEnv, task: str, ctx: int) -> list[Prompt]:
        """The cell's ``task.samples`` prompts, built with the job's tokenizer."""
        if "ruler.encode" not in env.cache:
            chat = use_chat_template(env.cfg.chat_template, env.tokenizer)
            lead = leading_special(env.tokenizer)

            @functools.cache
            def frame(turns: int):
                return chat_frame(env.tokenizer, turns) if chat else raw_frame(lead, turns)

            env.cache["ruler.encode"], env.cache["ruler.frame"] = Encoder(env.tokenizer), frame
        encode, frame, sources = env.cache["ruler.encode"], env.cache["ruler.frame"], self.sources(env, task)
        return [build_prompt(task, ctx, i, env.seed, encode, frame, sources) for i in range(env.cfg.samples)]

    def measure(self, env: TaskEnv, cell: dict) -> list[dict]:
        ctx, task = int(cell["ctx"]), cell["ruler_task"]
        spec = TASKS[task]
        prompts = self.prompts(env, task, ctx)
        answers = greedy(
            env.model,
            env.tokenizer,
            [p.ids for p in prompts],
            spec.tokens_to_generate,
            batch_size=env.cfg.batch_size,
            desc=f"ruler {task} @ {ctx}",
            reuse_prefix=True,  # the trials share the prompt up to the needle: prefilled once where exact
            progress=env.progress,
        )
        outputs = [env.tokenizer.decode(answer, skip_special_tokens=True) for answer in answers]
        cell_metric, metric = METRICS[spec.family]
        method = describe(env.model)  # a job may measure several methods (baseline=true) into one predictions file
        lines = []
        for index, (prompt, output) in enumerate(zip(prompts, outputs, strict=True)):
            prediction = postprocess(output)
            lines.append(
                {
                    "ctx": ctx,
                    "ruler_task": task,
                    "method": method,
                    "index": index,
                    "pred": prediction,
                    "answers": list(prompt.answers),
                    "score": metric(prediction, prompt.answers),
                    "input_tokens": len(prompt.ids),
                    "shared_tokens": prompt.shared,
                    "haystack": prompt.haystack,
                }
            )
        replace_cell_lines(
            Path(env.out_dir) / "predictions.jsonl", {"ctx": ctx, "ruler_task": task, "method": method}, lines
        )
        shared, total = [p.shared for p in prompts], sum(len(p.ids) for p in prompts)
        return [
            {
                "ctx": ctx,
                "ruler_task": task,
                "category": spec.category,
                "score": cell_metric([line["pred"] for line in lines], [line["answers"] for line in lines]),
                "samples": len(lines),
                "nulls": sum(not line["pred"] for line in lines),
                "tokens_to_generate": spec.tokens_to_generate,
                "prefix_reuse": round((sum(shared) - max(shared)) / total, 4),
            }
        ]

    def table(self, rows: Iterable[dict]) -> str:
        return ruler_table(rows)

    def brief(self, rows: Sequence[dict]) -> str:
        row = rows[-1]
        return (
            f"{row['ruler_task']} @ {row['ctx']}: {row['score']:.2f} ({row['samples']} samples, {row['nulls']} empty)"
        )

    def plots(self, rows: Iterable[dict], out_dir: Path) -> list[Path]:
        path = plot_ruler_heatmap(rows, Path(out_dir) / "ruler_heatmap.png")
        return [path] if path is not None else []


TASK = Ruler()


# --- the table and the plot ---------------------------------------------------------------------------------------


@dataclass
class MethodScores:
    """One method's scores: task -> ctx -> score, and its threshold."""

    threshold: float
    scores: dict[str, dict[int, float]] = field(default_factory=dict)

    def ctxs(self) -> list[int]:
        return sorted({ctx for by_ctx in self.scores.values() for ctx in by_ctx})

    def tasks(self) -> list[str]:
        return [name for name in TASKS if name in self.scores]

    def mean(self, names: Sequence[str], ctx: int) -> float | None:
        values = [self.scores[name][ctx] for name in names if ctx in self.scores.get(name, {})]
        return sum(values) / len(values) if values else None

    def averages(self) -> dict[int, float]:
        return {ctx: self.mean(self.tasks(), ctx) for ctx in self.ctxs()}

    def effective(self) -> str:
        ctxs, length = self.ctxs(), effective_length(self.averages(), self.threshold)
        if length is None:
            return f"below {ctxs[0]}"
        return f"{length} or more" if length == ctxs[-1] else str(length)


def method_scores(rows: Iterable[dict]) -> dict[str, MethodScores]:
    """RULER rows grouped by setting (the model first when rows mix models, then the method); the last row of a
    (setting, task, ctx) wins; rows of other tasks are ignored."""
    rows = [r for r in rows if r.get("task", "ruler") == "ruler" and r.get("ruler_task") in TASKS]
    models = list(dict.fromkeys(str(row.get("model")) for row in rows))
    out: dict[str, MethodScores] = {}
    for row in rows:
        label = f"{row.get('model')}, " * (len(models) > 1) + str(row["method"])
        threshold = (row.get("settings") or {}).get("threshold", THRESHOLD)
        out.setdefault(label, MethodScores(threshold)).scores.setdefault(row["ruler_task"], {})[int(row["ctx"])] = (
            float(row["score"])
        )
    return dict(sorted(out.items(), key=lambda item: item[0] != "none"))  # stable: the stock model, then as seen


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def ruler_table(rows: Iterable[dict]) -> str:
    """RULER scores (x100) as Markdown: a summary of each setting's average per length and effective length, then
    per setting task x length with the category means and the average (over the tasks run)."""
    rows = list(rows)
    by_method = method_scores(rows)
    models = ", ".join(dict.fromkeys(str(r.get("model")) for r in rows if r.get("ruler_task") in TASKS))
    ctxs = sorted({ctx for scores in by_method.values() for ctx in scores.ctxs()})
    lines = [
        f"### RULER, score x100 (model {models})",
        "",
        "Average over the tasks run (RULER's is over its 13); effective length: the longest length up to which the "
        "average stays at or above the threshold.",
        "",
        "| method | " + " | ".join(map(str, ctxs)) + " | effective length (threshold) |",
        "|---" * (len(ctxs) + 2) + "|",
    ]
    for label, scores in by_method.items():
        averages = scores.averages()
        cells = [_fmt(averages.get(ctx)) for ctx in ctxs]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {scores.effective()} ({scores.threshold:g}) |")
    for label, scores in by_method.items():
        own = scores.ctxs()
        lines += ["", f"#### {label}", "", "| task | category | " + " | ".join(map(str, own)) + " |"]
        lines.append("|---" * (len(own) + 2) + "|")
        for name in scores.tasks():
            cells = [_fmt(scores.scores[name].get(ctx)) for ctx in own]
            lines.append(f"| {name} | {TASKS[name].category} | " + " | ".join(cells) + " |")
        for category in CATEGORIES:
            members = [name for name in scores.tasks() if TASKS[name].category == category]
            if members:
                cells = [_fmt(scores.mean(members, ctx)) for ctx in own]
                lines.append(f"| {category} | mean of {len(members)} | " + " | ".join(cells) + " |")
        cells = [_fmt(scores.mean(scores.tasks(), ctx)) for ctx in own]
        lines.append(f"| average | {len(scores.tasks())} tasks | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_ruler_heatmap(rows: Iterable[dict], path: Path) -> Path | None:
    """Score per task and length (and the average), one panel per setting, red-yellow-green over 0-100."""
    by_method = method_scores(rows)
    if not by_method:
        return None
    panels = []
    for label, scores in by_method.items():
        names, ctxs = scores.tasks(), scores.ctxs()
        grid = [[scores.scores[name].get(ctx, math.nan) for ctx in ctxs] for name in names]
        grid.append([scores.averages().get(ctx, math.nan) for ctx in ctxs])
        title = f"{label}\neffective length {scores.effective()}"
        panels.append(Panel(title, [*names, "average"], ctxs, grid, rule=len(names)))
    return heatmaps(panels, path, 100.0, lambda v: f"{v:.0f}", "context length", "", "score")
