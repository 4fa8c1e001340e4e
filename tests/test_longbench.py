"""The LongBench task: data loading, prompts, middle truncation, generation, rows, predictions and the table.

The fixture is a few hand-written LongBench-format records per metric family, written by the tests; the model is a
tiny random Llama with a byte-level BPE tokenizer trained here, so nothing is downloaded.
"""

import json
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_model
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

import enhance_long
import enhance_long.config  # noqa: F401  (registers the config schemas and experiments with Hydra)
from enhance_long.tasks import longbench as lb
from enhance_long.tasks.base import TaskEnv
from enhance_long.tasks.longbench_metrics import sample_score

ROOT = Path(__file__).resolve().parents[1]
FILLER = "The committee met again on Tuesday and read the minutes aloud. "


def _record(id_, context, input_, answers, all_classes=None):
    words = len(f"{context} {input_} {' '.join(map(str, answers))}".split())
    return {
        "input": input_,
        "context": context,
        "answers": answers,
        "length": words,
        "dataset": None,
        "language": "en",
        "all_classes": all_classes,
        "_id": id_,
    }


FIXTURE = {
    "hotpotqa": [
        _record(
            "h1",
            "Passage 1:\nFreedonia's capital is Zelbourne.\n" + FILLER * 40,
            "What is Freedonia's capital?",
            ["Zelbourne"],
        ),
        _record("h2", "Passage 1:\nThe river Ost flows north.", "Which way does the Ost flow?", ["north"]),
    ],
    "gov_report": [_record("g1", FILLER * 20, "", ["The committee met on Tuesday. It read the minutes."])],
    "trec": [
        _record(
            "t1",
            "Question: Where is Zelbourne?\nType: Location\n",
            "Question: When did Ost freeze?\nType:",
            ["Date"],
            ["Location", "Date", "Other location"],
        ),
    ],
    "samsum": [
        _record("s1", "Dialogue: Ann: hi\nSummary: Ann greets.\n", "Dialogue: Bob: bye\nSummary:", ["Bob says bye."]),
    ],
    "passage_retrieval_en": [
        _record("r1", "Paragraph 1: Zelbourne.\n\nParagraph 2: The Ost.", "A river flowing north.", ["Paragraph 2"]),
    ],
    "passage_count": [_record("c1", "Paragraph 1: a.\n\nParagraph 2: a.\n\nParagraph 3: b.", "", [2])],
    "repobench-p": [
        _record("p1", "# utils.py\ndef add(a, b):\n    return a + b\n", "def total(a, b):\n", ["    return add(a, b)"]),
    ],
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("longbench") / "data"
    folder.mkdir()
    for name, records in FIXTURE.items():
        lines = [json.dumps({**record, "dataset": name}) for record in records]
        (folder / f"{name}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<s>", "</s>", "<pad>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    texts = [record["context"] + record["input"] for records in FIXTURE.values() for record in records]
    bpe.train_from_iterator(texts + [spec.template for spec in lb.DATASETS.values()], trainer)
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


@pytest.fixture(scope="module")
def chat_tokenizer(tokenizer) -> PreTrainedTokenizerFast:
    chat = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer.backend_tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    chat.chat_template = "{% for m in messages %}<s>[INST] {{ m['content'] }} [/INST]{% endfor %}"
    return chat


def tiny_llama(tokenizer, train_len: int = 64):
    """conftest's tiny Llama, speaking this byte-level tokenizer (its vocabulary and special ids)."""
    return tiny_model(
        vocab_size=len(tokenizer), max_position_embeddings=train_len, bos_token_id=0, eos_token_id=1, pad_token_id=2
    )


def task_cfg(path, datasets=("hotpotqa",), **overrides):
    return OmegaConf.merge(
        OmegaConf.structured(lb.LongBenchConfig),
        {
            "name": "longbench",
            "datasets": list(datasets),
            "max_samples": None,
            "path": str(path),
            "chat_template": "auto",
            **overrides,
        },
    )


def make_env(model, tokenizer, cfg, out_dir) -> TaskEnv:
    return TaskEnv(model=model, tokenizer=tokenizer, cfg=cfg, data_cfg=None, out_dir=out_dir, progress=False)


def read_predictions(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "predictions.jsonl").read_text().splitlines()]


class ScriptedModel:
    """Stands in for a causal LM: each ``generate`` call appends the next scripted text and records its kwargs."""

    def __init__(self, tokenizer, outputs):
        self.tokenizer, self.outputs, self.calls = tokenizer, list(outputs), []
        self.device = torch.device("cpu")
        self.generation_config = SimpleNamespace(eos_token_id=1, pad_token_id=2)

    def generate(self, input_ids, **kwargs):
        """The next scripted text, cut after its first stop id as ``generate`` stops there, then the EOS id 1."""
        self.calls.append({"input_ids": input_ids[0].tolist(), **kwargs})
        new = self.tokenizer(self.outputs.pop(0), add_special_tokens=False)["input_ids"] + [1]
        stops = kwargs.get("eos_token_id") or [1]
        new = new[: next(i for i, token in enumerate(new) if token in stops) + 1]
        return torch.cat([input_ids, torch.tensor([new])], dim=1)


# --- data and configuration ---------------------------------------------------------------------------------------


def test_task_config_lists_the_original_tools_datasets():
    cfg = OmegaConf.load(ROOT / "conf/task/longbench.yaml")
    assert cfg.name == lb.TASK.name == "longbench"
    assert list(cfg.datasets) == lb.ORIGINAL_DATASETS
    assert [lb.DATASETS[name].title for name in lb.ORIGINAL_DATASETS] == [
        "HotpotQA",
        "MuSiQue",
        "NarrativeQA",
        "GovReport",
        "QMSum",
        "TriviaQA",
        "SAMSum",
        "TREC",
        "PassageRetrieval-en",
        "PassageCount",
        "RepoBench-P",
    ]
    assert (cfg.max_samples, cfg.path, cfg.chat_template) == (None, None, "auto")


def test_original_experiment_composes_to_the_original_comparison():
    from enhance_long.runner import prepare_job

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            config_name="config", overrides=["experiment=original_longbench", "ctx=8192"], return_hydra_config=True
        )
    assert (cfg.model.name, cfg.task.name, cfg.rope.alpha, cfg.hydra.sweeper.params.ctx) == (
        "llama2_7b_chat",
        "longbench",
        2.0,
        "4096,8192,16384,32768",
    )
    job = prepare_job(cfg)
    assert [variant.label for variant in job.variants] == [
        "none",
        "consistent_ntk(alpha=2,bucket=1,schedule=per_forward)+logn",  # the original tool's own schedule
    ]
    assert [item.cell for item in job.work[:11]] == [{"ctx": 8192, "dataset": name} for name in lb.ORIGINAL_DATASETS]


def test_cells_are_ctx_by_dataset_and_refuse_chinese(data_dir):
    cells = lb.TASK.cells(task_cfg(data_dir, ["hotpotqa", "trec"]), [4096, 8192])
    assert cells == [
        {"ctx": 4096, "dataset": "hotpotqa"},
        {"ctx": 4096, "dataset": "trec"},
        {"ctx": 8192, "dataset": "hotpotqa"},
        {"ctx": 8192, "dataset": "trec"},
    ]
    with pytest.raises(ValueError, match=r"'lsht' is Chinese, not supported; choose from \['hotpotqa'") as error:
        lb.TASK.cells(task_cfg(data_dir, ["hotpotqa", "lsht"]), [4096])
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="'squad' is not a LongBench dataset"):
        lb.check_datasets(["squad"])
    with pytest.raises(ValueError, match="task.datasets is empty"):
        lb.check_datasets([])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"max_samples": 0}, r"task.max_samples=0; use an integer >= 1, or null for every record"),
        ({"chat_template": "yes"}, r"task.chat_template='yes'; choose one of \('auto', True, False\)"),
        ({"path": "/nowhere/data.zip"}, r"task.path=/nowhere/data.zip does not exist; give LongBench's data.zip"),
    ],
)
def test_cells_refuse_bad_settings_before_a_model_loads(data_dir, override, message):
    with pytest.raises(ValueError, match=message) as error:
        settings = dict(override)
        lb.TASK.cells(task_cfg(settings.pop("path", data_dir), **settings), [4096])
    assert "\n" not in str(error.value)


def test_records_load_from_a_folder_or_from_data_zip(data_dir, tmp_path):
    archive = tmp_path / "data.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        for file in data_dir.iterdir():
            zipped.write(file, f"data/{file.name}")  # LongBench's data.zip layout
    from_folder = lb.load_records("trec", data_dir)
    assert from_folder == [{**FIXTURE["trec"][0], "dataset": "trec"}]
    assert lb.load_records("trec", archive) == from_folder
    with pytest.raises(FileNotFoundError, match=r"has no qmsum\.jsonl; point it at the folder"):
        lb.load_records("qmsum", data_dir)
    with pytest.raises(FileNotFoundError, match=r"holds no qmsum\.jsonl"):
        lb.load_records("qmsum", archive)
    with pytest.raises(FileNotFoundError, match="neither a folder nor a zip file"):
        lb.load_records("trec", data_dir / "trec.jsonl")


def test_max_samples_keeps_the_first_records(data_dir, tokenizer, tmp_path):
    env = make_env(None, tokenizer, task_cfg(data_dir, max_samples=1), tmp_path)
    assert [record["_id"] for record in lb.TASK.records(env, "hotpotqa")] == ["h1"]


# --- prompts and truncation ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("budget", "kept"),
    [
        (4, [0, 1, 8, 9]),
        (5, [0, 1, 2, 8, 9]),
        (9, [0, 1, 2, 3, 4, 6, 7, 8, 9]),
        (10, list(range(10))),
        (12, list(range(10))),
    ],
)
def test_middle_truncate_keeps_head_and_tail(budget, kept):
    assert lb.middle_truncate(list(range(10)), budget) == kept


def test_middle_truncate_rejects_a_budget_below_two():
    with pytest.raises(ValueError, match="budget 1 < 2 tokens"):
        lb.middle_truncate([1, 2, 3], 1)


def test_prompts_get_the_chat_template_except_on_raw_datasets(tokenizer, chat_tokenizer):
    assert (
        lb.encode_prompt(tokenizer, "hi there", chat=False)
        == [0] + tokenizer("hi there", add_special_tokens=False)["input_ids"]
    )
    wrapped = chat_tokenizer("<s>[INST] hi there [/INST]", add_special_tokens=False)["input_ids"]
    assert lb.encode_prompt(chat_tokenizer, "hi there", chat=True) == wrapped
    assert wrapped.count(0) == 1  # the template's BOS only
    assert lb.use_chat_template("auto", chat_tokenizer, "hotpotqa") is True
    for raw in ("trec", "triviaqa", "samsum", "repobench-p", "lcc"):
        assert lb.use_chat_template("auto", chat_tokenizer, raw) is False
    assert lb.use_chat_template(False, chat_tokenizer, "hotpotqa") is False
    assert lb.use_chat_template("auto", tokenizer, "hotpotqa") is False
    with pytest.raises(ValueError, match="task.chat_template=true but the tokenizer has no chat template"):
        lb.use_chat_template(True, tokenizer, "hotpotqa")
    with pytest.raises(ValueError, match=r"task.chat_template='yes'; choose one of \('auto', True, False\)"):
        lb.use_chat_template("yes", tokenizer, "hotpotqa")


def test_measure_truncates_the_wrapped_prompt_to_ctx_minus_generation(data_dir, chat_tokenizer, tmp_path):
    ctx = 300  # the short record's prompt (222 tokens) fits, the long one (713) does not
    model = ScriptedModel(chat_tokenizer, ["Zelbourne", "north"])
    env = make_env(model, chat_tokenizer, task_cfg(data_dir), tmp_path)
    [row] = lb.TASK.measure(env, {"ctx": ctx, "dataset": "hotpotqa"})
    budget = ctx - lb.DATASETS["hotpotqa"].max_new_tokens
    long_record, short_record = FIXTURE["hotpotqa"]
    full = lb.encode_prompt(chat_tokenizer, lb.DATASETS["hotpotqa"].template.format(**long_record), chat=True)
    assert len(full) > budget
    assert model.calls[0]["input_ids"] == full[: budget - budget // 2] + full[-(budget // 2) :]
    assert len(model.calls[0]["input_ids"]) == budget
    short = lb.encode_prompt(chat_tokenizer, lb.DATASETS["hotpotqa"].template.format(**short_record), chat=True)
    assert model.calls[1]["input_ids"] == short
    assert [call["max_new_tokens"] for call in model.calls] == [32, 32]
    assert all(call["do_sample"] is False and call["use_cache"] is True for call in model.calls)
    assert row == {"ctx": ctx, "dataset": "hotpotqa", "score": 100.0, "samples": 2, "truncated": 1}
    lines = read_predictions(tmp_path)
    assert [(line["id"], line["prompt_tokens"], line["input_tokens"]) for line in lines] == [
        ("h1", len(full), budget),
        ("h2", len(short), len(short)),
    ]


def test_measure_rejects_a_ctx_without_room_for_the_prompt(data_dir, tokenizer, tmp_path):
    env = make_env(ScriptedModel(tokenizer, []), tokenizer, task_cfg(data_dir, ["gov_report"]), tmp_path)
    with pytest.raises(ValueError, match=r"ctx=512 leaves no room .* use ctx > 513"):
        lb.TASK.measure(env, {"ctx": 512, "dataset": "gov_report"})


# --- scoring through the task -------------------------------------------------------------------------------------

# (dataset, what the scripted model says, expected score x100)
SCRIPTS = [
    ("gov_report", "The committee met on Tuesday. It read the minutes.", 100 * 2 * (1 / (2 + 1e-8))),
    ("trec", "Date\nQuestion: What is Ost?\nType: Other", 100.0),  # first line only
    ("samsum", "Bob says bye.\nDialogue: Ann: hi", 100 * 2 * (1 / (2 + 1e-8))),
    ("passage_retrieval_en", "Paragraph 2", 100.0),
    ("passage_count", "2", 100.0),
    ("repobench-p", "\n# call the helper\n    return add(a, b)\n", 100.0),
    ("trec", "Location", 0.0),
    ("passage_count", "3", 0.0),
]


@pytest.mark.parametrize(("dataset", "output", "expected"), SCRIPTS)
def test_measure_scores_each_metric_family(dataset, output, expected, data_dir, chat_tokenizer, tmp_path):
    model = ScriptedModel(chat_tokenizer, [output])
    env = make_env(model, chat_tokenizer, task_cfg(data_dir, [dataset]), tmp_path)
    [row] = lb.TASK.measure(env, {"ctx": 4096, "dataset": dataset})
    assert row["score"] == pytest.approx(expected, abs=1e-9)
    [line] = read_predictions(tmp_path)
    said = output[: output.index("\n") + 1] if lb.DATASETS[dataset].stop_at_newline else output  # samsum stops
    assert line["pred"] == said and line["score"] == pytest.approx(expected / 100, abs=1e-11)
    record = FIXTURE[dataset][0]
    prompt = lb.DATASETS[dataset].template.format(**record)
    assert model.calls[0]["input_ids"] == lb.encode_prompt(chat_tokenizer, prompt, chat=lb.DATASETS[dataset].chat)


def test_samsum_stops_at_a_newline_after_one_token(data_dir, tokenizer, tmp_path):
    model = ScriptedModel(tokenizer, ["Bob says bye.", "Zelbourne", "north"])
    lb.TASK.measure(
        make_env(model, tokenizer, task_cfg(data_dir, ["samsum"]), tmp_path), {"ctx": 512, "dataset": "samsum"}
    )
    newline = tokenizer.encode("\n", add_special_tokens=False)[-1]
    assert model.calls[0]["eos_token_id"] == [1, newline] and model.calls[0]["min_new_tokens"] == 1
    assert model.calls[0]["max_new_tokens"] == 128
    lb.TASK.measure(make_env(model, tokenizer, task_cfg(data_dir), tmp_path), {"ctx": 512, "dataset": "hotpotqa"})
    assert "eos_token_id" not in model.calls[1]


def test_predictions_replace_a_remeasured_cell_and_keep_the_others(data_dir, tokenizer, tmp_path):
    env = make_env(
        ScriptedModel(tokenizer, ["a", "b", "Date", "c", "d"]),
        tokenizer,
        task_cfg(data_dir, ["hotpotqa", "trec"]),
        tmp_path,
    )
    lb.TASK.measure(env, {"ctx": 512, "dataset": "hotpotqa"})
    lb.TASK.measure(env, {"ctx": 512, "dataset": "trec"})
    lb.TASK.measure(env, {"ctx": 512, "dataset": "hotpotqa"})
    lines = read_predictions(tmp_path)
    assert [(line["dataset"], line["pred"]) for line in lines] == [
        ("trec", "Date"),
        ("hotpotqa", "c"),
        ("hotpotqa", "d"),
    ]
    assert not (tmp_path / "predictions.jsonl.tmp").exists()


# --- a real (tiny, random) model ------------------------------------------------------------------------------------


def test_end_to_end_on_a_patched_tiny_llama(data_dir, tokenizer, tmp_path):
    model = enhance_long.apply(tiny_llama(tokenizer, train_len=64), rope="consistent_ntk", logn=True)
    datasets = list(FIXTURE)
    cfg = task_cfg(data_dir, datasets)
    env = make_env(model, tokenizer, cfg, tmp_path)
    rows = [row for cell in lb.TASK.cells(cfg, [600]) for row in lb.TASK.measure(env, cell)]
    assert [(row["ctx"], row["dataset"], row["samples"]) for row in rows] == [
        (600, name, len(FIXTURE[name])) for name in datasets
    ]
    lines = read_predictions(tmp_path)
    assert len(lines) == sum(len(records) for records in FIXTURE.values())
    for row in rows:
        mine = [line for line in lines if line["dataset"] == row["dataset"]]
        budget = 600 - lb.DATASETS[row["dataset"]].max_new_tokens
        assert all(line["input_tokens"] == min(line["prompt_tokens"], budget) for line in mine)
        assert row["truncated"] == sum(line["prompt_tokens"] > budget for line in mine)
        rescored = [sample_score(row["dataset"], line["pred"], line["answers"], line["all_classes"]) for line in mine]
        assert row["score"] == pytest.approx(100 * sum(rescored) / len(rescored))
        assert all(1 <= line["new_tokens"] <= lb.DATASETS[row["dataset"]].max_new_tokens for line in mine)
    assert sum(row["truncated"] for row in rows) >= 2  # the long hotpotqa record and gov_report at budget 88


def test_batches_of_prompts_of_different_lengths_give_the_same_predictions_as_one_at_a_time(
    data_dir, tokenizer, tmp_path
):
    model = enhance_long.apply(tiny_llama(tokenizer, train_len=64), rope="consistent_ntk", logn=True, bucket=8)
    predictions = []
    for batch_size, folder in ((1, tmp_path / "one"), (3, tmp_path / "three")):
        folder.mkdir()
        env = make_env(model, tokenizer, task_cfg(data_dir, list(FIXTURE), batch_size=batch_size), folder)
        rows = [row for cell in lb.TASK.cells(env.cfg, [600]) for row in lb.TASK.measure(env, cell)]
        predictions.append((rows, [(line["pred"], line["new_tokens"]) for line in read_predictions(folder)]))
    assert predictions[0] == predictions[1]


def test_predictions_of_the_stock_and_the_patched_model_are_kept_apart(data_dir, tokenizer, tmp_path):
    model = tiny_llama(tokenizer)
    env = make_env(model, tokenizer, task_cfg(data_dir), tmp_path)
    cell = {"ctx": 512, "dataset": "hotpotqa"}
    lb.TASK.measure(env, cell)
    enhance_long.apply(model, rope="consistent_ntk", logn=True)
    lb.TASK.measure(env, cell)
    lb.TASK.measure(env, cell)
    methods = [line["method"] and line["method"]["rope"] for line in read_predictions(tmp_path)]
    assert methods == [None, None, "consistent_ntk", "consistent_ntk"]


# --- the table ----------------------------------------------------------------------------------------------------


def test_longbench_table_lays_out_settings_by_dataset():
    enhanced = {"method": "consistent_ntk(alpha=2)+logn", "rope": "consistent_ntk", "alpha": 2.0, "logn": True}
    stock = {"method": "none", "rope": "none", "alpha": None, "logn": False}
    rows = [
        {"ctx": 8192, "dataset": "trec", "score": 63.0, **enhanced},
        {"ctx": 4096, "dataset": "hotpotqa", "score": 23.52, **stock},
        {"ctx": 8192, "dataset": "hotpotqa", "score": 0.864, **stock},
        {"ctx": 8192, "dataset": "hotpotqa", "score": 28.6449, **enhanced},
        {"ctx": 4096, "dataset": "trec", "score": 55.0, **stock},
        {"ctx": 4096, "dataset": "trec", "score": 56.0, **stock},  # a rerun: the last row wins
        {"ctx": 4096, "doc": "all", "ppl": 5.0, "task": "perplexity"},
    ]
    assert (
        lb.longbench_table(rows)
        == "\n".join(
            [
                "### LongBench, score x100 (model None)",
                "",
                "| setting | HotpotQA | TREC |",
                "|---|---|---|",
                "| 4k, none | 23.52 | 56.00 |",
                "| 8k, none | 0.86 | - |",
                "| 8k, consistent_ntk(alpha=2)+logn | 28.64 | 63.00 |",
            ]
        )
        + "\n"
    )


def test_longbench_table_uses_the_runner_labels_and_names_models_when_mixed():
    rows = [
        {
            "ctx": 4096,
            "dataset": "qmsum",
            "score": 19.38,
            "model": "llama2_7b_chat",
            "method": "none",
            "task": "longbench",
        },
        {"ctx": 4096, "dataset": "qmsum", "score": 20.5, "model": "smollm2_135m", "method": "ntk(alpha=2)"},
    ]
    assert lb.longbench_table(rows).splitlines()[0] == "### LongBench, score x100 (model llama2_7b_chat, smollm2_135m)"
    assert lb.longbench_table(rows).splitlines()[4:] == [
        "| llama2_7b_chat, 4k, none | 19.38 |",
        "| smollm2_135m, 4k, ntk(alpha=2) | 20.50 |",
    ]


# --- the embedded model ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_samples_on_smollm2(data_dir, tmp_path):
    from enhance_long.models import load_model

    model, tokenizer = load_model({"name": "smollm2_135m", "path": None}, attention="sdpa")
    enhance_long.apply(model, rope="consistent_ntk", logn=True)
    cfg = task_cfg(data_dir, ["hotpotqa"])
    env = make_env(model, tokenizer, cfg, tmp_path)
    [row] = lb.TASK.measure(env, {"ctx": 256, "dataset": "hotpotqa"})
    assert (row["samples"], row["truncated"]) == (2, 1)
    lines = read_predictions(tmp_path)
    assert [line["input_tokens"] for line in lines] == [224, lines[1]["prompt_tokens"]]
    assert all(line["pred"].strip() for line in lines)
    assert "north" in lines[1]["pred"]  # greedy SmolLM2 reads the untruncated passage through the chat template
    assert row["score"] == pytest.approx(50 * (lines[0]["score"] + lines[1]["score"]))
