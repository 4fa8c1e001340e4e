"""LongBench (THUDM), English datasets: LongBench's prompts, generation lengths, truncation and metrics.

    python run.py task=longbench ctxs=[4096,8192] task.path=/data/longbench task.max_samples=20

One cell per (context length, dataset). For every record the dataset's prompt template is filled in, wrapped in the
tokenizer's chat template (except on the few-shot/code datasets, where LongBench feeds chat models raw prompts),
tokenized, and cut in the *middle* to ``ctx - max_new_tokens`` tokens, keeping the head (instructions) and the tail
(question, answer cue). The patched model then decodes greedily with its KV cache, and the prediction is scored with
LongBench's metric (``longbench_metrics``). A cell yields one row, ``{ctx, dataset, score, samples, truncated}``
with ``score`` = 100 x the mean sample score, and adds one line per sample to ``predictions.jsonl`` (tagged with
the method ``enhance_long.describe`` reports, as one job may measure the stock model too).

Data: ``task.path`` names a local copy, either LongBench's ``data.zip`` or the directory it unzips to (``<dataset>
.jsonl`` files); with ``task.path=null`` ``data.zip`` is fetched from the ``THUDM/LongBench`` dataset repository on
the Hugging Face hub (cached by ``huggingface_hub``). Records are read from the zip; nothing is extracted.

Differences from LongBench's ``pred.py``, both so that a prompt plus its generation fit ``ctx`` exactly: LongBench
truncates the bare prompt to its ``model2maxlen`` (3500 for Llama-2-chat), decodes the two halves and re-tokenizes
them inside the chat wrapper; here the final token sequence (chat wrapper included) is cut, with no decode/encode
round trip, and the budget is ``ctx - max_new_tokens``. The chat wrapper is the tokenizer's own chat template, where
LongBench hard-codes ``[INST]{prompt}[/INST]`` for Llama-2.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from enhance_long.patch import describe
from enhance_long.results import replace_cell_lines
from enhance_long.tasks.base import Task, TaskEnv, require_positive
from enhance_long.tasks.generation import greedy
from enhance_long.tasks.longbench_metrics import sample_score

HUB_REPO = "THUDM/LongBench"
HUB_ARCHIVE = "data.zip"
ARCHIVE_URL = f"https://huggingface.co/datasets/{HUB_REPO}/resolve/main/{HUB_ARCHIVE}"


@dataclass(frozen=True)
class Dataset:
    """How LongBench prompts one dataset (``config/dataset2prompt.json``, ``dataset2maxlen.json``, ``pred.py``)."""

    title: str  # column header in the results table
    template: str  # filled with the record's ``context`` and ``input``
    max_new_tokens: int
    chat: bool = True  # False: chat models get the raw prompt (LongBench's few-shot and code datasets)
    stop_at_newline: bool = False  # samsum: LongBench stops at the first newline after at least one token


_MULTI_DOC_QA = (
    "Answer the question based on the given passages. Only give me the answer and do not output any other words."
    "\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give "
    "me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:"
)
_QASPER_RULES = (
    "as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based "
    'on the information in the article, write "unanswerable". If the question is a yes/no question, answer "yes", '
    '"no", or "unanswerable". Do not provide any explanation.'
)
_CODE = "Please complete the code given below. \n{context}"

# The original enhance-long's 11 datasets first, in its table's order, then LongBench's other English datasets.
DATASETS: dict[str, Dataset] = {
    "hotpotqa": Dataset("HotpotQA", _MULTI_DOC_QA, 32),
    "musique": Dataset("MuSiQue", _MULTI_DOC_QA, 32),
    "narrativeqa": Dataset(
        "NarrativeQA",
        # "asconcisely" is LongBench's own spelling, kept so prompts match the published numbers.
        "You are given a story, which can be either a novel or a movie script, and a question. Answer the question "
        "asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nStory: "
        "{context}\n\nNow, answer the question based on the story asconcisely as you can, using a single phrase if "
        "possible. Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",
        128,
    ),
    "gov_report": Dataset(
        "GovReport",
        "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n"
        "{context}\n\nNow, write a one-page summary of the report.\n\nSummary:",
        512,
    ),
    "qmsum": Dataset(
        "QMSum",
        "You are given a meeting transcript and a query containing a question or instruction. Answer the query in one "
        "or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting transcript "
        "in one or more sentences.\n\nQuery: {input}\nAnswer:",
        512,
    ),
    "triviaqa": Dataset(
        "TriviaQA",
        "Answer the question based on the given passage. Only give me the answer and do not output any other words. "
        "The following are some examples.\n\n{context}\n\n{input}",
        32,
        chat=False,
    ),
    "samsum": Dataset(
        "SAMSum",
        "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n{input}",
        128,
        chat=False,
        stop_at_newline=True,
    ),
    "trec": Dataset(
        "TREC",
        "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n{input}",
        64,
        chat=False,
    ),
    "passage_retrieval_en": Dataset(
        "PassageRetrieval-en",
        "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the abstract "
        "is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the number of the paragraph "
        'that the abstract is from. The answer format must be like "Paragraph 1", "Paragraph 2", etc.\n\n'
        "The answer is: ",
        32,
    ),
    "passage_count": Dataset(
        "PassageCount",
        "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please carefully read "
        "these paragraphs and determine how many unique paragraphs there are after removing duplicates. In other "
        "words, how many non-repeating paragraphs are there in total?\n\n{context}\n\nPlease enter the final count of "
        "unique paragraphs after removing duplicates. The output format should only contain the number, such as 1, "
        "2, 3, and so on.\n\nThe final answer is: ",
        32,
    ),
    "repobench-p": Dataset("RepoBench-P", _CODE + "{input}Next line of code:\n", 64, chat=False),
    "qasper": Dataset(
        "Qasper",
        "You are given a scientific article and a question. Answer the question " + _QASPER_RULES + "\n\nArticle: "
        "{context}\n\n Answer the question based on the above article " + _QASPER_RULES + "\n\nQuestion: {input}\n\n"
        "Answer:",
        128,
    ),
    "multifieldqa_en": Dataset(
        "MultiFieldQA-en",
        "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question based on the "
        "above text, only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
        64,
    ),
    "2wikimqa": Dataset("2WikiMQA", _MULTI_DOC_QA, 32),
    "multi_news": Dataset(
        "MultiNews",
        "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\nNow, write "
        "a one-page summary of all the news.\n\nSummary:",
        512,
    ),
    "lcc": Dataset("LCC", _CODE + "Next line of code:\n", 64, chat=False),
}
ORIGINAL_DATASETS = list(DATASETS)[:11]
CHINESE_DATASETS = frozenset({"multifieldqa_zh", "dureader", "vcsum", "lsht", "passage_retrieval_zh"})
CHAT_TEMPLATE_CHOICES = ("auto", True, False)


def check_datasets(names: Iterable[str]) -> list[str]:
    """The dataset names, validated: English LongBench datasets only (the Chinese ones need jieba's segmentation)."""
    names = list(names)
    for name in names:
        if name not in DATASETS:
            why = "is Chinese, not supported" if name in CHINESE_DATASETS else "is not a LongBench dataset"
            raise ValueError(f"task.datasets: {name!r} {why}; choose from {list(DATASETS)}")
    if not names:
        raise ValueError(f"task.datasets is empty; choose from {list(DATASETS)}")
    return names


def _archive_path() -> Path:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(HUB_REPO, HUB_ARCHIVE, repo_type="dataset"))
    except Exception as error:  # offline, blocked or missing: all end with the same instruction
        raise RuntimeError(
            f"cannot fetch {HUB_ARCHIVE} of {HUB_REPO} from the Hugging Face hub ({type(error).__name__}); on an "
            f"offline machine copy {ARCHIVE_URL} there and pass task.path=/path/to/data.zip (or the folder it unzips to)"
        ) from error


def load_records(name: str, path: str | os.PathLike | None = None) -> list[dict]:
    """The records of dataset ``name`` from ``path`` (LongBench's ``data.zip`` or a folder of ``<name>.jsonl``), or
    from the hub's ``data.zip`` when ``path`` is None. Each record is a dict with LongBench's fields (``input``,
    ``context``, ``answers``, ``all_classes``, ``length``, ``_id``, ...)."""
    check_datasets([name])
    source = _archive_path() if path is None else Path(path).expanduser()
    filename = f"{name}.jsonl"
    if source.is_dir():
        file = source / filename
        if not file.is_file():
            raise FileNotFoundError(
                f"task.path={source} has no {filename}; point it at the folder of LongBench's "
                f"<dataset>.jsonl files (the unzipped {ARCHIVE_URL})"
            )
        lines = file.read_text(encoding="utf-8").splitlines()
    elif zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as archive:
            members = [m for m in archive.namelist() if Path(m).name == filename]
            if not members:
                raise FileNotFoundError(f"{source} holds no {filename}; use LongBench's {ARCHIVE_URL}")
            lines = archive.read(members[0]).decode("utf-8").splitlines()
    else:
        raise FileNotFoundError(
            f"task.path={source} is neither a folder nor a zip file; give LongBench's data.zip "
            f"or the folder of <dataset>.jsonl files it unzips to"
        )
    return [json.loads(line) for line in lines if line.strip()]


def use_chat_template(setting: Any, tokenizer, dataset: str) -> bool:
    """Whether this dataset's prompt goes through the chat template: never on LongBench's raw-prompt datasets;
    otherwise per ``task.chat_template`` (auto: when the tokenizer has one; true: required; false: never)."""
    if setting not in CHAT_TEMPLATE_CHOICES:
        raise ValueError(f"task.chat_template={setting!r}; choose one of {CHAT_TEMPLATE_CHOICES}")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if setting is True and not has_template:
        raise ValueError("task.chat_template=true but the tokenizer has no chat template; use auto or false")
    return DATASETS[dataset].chat and has_template and setting is not False


def encode_prompt(tokenizer, prompt: str, chat: bool) -> list[int]:
    """Token ids of the prompt: inside the chat template as one user turn (the template brings its own special
    tokens), or raw with the tokenizer's special tokens (BOS), as LongBench tokenizes it."""
    if chat:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return tokenizer(prompt, verbose=False)["input_ids"]


def middle_truncate(ids: Sequence[int], budget: int) -> list[int]:
    """``ids`` if they fit ``budget``, else the first ``budget - budget // 2`` and the last ``budget // 2`` tokens."""
    if budget < 2:
        raise ValueError(f"middle truncation budget {budget} < 2 tokens; raise ctx above the generation length")
    if len(ids) <= budget:
        return list(ids)
    tail = budget // 2
    return list(ids[: budget - tail]) + list(ids[len(ids) - tail :])


def stop_token_ids(model, tokenizer, stop_at_newline: bool) -> list[int] | None:
    """End-of-sequence ids for ``generate``: the model's own (None), or those plus the newline token."""
    if not stop_at_newline:
        return None
    configured = model.generation_config.eos_token_id
    ids = configured if isinstance(configured, list) else [configured]
    newline = tokenizer.encode("\n", add_special_tokens=False)[-1]
    return [i for i in dict.fromkeys([*ids, tokenizer.eos_token_id, newline]) if i is not None]


@dataclass
class LongBenchConfig:
    """``task=longbench`` (``conf/task/longbench.yaml`` comments every key)."""

    name: str = "longbench"
    datasets: list[str] = field(default_factory=lambda: list(ORIGINAL_DATASETS))
    max_samples: int | None = None  # the first N records of each dataset; None = all
    path: str | None = None  # data.zip or the folder it unzips to; None = fetch data.zip from the hub
    chat_template: Any = "auto"  # auto | true | false
    batch_size: int = 1  # prompts per generate call, grouped by length


class LongBench(Task):
    """The ``longbench`` task: one cell per (ctx, dataset); see the module docstring."""

    name = "longbench"
    schema = LongBenchConfig
    uses_data = False  # reads LongBench from task.path (or the hub), not from the data group

    def check(self, cfg: Any, ctxs: Sequence[int]) -> None:
        """Refuse bad ``task.*`` values before a model is loaded (the tokenizer-dependent checks come in ``measure``)."""
        check_datasets(cfg.datasets)
        if cfg.max_samples is not None and not (isinstance(cfg.max_samples, int) and cfg.max_samples >= 1):
            raise ValueError(f"task.max_samples={cfg.max_samples!r}; use an integer >= 1, or null for every record")
        if cfg.chat_template not in CHAT_TEMPLATE_CHOICES:
            raise ValueError(f"task.chat_template={cfg.chat_template!r}; choose one of {CHAT_TEMPLATE_CHOICES}")
        require_positive("task.batch_size", cfg.batch_size, "task.batch_size=4", integer=True)
        if cfg.path is not None and not Path(cfg.path).expanduser().exists():
            raise ValueError(
                f"task.path={cfg.path} does not exist; give LongBench's data.zip or the folder of "
                f"<dataset>.jsonl files it unzips to, or task.path=null to fetch it from the hub"
            )

    def cells(self, cfg: Any, ctxs: Sequence[int]) -> list[dict]:
        """One cell per (ctx, dataset), after checking ``cfg`` (the ``task`` group)."""
        self.check(cfg, ctxs)
        return [{"ctx": int(ctx), "dataset": dataset} for ctx in ctxs for dataset in cfg.datasets]

    def records(self, env: TaskEnv, dataset: str) -> list[dict]:
        """The dataset's first ``task.max_samples`` records, read once per job."""
        key = ("longbench", dataset, env.cfg.path, env.cfg.max_samples)
        if key not in env.cache:
            records = load_records(dataset, env.cfg.path)
            env.cache[key] = records if env.cfg.max_samples is None else records[: int(env.cfg.max_samples)]
        return env.cache[key]

    def measure(self, env: TaskEnv, cell: dict) -> list[dict]:
        ctx, dataset = int(cell["ctx"]), cell["dataset"]
        spec = DATASETS[check_datasets([dataset])[0]]
        budget = ctx - spec.max_new_tokens
        if budget < 2:
            raise ValueError(
                f"ctx={ctx} leaves no room for a {dataset} prompt after its {spec.max_new_tokens} "
                f"generated tokens; use ctx > {spec.max_new_tokens + 1}"
            )
        records = self.records(env, dataset)
        if not records:
            raise ValueError(f"LongBench {dataset} has no records to score (task.max_samples={env.cfg.max_samples})")
        method = describe(env.model)  # a job may measure several methods (baseline=true) into one predictions file
        chat = use_chat_template(env.cfg.chat_template, env.tokenizer, dataset)
        stop = stop_token_ids(env.model, env.tokenizer, spec.stop_at_newline)
        prompts = [
            encode_prompt(env.tokenizer, spec.template.format(context=r["context"], input=r["input"]), chat)
            for r in records
        ]
        kept = [middle_truncate(ids, budget) for ids in prompts]
        answers = greedy(
            env.model,
            env.tokenizer,
            kept,
            spec.max_new_tokens,
            batch_size=env.cfg.batch_size,
            eos_token_id=stop,
            min_new_tokens=1 if stop is not None else 0,  # LongBench's min_length on SAMSum
            desc=f"longbench {dataset} @ {ctx}",
            progress=env.progress,
        )
        lines = []
        for record, ids, fed, answer in zip(records, prompts, kept, answers, strict=True):
            prediction = env.tokenizer.decode(answer, skip_special_tokens=True)
            lines.append(
                {
                    "ctx": ctx,
                    "dataset": dataset,
                    "method": method,
                    "id": record.get("_id"),
                    "pred": prediction,
                    "answers": record["answers"],
                    "all_classes": record.get("all_classes"),
                    "length": record.get("length"),
                    "prompt_tokens": len(ids),
                    "input_tokens": len(fed),
                    "new_tokens": len(answer),
                    "score": sample_score(dataset, prediction, record["answers"], record.get("all_classes")),
                }
            )
        replace_cell_lines(
            Path(env.out_dir) / "predictions.jsonl", {"ctx": ctx, "dataset": dataset, "method": method}, lines
        )
        return [
            {
                "ctx": ctx,
                "dataset": dataset,
                "score": 100 * sum(line["score"] for line in lines) / len(lines),
                "samples": len(lines),
                "truncated": sum(line["prompt_tokens"] > line["input_tokens"] for line in lines),
            }
        ]

    def brief(self, rows: Sequence[dict]) -> str:
        row = rows[-1]
        return f"{row['dataset']} @ {row['ctx']}: {row['score']:.2f} over {row['samples']} samples ({row['truncated']} cut)"

    def table(self, rows: Sequence[dict]) -> str:
        return longbench_table(rows)


TASK = LongBench()


def _ctx_label(ctx: int) -> str:
    return f"{ctx // 1024}k" if ctx % 1024 == 0 else str(ctx)


def longbench_table(rows: Iterable[dict]) -> str:
    """LongBench scores (x100) as Markdown: one line per setting ("8k, <method>", model first when rows mix
    models), one column per dataset in the original tool's order; lines by model, length, then the stock model first.
    The last row for a (setting, dataset) wins; rows of other tasks are ignored."""
    rows = [row for row in rows if row.get("task", "longbench") == "longbench" and row.get("dataset") in DATASETS]
    models = list(dict.fromkeys(str(row.get("model")) for row in rows))
    scores: dict[tuple, dict[str, float]] = {}
    for row in rows:
        method = str(row["method"])
        key = (models.index(str(row.get("model"))), int(row["ctx"]), method != "none", method)
        scores.setdefault(key, {})[row["dataset"]] = float(row["score"])
    columns = [name for name in DATASETS if any(name in by_dataset for by_dataset in scores.values())]
    lines = [
        f"### LongBench, score x100 (model {', '.join(models)})",
        "",
        "| setting | " + " | ".join(DATASETS[name].title for name in columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for key in sorted(scores):
        setting = f"{models[key[0]]}, " * (len(models) > 1) + f"{_ctx_label(key[1])}, {key[3]}"
        cells = [f"{scores[key][name]:.2f}" if name in scores[key] else "-" for name in columns]
        lines.append(f"| {setting} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
