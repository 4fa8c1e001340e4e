"""The lm-evaluation-harness bridge (task=lm_eval): the harness's own scores through the (patched) model, nothing cut.

The oracle is the harness itself: ``lm_eval.simple_evaluate`` on ``HFLM`` wrapping the same tiny random model. The
tasks are local: YAMLs and a JSONL written here (a ``generate_until`` task scored by exact match, a multiple-choice
``loglikelihood`` task scored by accuracy, and a group of both), so nothing is downloaded.
"""

import json
import re
from pathlib import Path

import datasets.config
import huggingface_hub.constants
import pytest
import torch
from conftest import tiny_model
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import enhance_long
import enhance_long.models
from enhance_long.report import tables
from enhance_long.results import RESULTS, read_rows
from enhance_long.runner import run
from enhance_long.tasks import get_task
from enhance_long.tasks import harness as bridge
from enhance_long.tasks.base import TaskEnv

pytest.importorskip("lm_eval")  # the bridge's own module imports it only when a cell runs

ROOT = Path(__file__).resolve().parents[1]
CTX = 512  # every request fits; the long document needs ~430 tokens
SHORT_CTX = 256  # the long document's requests do not fit
LONG_QUESTION = "After the long meeting, which the committee recorded word for word, " * 6 + "the capital is"
DOCS = [
    {"question": "The capital of Freedonia is", "answer": "Zelbourne", "choices": ["Zelbourne", "Ost", "Rome", "Lyon"]},
    {"question": "The river Ost flows", "answer": "north", "choices": ["south", "north", "east", "west"]},
    {"question": "Two plus two is", "answer": "four", "choices": ["three", "five", "four", "six"]},
    {"question": "The sky is", "answer": "blue", "choices": ["green", "red", "yellow", "blue"]},
    {"question": LONG_QUESTION, "answer": "Zelbourne", "choices": ["Ost", "Zelbourne", "Lyon", "Rome"]},
]
GEN_YAML = """
task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
MC_YAML = """
task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{choices.index(answer)}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
GROUP_YAML = """
group: tiny_group
task: [tiny_gen, tiny_mc]
aggregate_metric_list:
  - metric: acc
    weight_by_size: true
metadata:
  version: 1.0
"""
HUB_YAML = """
task: tiny_hub
dataset_path: enhance-long-tests/not-on-this-machine
test_split: test
output_type: generate_until
doc_to_text: "{{question}}"
doc_to_target: "{{answer}}"
metric_list:
  - metric: exact_match
"""


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """The hub is off for every test here, as on a cluster node with HF_HUB_OFFLINE=1 (read at import, so patched)."""
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("lm_eval_tasks")
    data = folder / "docs.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in DOCS), encoding="utf-8")
    for name, text in {"tiny_gen": GEN_YAML, "tiny_mc": MC_YAML, "tiny_group": GROUP_YAML}.items():
        (folder / f"{name}.yaml").write_text(text.format(data=data), encoding="utf-8")
    return folder


@pytest.fixture
def model(tokenizer):
    """A tiny random Llama trained (nominally) on 64 tokens, speaking the byte tokenizer."""
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    return tiny_model(vocab_size=len(tokenizer), max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id, **ids)


def task_cfg(tasks_dir, tasks=("tiny_group",), **overrides):
    cfg = OmegaConf.structured(bridge.LmEvalConfig)
    settings = {"tasks": list(tasks), "include_path": tasks_dir and str(tasks_dir), "include_defaults": False}
    return OmegaConf.merge(cfg, {**settings, **overrides})


def make_env(model, tokenizer, cfg, out_dir) -> TaskEnv:
    return TaskEnv(model=model, tokenizer=tokenizer, cfg=cfg, data_cfg=None, out_dir=out_dir, progress=False)


def measure(model, tokenizer, cfg, out_dir, ctx=CTX, name=None):
    [cell] = [cell for cell in bridge.TASK.cells(cfg, [ctx]) if name in (None, cell["harness_task"])]
    return bridge.TASK.measure(make_env(model, tokenizer, cfg, out_dir), cell)


def harness_run(model, tokenizer, tasks_dir, name, ctx=CTX):
    """lm-eval's own run: HFLM on the model object with max_length=ctx, the harness's defaults otherwise."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tokenizer, max_length=ctx, batch_size=1, backend="causal")
    manager = TaskManager(include_path=str(tasks_dir), include_defaults=False)
    return simple_evaluate(model=lm, tasks=[name], task_manager=manager, log_samples=True)


def read_samples(out_dir: Path, name: str, ctx: int) -> list[dict]:
    path = out_dir / bridge.SAMPLES_DIR / f"{name}_{ctx}.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def assert_rows_are_the_harness_results(rows, expected):
    """Every metric (and stderr) of the harness's results is one row with its value, and nothing else is."""
    metrics = {
        (subtask, *key.split(",")): value
        for subtask, values in expected["results"].items()
        for key, value in values.items()
        if "," in key and "_stderr," not in key
    }
    assert {(row["subtask"], row["metric"], row["filter"]): row["value"] for row in rows} == metrics
    for row in rows:
        stderr = expected["results"][row["subtask"]][f"{row['metric']}_stderr,{row['filter']}"]
        assert row["stderr"] == (stderr if isinstance(stderr, float) else None)


def resps_by_doc(samples):
    return {(sample["subtask"], sample["doc_id"], sample["filter"]): sample["resps"] for sample in samples}


# --- configuration ----------------------------------------------------------------------------------------------------


def test_config_composes_with_every_knob_and_a_fixed_batch():
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["task=lm_eval", "task.tasks=[ruler]"])
        assert (cfg.task.name, list(cfg.task.tasks), cfg.task.batch_size) == ("lm_eval", ["ruler"], 1)
        assert (cfg.task.on_overflow, cfg.task.apply_chat_template, cfg.task.limit) == ("refuse", False, None)
        assert dict(cfg.task.metadata) == {"max_seq_lengths": None, "tokenizer": None}
        yaml_keys = set(OmegaConf.load(ROOT / "conf/task/lm_eval.yaml")) - {"defaults"}
        assert yaml_keys == set(OmegaConf.structured(bridge.LmEvalConfig))
        with pytest.raises(Exception, match="task.batch_size=auto"):
            compose(config_name="config", overrides=["task=lm_eval", "task.tasks=[ruler]", "task.batch_size=auto"])
    assert get_task("lm_eval") is bridge.TASK and bridge.TASK.uses_data is False


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"tasks": []}, r"task.tasks is empty; name harness tasks, groups or tags, e.g. 'task.tasks=\[ruler\]'"),
        ({"tasks": ["tiny_gen", "tiny_gen"]}, r"task.tasks names \['tiny_gen'\] twice"),
        (
            {"tasks": ["tiny_gn"]},
            r"task.tasks has 'tiny_gn', which lm-eval [\d.]+ does not know in .*; close: tiny_gen",
        ),
        ({"on_overflow": "cut"}, r"task.on_overflow=cut; choose one of refuse, truncate"),
        ({"batch_size": 0}, r"task.batch_size=0; use a fixed batch of >= 1 sequences"),
        ({"num_fewshot": -1}, r"task.num_fewshot=-1; use >= 0, or null"),
        ({"limit": 1.5}, r"task.limit=1.5; use a whole number of documents >= 1, a fraction in \(0, 1\), or null"),
        ({"limit": 0}, r"task.limit=0; use a whole number"),
        ({"include_path": "/nowhere/tasks"}, r"task.include_path=/nowhere/tasks is not a folder"),
        ({"include_path": None}, r"task.include_defaults=false indexes only task.include_path, which is not set"),
        ({"tasks": ["babilong_qa1"]}, r"babilong_qa1 reads task.metadata.max_seq_lengths as one of its datasets \(0k"),
    ],
)
def test_bad_settings_are_refused_in_one_line_before_a_model_loads(tasks_dir, overrides, message):
    with pytest.raises(ValueError, match=message) as error:
        bridge.TASK.cells(task_cfg(tasks_dir, **overrides), [CTX])
    assert "\n" not in str(error.value)


def test_without_the_package_the_error_says_how_to_install_it(tasks_dir, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "lm_eval", None)
    with pytest.raises(ValueError, match=r'not installed; pip install "enhance-long\[lm_eval\]"'):
        bridge.TASK.cells(task_cfg(tasks_dir), [CTX])


def test_cells_are_ctx_by_requested_name_a_group_is_one_cell(tasks_dir):
    import lm_eval

    cells = bridge.TASK.cells(task_cfg(tasks_dir, ["tiny_group", "tiny_mc"]), [256, 512])
    assert cells == [
        {"ctx": ctx, "harness_task": name, "lm_eval": lm_eval.__version__}
        for ctx in (256, 512)
        for name in ("tiny_group", "tiny_mc")
    ]


def test_metadata_fills_rulers_lengths_and_tokenizer_unless_given(tasks_dir, tokenizer, tmp_path):
    filled = bridge.harness_metadata(task_cfg(tasks_dir), 8192, tokenizer, str(tmp_path))
    assert filled == {"max_seq_lengths": [8192], "tokenizer": str(tmp_path)}
    assert (tmp_path / "tokenizer.json").exists()
    given = {"max_seq_lengths": "4k", "tokenizer": "meta-llama/Llama-2-7b-hf", "extra": 1}
    assert bridge.harness_metadata(task_cfg(tasks_dir, metadata=given), 8192, tokenizer, str(tmp_path)) == given


# --- the harness's own scores ---------------------------------------------------------------------------------------


def test_scores_equal_the_harness_own_run_and_nothing_is_cut(model, tokenizer, tasks_dir, tmp_path):
    expected = harness_run(model, tokenizer, tasks_dir, "tiny_group")
    dtype = model.dtype
    enhance_long.apply(model, rope="none", logn=False)  # what the runner does for rope=none logn=off
    rows = measure(model, tokenizer, task_cfg(tasks_dir), tmp_path)
    assert_rows_are_the_harness_results(rows, expected)
    assert {row["subtask"] for row in rows} == {"tiny_gen", "tiny_mc", "tiny_group"}
    assert {(row["subtask"], row["samples"]) for row in rows} == {("tiny_gen", 5), ("tiny_mc", 5), ("tiny_group", 10)}
    assert all(row["truncated"] == 0 and row["ctx"] == CTX and row["harness_task"] == "tiny_group" for row in rows)
    samples = read_samples(tmp_path, "tiny_group", CTX)
    assert resps_by_doc(samples) == {  # every generated text and log-probability, as the harness logs them
        (subtask, sample["doc_id"], sample["filter"]): bridge.json_able(sample["resps"])
        for subtask, logged in expected["samples"].items()
        for sample in logged
    }
    assert all(sample["request_tokens"] <= CTX and sample["truncated"] is False for sample in samples)
    assert max(sample["request_tokens"] for sample in samples) > 400  # the long document is really there
    assert {sample["method"]["rope"] for sample in samples} == {"none"}
    assert model.dtype == dtype


def test_the_wrapper_keeps_the_model_and_takes_ctx_not_the_config_length(model, tokenizer):
    lm = bridge.guarded_lm_class()(model, tokenizer, CTX, 1, "refuse")
    assert lm.model is model and lm.tokenizer is tokenizer and model.config.max_position_embeddings == 64
    assert (lm.max_length, lm.batch_size, lm.backend) == (CTX, 1, "causal")


def test_the_patched_model_goes_through_unchanged(model, tokenizer, tasks_dir, tmp_path):
    enhance_long.apply(model, rope="consistent_ntk", logn=True)  # trained on 64 tokens, prompts up to ~430
    expected = harness_run(model, tokenizer, tasks_dir, "tiny_group")
    rows = measure(model, tokenizer, task_cfg(tasks_dir), tmp_path)
    assert_rows_are_the_harness_results(rows, expected)
    samples = read_samples(tmp_path, "tiny_group", CTX)
    assert {sample["method"]["rope"] for sample in samples} == {"consistent_ntk"}
    enhance_long.remove(model)
    measure(model, tokenizer, task_cfg(tasks_dir), tmp_path)  # the stock model's lines join the file, apart
    methods = [sample["method"] and sample["method"]["rope"] for sample in read_samples(tmp_path, "tiny_group", CTX)]
    assert methods == ["consistent_ntk"] * len(samples) + [None] * len(samples)


# --- requests longer than ctx ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("tiny_gen", r"lm-eval task tiny_gen: 1 of 5 generate_until requests need more than ctx=256 tokens \(up to 4"),
        ("tiny_mc", r"lm-eval task tiny_mc: 4 of 20 loglikelihood requests need more than ctx=256 tokens \(up to 4"),
    ],
)
def test_a_request_longer_than_ctx_is_refused_before_it_runs(model, tokenizer, tasks_dir, tmp_path, name, message):
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    with pytest.raises(ValueError, match=message) as error:
        measure(model, tokenizer, task_cfg(tasks_dir, [name]), tmp_path, ctx=SHORT_CTX)
    assert "\n" not in str(error.value) and "task.on_overflow=truncate" in str(error.value)
    assert calls == []  # refused before any forward
    assert not (tmp_path / bridge.SAMPLES_DIR / f"{name}_{SHORT_CTX}.jsonl").exists()


def test_truncate_lets_the_harness_cut_and_counts_it(model, tokenizer, tasks_dir, tmp_path):
    expected = harness_run(model, tokenizer, tasks_dir, "tiny_group", ctx=SHORT_CTX)  # the harness cuts, warning only
    rows = measure(model, tokenizer, task_cfg(tasks_dir, on_overflow="truncate"), tmp_path, ctx=SHORT_CTX)
    assert_rows_are_the_harness_results(rows, expected)
    assert {(row["subtask"], row["truncated"]) for row in rows} == {("tiny_gen", 1), ("tiny_mc", 1), ("tiny_group", 2)}
    samples = read_samples(tmp_path, "tiny_group", SHORT_CTX)
    assert {(sample["subtask"], sample["doc_id"]) for sample in samples if sample["truncated"]} == {
        ("tiny_gen", 4),
        ("tiny_mc", 4),
    }


def test_a_generation_budget_of_ctx_or_more_is_refused(model, tokenizer, tasks_dir, tmp_path):
    with pytest.raises(ValueError, match=r"lm-eval task tiny_gen generates up to 8 tokens, .* use ctx > 8"):
        measure(model, tokenizer, task_cfg(tasks_dir, ["tiny_gen"]), tmp_path, ctx=8)


# --- the network ------------------------------------------------------------------------------------------------------


def test_a_hub_dataset_with_the_hub_offline_is_one_line(model, tokenizer, tasks_dir, tmp_path):
    hub_tasks = tmp_path / "hub_tasks"
    hub_tasks.mkdir()
    (hub_tasks / "tiny_hub.yaml").write_text(HUB_YAML, encoding="utf-8")
    with pytest.raises(RuntimeError) as error:
        measure(model, tokenizer, task_cfg(hub_tasks, ["tiny_hub"]), tmp_path)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("lm-eval task tiny_hub needs the network (ConnectionError: Couldn't reach")
    assert (
        "enhance-long-tests/not-on-this-machine" in message and "HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set" in message
    )
    assert "task.include_path" in message


def test_a_harness_task_offline_is_refused_and_runs_from_a_local_copy(model, tokenizer, tmp_path):
    """The README's recipe: a YAML that includes the harness's own and points it at local files, under its name."""
    import lm_eval

    builtin = Path(lm_eval.__file__).parent / "tasks" / "longbench" / "hotpotqa.yaml"
    with pytest.raises(
        RuntimeError, match=r"^lm-eval task longbench_hotpotqa needs the network .*Xnhyacinth/LongBench"
    ):
        measure(model, tokenizer, task_cfg(None, ["longbench_hotpotqa"], include_defaults=True), tmp_path)
    copy = tmp_path / "local_tasks"
    copy.mkdir()
    records = [
        {
            "context": "Passage 1:\nFreedonia's capital is Zelbourne.",
            "question": "Freedonia's capital?",
            "answers": ["Zelbourne"],
        },
        {
            "context": "Passage 1:\nThe river Ost flows north.",
            "question": "Which way does the Ost flow?",
            "answers": ["north"],
        },
    ]
    (copy / "hotpotqa.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    local = {"test": str(copy / "hotpotqa.jsonl")}
    yaml = f"include: {builtin}\ntask: longbench_hotpotqa\ndataset_path: json\ndataset_name: null\n"
    (copy / "hotpotqa.yaml").write_text(
        yaml + f"dataset_kwargs:\n  data_files: {json.dumps(local)}\n", encoding="utf-8"
    )
    cfg = task_cfg(copy, ["longbench_hotpotqa"], include_defaults=True)
    rows = measure(model, tokenizer, cfg, tmp_path)
    assert [(row["subtask"], row["metric"], row["samples"]) for row in rows] == [
        ("longbench_hotpotqa", "score", 2),
        ("longbench_hotpotqa", "qa_f1_score", 2),
    ]
    version = re.search(r"\n  version: ([\d.]+)", builtin.read_text()).group(1)
    assert {row["task_version"] for row in rows} == {float(version)}  # the harness's task, its data local


def test_network_failures_are_found_anywhere_in_the_chain():
    import requests

    try:
        try:
            raise requests.exceptions.ConnectionError("Max retries exceeded with url: /essays.txt")
        except requests.exceptions.ConnectionError as inner:
            raise RuntimeError("dataset builder failed") from inner
    except RuntimeError as outer:
        assert isinstance(bridge.network_failure(outer), requests.exceptions.ConnectionError)
    assert bridge.network_failure(ValueError("a bug, not the network")) is None


# --- RULER: lengths and tokenizer through the metadata ----------------------------------------------------------------


def test_ruler_is_sized_by_the_cell_and_the_models_tokenizer(model, tokenizer, tmp_path):
    """niah_single_1 builds its haystack locally (no download): its prompts follow ctx and the byte tokenizer. RULER
    sizes the input to ctx - 128 tokens but the harness then appends a gen_prefix it did not count, so here every
    prompt overflows: truncate lets the harness cut them, as it would unasked, and counts them."""
    cfg = task_cfg(None, ["niah_single_1"], include_defaults=True, limit=2, on_overflow="truncate")
    rows = measure(model, tokenizer, cfg, tmp_path, ctx=CTX)
    assert [(row["subtask"], row["metric"], row["samples"], row["truncated"]) for row in rows] == [
        ("niah_single_1", str(CTX), 2, 2)  # RULER's -1 for its default 4096, where it generated nothing, is dropped
    ]
    samples = read_samples(tmp_path, "niah_single_1", CTX)
    assert [sample["doc"]["max_length"] for sample in samples] == [CTX, CTX]
    for sample in samples:  # sized with the loaded model's tokenizer, handed over through the metadata
        assert sample["doc"]["length"] == len(tokenizer(sample["doc"]["input"])["input_ids"]) + 128 <= CTX
        prompt = len(tokenizer(sample["arguments"][0][0])["input_ids"])
        assert sample["request_tokens"] == prompt + 128 > CTX and sample["truncated"] is True


# --- through the runner -----------------------------------------------------------------------------------------------


def compose_job(tasks_dir, *extra):
    overrides = ["model=tiny_random", "rope=none", "logn=off", "task=lm_eval", f"task.include_path={tasks_dir}"]
    overrides += ["task.include_defaults=false", "task.tasks=[tiny_gen,tiny_mc]", f"ctxs=[{CTX}]", "progress=false"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=[*overrides, *extra])


def test_runner_end_to_end_with_resume(tasks_dir, tmp_path, monkeypatch):
    cfg = compose_job(tasks_dir)
    run(cfg, out_dir=tmp_path)
    rows = read_rows(tmp_path / RESULTS)
    assert [(row["harness_task"], row["metric"]) for row in rows] == [
        ("tiny_gen", "exact_match"),
        ("tiny_mc", "acc"),
        ("tiny_mc", "acc_norm"),
    ]
    assert all(row["task"] == "lm_eval" and row["method"] == "none" and row["data"] is None for row in rows)
    model, tokenizer = enhance_long.models.load_model(cfg.model, attention=cfg.attention.name)
    for name in ("tiny_gen", "tiny_mc"):  # rope=none: the harness's own run of the same model
        assert_rows_are_the_harness_results(
            [row for row in rows if row["harness_task"] == name], harness_run(model, tokenizer, tasks_dir, name)
        )
    assert {p.name for p in (tmp_path / bridge.SAMPLES_DIR).iterdir()} == {
        f"tiny_gen_{CTX}.jsonl",
        f"tiny_mc_{CTX}.jsonl",
    }
    table = (tmp_path / "table.md").read_text()
    assert "### lm-evaluation-harness" in table and f"| task | metric | {CTX}, none |" in table
    monkeypatch.setattr(enhance_long.models, "load_model", lambda *a, **k: pytest.fail("nothing left to measure"))
    run(cfg, out_dir=tmp_path)
    assert read_rows(tmp_path / RESULTS) == rows


def test_runner_refuses_a_bad_setting_in_one_line(tasks_dir, tmp_path):
    with pytest.raises(SystemExit, match=r"^enhance-long: task.tasks has 'nope', which lm-eval") as error:
        run(compose_job(tasks_dir, "task.tasks=[nope]"), out_dir=tmp_path)
    assert "\n" not in str(error.value)


# --- the table and the log line -------------------------------------------------------------------------------------


def test_table_lays_out_tasks_by_setting_and_marks_cut_documents():
    def row(ctx, method, subtask, metric, value, stderr=None, truncated=0, filter_name="none"):
        return {
            "task": "lm_eval",
            "model": "tiny",
            "method": method,
            "ctx": ctx,
            "harness_task": "ruler" if metric.isdigit() else "tiny_group",
            "subtask": subtask,
            "metric": metric,
            "filter": filter_name,
            "value": value,
            "stderr": stderr,
            "samples": 5,
            "truncated": truncated,
            "lm_eval": "0.4.13",
        }

    rows = [
        row(8192, "consistent_ntk", "tiny_mc", "acc", 0.6, 0.1),
        row(4096, "consistent_ntk", "tiny_mc", "acc", 0.4, 0.1, truncated=2),
        row(4096, "none", "tiny_mc", "acc", 0.3, 0.1),
        row(4096, "none", "tiny_mc", "acc", 0.2, 0.1),  # a rerun: the last row wins
        row(4096, "none", "tiny_gen", "exact_match", 1.0, filter_name="strict-match"),
        row(4096, "none", "niah_single_1", "4096", 0.5),
        row(8192, "consistent_ntk", "niah_single_1", "8192", 0.25),
        {"task": "perplexity", "ctx": 4096, "doc": "all", "ppl": 5.0},
    ]
    assert bridge.harness_table(rows) == "\n".join(
        [
            "### lm-evaluation-harness (model tiny; lm-eval 0.4.13)",
            "",
            "| task | metric | 4096, none | 4096, consistent_ntk | 8192, consistent_ntk |",
            "|---|---|---|---|---|",
            "| tiny_mc | acc | 0.2000 ± 0.1000 | 0.4000 ± 0.1000 (2 cut) | 0.6000 ± 0.1000 |",
            "| tiny_gen | exact_match [strict-match] | 1.0000 | - | - |",
            "| niah_single_1 | <ctx> | 0.5000 | - | 0.2500 |",
            "",
        ]
    )
    assert tables(rows[:-1]) == bridge.harness_table(rows)  # the job's and the sweep's table.md
    assert bridge.harness_brief(rows[1:2]) == "tiny_group: acc=0.4000 ± 0.1000 (2 cut) over 5 samples"
    assert bridge.TASK.brief([row(4096, "none", "tiny_group", "acc", 0.5)]) == "tiny_group: acc=0.5000 over 5 samples"


def test_the_model_is_not_moved_or_retyped_in_bf16(tokenizer, tasks_dir, tmp_path):
    model = tiny_model(vocab_size=len(tokenizer), max_position_embeddings=64).to(torch.bfloat16)
    rows = measure(model, tokenizer, task_cfg(tasks_dir, ["tiny_mc"]), tmp_path)
    assert model.dtype == torch.bfloat16 and {p.device.type for p in model.parameters()} == {"cpu"}
    assert {row["metric"] for row in rows} == {"acc", "acc_norm"}
