"""The runner end to end on the real config, shrunk: tiny random model, short lengths, local text."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import enhance_long.models
import enhance_long.tasks.perplexity
from enhance_long.results import RESULTS, load_results, read_rows
from enhance_long.runner import run

ROOT = Path(__file__).resolve().parent.parent
ROW_CONTRACT = {"task", "model", "rope", "alpha", "logn", "attention", "ctx", "key", "method"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    for i in range(2):
        (folder / f"doc{i}.txt").write_text(" ".join(f"w{(i * 31 + k * k) % 97}" for k in range(200)))
    return folder


def tiny_overrides(corpus, *extra):
    """The tiny job: tiny random model, local text, short lengths, the configured method alone (baseline=false)."""
    base = ["model=tiny_random", "data=local", f"data.path={corpus}", "ctxs=[64,128]", "progress=false"]
    return [*base, "baseline=false", *extra]


def compose_tiny(corpus, *extra):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=tiny_overrides(corpus, *extra))


def run_cli(*args, cwd, env=None, timeout=300):
    command = [sys.executable, str(ROOT / "run.py"), *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=env, timeout=timeout)


def test_perplexity_job_writes_the_output_contract(corpus, tmp_path):
    aggregate = run(compose_tiny(corpus, "baseline=true"), out_dir=tmp_path)
    assert [(r["method"], r["ctx"]) for r in aggregate] == [
        ("none", 64),
        ("none", 128),
        ("consistent_ntk(alpha=2,bucket=256,schedule=per_query)+logn", 64),
        ("consistent_ntk(alpha=2,bucket=256,schedule=per_query)+logn", 128),
    ]
    rows = read_rows(tmp_path / RESULTS)
    assert all(set(r) >= ROW_CONTRACT and "ppl" in r and "tokens" in r for r in rows)
    assert {r["doc"] for r in rows} == {"doc0.txt", "all"}
    # each row says where it was measured: rows from CPUs with other vector kernels differ in the last bits
    import torch

    where = {r["machine"] for r in rows}
    assert len(where) == 1 and f"({torch.backends.cpu.get_cpu_capability()})" in where.pop()
    # the runner lets the task plan across cells: both methods score 64 from the prefix of their 128 forward
    assert {r.get("from_ctx") for r in rows if r["ctx"] == 64} == {128}
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["config"]["model"]["name"] == "tiny_random" and summary["rows"] == aggregate
    table = (tmp_path / "table.md").read_text()
    assert "| method | 64 | 128 |" in table and "| none |" in table
    assert {p.name for p in tmp_path.glob("*.png")} == {"ppl_vs_length.png", "ppl_by_position.png"}


def test_passkey_job(corpus, tmp_path):
    overrides = ["task=passkey", "ctxs=[300]", "task.depths=[0,1]", "task.trials=1", "task.max_new_tokens=3"]
    aggregate = run(compose_tiny(corpus, *overrides), out_dir=tmp_path)
    assert [(r["ctx"], r["depth"], r["trials"]) for r in aggregate] == [(300, 0.0, 1), (300, 1.0, 1)]
    assert all(set(r) >= ROW_CONTRACT and "accuracy" in r and r["data"] is None for r in aggregate)
    assert (tmp_path / "passkey_heatmap.png").exists() and "Passkey accuracy" in (tmp_path / "table.md").read_text()


def test_an_interrupted_job_resumes_with_the_missing_cells_only(corpus, tmp_path, monkeypatch):
    measure = enhance_long.tasks.perplexity.Perplexity.measure
    calls = []

    def failing_second_cell(self, env, cell):
        calls.append(cell["ctx"])
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if the job were stopped mid-way
        return measure(self, env, cell)

    monkeypatch.setattr(enhance_long.tasks.perplexity.Perplexity, "measure", failing_second_cell)
    with pytest.raises(KeyboardInterrupt):
        run(compose_tiny(corpus), out_dir=tmp_path)
    assert [r["ctx"] for r in read_rows(tmp_path / RESULTS)] == [64, 64]  # doc row + aggregate of the first cell
    calls.clear()
    run(compose_tiny(corpus), out_dir=tmp_path)
    assert calls == [128]
    monkeypatch.setattr(enhance_long.models, "load_model", lambda *a, **k: pytest.fail("nothing left to measure"))
    run(compose_tiny(corpus), out_dir=tmp_path)
    assert len(read_rows(tmp_path / RESULTS)) == 4


def test_reuse_takes_the_cells_of_earlier_results_and_measures_only_the_rest(corpus, tmp_path, monkeypatch):
    run(compose_tiny(corpus, "ctxs=[64]"), out_dir=tmp_path / "earlier")  # e.g. a board committed by another machine
    measured = []
    measure = enhance_long.tasks.perplexity.Perplexity.measure
    monkeypatch.setattr(
        enhance_long.tasks.perplexity.Perplexity,
        "measure",
        lambda self, env, cell: measured.append(cell["ctx"]) or measure(self, env, cell),
    )
    run(compose_tiny(corpus, f"reuse=[{tmp_path / 'earlier'}]"), out_dir=tmp_path / "now")
    assert measured == [128]
    earlier = read_rows(tmp_path / "earlier" / RESULTS)
    now = read_rows(tmp_path / "now" / RESULTS)
    assert [r for r in now if r["ctx"] == 64] == earlier and {r["ctx"] for r in now} == {64, 128}
    measured.clear()
    run(compose_tiny(corpus, f"reuse=[{tmp_path / 'earlier'}]", "resume=false"), out_dir=tmp_path / "again")
    assert sorted(measured) == [64, 128]  # resume=false measures everything, reuse or not


def test_wandb_offline_logs_and_keeps_local_results(corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run(compose_tiny(corpus, "logger=wandb", "ctxs=[64]"), out_dir=tmp_path)
    assert read_rows(tmp_path / RESULTS)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def test_wandb_failures_never_cost_local_results(corpus, tmp_path, monkeypatch):
    import wandb

    def broken_init(**kwargs):
        raise wandb.errors.UsageError("api_key not configured (no-tty)")

    monkeypatch.setattr(wandb, "init", broken_init)
    run(compose_tiny(corpus, "logger=wandb", "ctxs=[64]"), out_dir=tmp_path / "a")
    assert read_rows(tmp_path / "a" / RESULTS)

    class BrokenRun:
        def log(self, *args, **kwargs):
            raise ConnectionError("network unreachable")

        def finish(self, *args, **kwargs):
            raise ConnectionError("network unreachable")

    monkeypatch.setattr(wandb, "init", lambda **kwargs: BrokenRun())
    run(compose_tiny(corpus, "logger=wandb", "ctxs=[64]"), out_dir=tmp_path / "b")
    assert (tmp_path / "b" / "table.md").exists()


def test_multirun_2x2_writes_the_merged_report(corpus, tmp_path):
    args = ["-m", *tiny_overrides(corpus, "rope=none,ntk", "ctx=64,128", "name=grid")]
    done = run_cli(*args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    sweep = tmp_path / "multirun" / "grid"
    jobs = sorted(p.parent.name for p in sweep.rglob(RESULTS))
    assert len(jobs) == 4 and all("rope=" in j and "ctx=" in j for j in jobs)
    for name in ("results.csv", "table.md", "ppl_vs_length.png", "ppl_by_position.png"):
        assert (sweep / name).exists(), name
    table = (sweep / "table.md").read_text()
    assert "| method | 64 | 128 |" in table
    assert "| none+logn |" in table and "| ntk(alpha=2)+logn |" in table
    rebuilt = subprocess.run(
        [sys.executable, "-m", "enhance_long.report", str(sweep), "--out", str(tmp_path / "again")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert rebuilt.returncode == 0 and (tmp_path / "again" / "table.md").read_text() == table


def test_killed_sweep_resumes(corpus, tmp_path):
    args = ["-m", *tiny_overrides(corpus, "task=passkey", "ctxs=[300]", "task.depths=[0,0.5,1]", "task.trials=2")]
    args += ["rope=none,ntk", "name=killed"]
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "run.py"), *args],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    sweep = tmp_path / "multirun" / "killed"
    deadline = time.time() + 240
    while time.time() < deadline and not list(sweep.rglob(RESULTS)):
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    before = load_results([sweep])
    assert 1 <= len(before) < 6, "the sweep should have been killed part-way"
    assert all(json.loads(line) for f in sweep.rglob(RESULTS) for line in f.read_text().splitlines())
    done = run_cli(*args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    skipped = [int(n) for n in re.findall(r"(\d+) already done", done.stdout + done.stderr)]
    assert len(skipped) == 2 and sum(skipped) == len(before)  # one header per job; passkey: one row per cell
    after = load_results([sweep])
    assert len(after) == 6 and all(row in after for row in before)
    assert (sweep / "passkey_heatmap.png").exists()


def test_jobs_differing_in_ignored_knobs_are_one_cell_with_submitit(corpus, tmp_path):
    args = ["-m", "hydra/launcher=submitit_local", *tiny_overrides(corpus, "ctxs=[64]", "rope=none", "rope.alpha=1,2")]
    done = run_cli(*args, "name=dedup", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    sweep = tmp_path / "multirun" / "dedup"
    assert len(list(sweep.rglob(RESULTS))) == 2
    rows = load_results([sweep])
    assert [(r["method"], r["doc"]) for r in rows] == [("none+logn", "doc0.txt"), ("none+logn", "all")]
    assert (sweep / "results.csv").read_text().count("\n") == 3


def test_cli_bad_value_is_one_line(tmp_path):
    done = run_cli("ctx=0", cwd=tmp_path)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1].startswith("enhance-long: ctx has 0;")
    assert not (tmp_path / "outputs").exists() or not list((tmp_path / "outputs").rglob(RESULTS))


@pytest.mark.slow
def test_default_model_and_data_end_to_end(tmp_path):
    """The embedded SmolLM2 on the embedded Canterbury text with the default method and its baseline (~2 minutes).

    Inside the trained length (8192) consistent NTK and LogN are inactive, so both rows must agree.
    """
    done = run_cli("ctxs=[1024,4096]", "baseline=true", "progress=false", cwd=tmp_path, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    (summary,) = list((tmp_path / "outputs" / "perplexity").rglob("summary.json"))
    rows = {(r["rope"], r["ctx"]): r for r in json.loads(summary.read_text())["rows"]}
    assert set(rows) == {(rope, ctx) for rope in ("none", "consistent_ntk") for ctx in (1024, 4096)}
    for ctx in (1024, 4096):
        stock, method = rows[("none", ctx)], rows[("consistent_ntk", ctx)]
        assert 2 < stock["ppl"] < 60 and stock["tokens"] == ctx - 1  # a real model on real English, one window
        assert abs(method["ppl"] - stock["ppl"]) < 1e-3 * stock["ppl"]
    assert "| none |" in (summary.parent / "table.md").read_text()


@pytest.mark.parametrize(
    ("overrides", "message", "before_loading"),
    [
        (["data.path=/nonexistent.txt"], "data.path='/nonexistent.txt' matches no file", True),
        ([f"data.path={ROOT / 'pyproject.toml'}"], "not one of ['.txt', '.jsonl']", True),
        (["model.dtype=float7"], "model.dtype='float7' is not one of", True),
        (["attention=flash_attention_2"], 'attention="flash_attention_2" needs', True),
        (["rope=yarn", "rope.factor=0.5"], "rope.factor=0.5 is invalid; it must be a number >= 1", True),
        (["model=local", "model.path=/nonexistent"], "model.path='/nonexistent' is not a folder", False),
    ],
)
def test_every_bad_value_ends_the_job_in_one_line_and_writes_nothing(
    corpus, tmp_path, monkeypatch, overrides, message, before_loading
):
    if before_loading:
        monkeypatch.setattr(enhance_long.models, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(SystemExit) as error:
        run(compose_tiny(corpus, *overrides), out_dir=tmp_path)
    text = str(error.value)
    assert text.startswith("enhance-long: ") and message in text and "\n" not in text
    assert not (tmp_path / RESULTS).exists() and not (tmp_path / "summary.json").exists()


def test_hydra_full_error_shows_the_traceback_instead(corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(ValueError, match="model.path='/nonexistent' is not a folder"):
        run(compose_tiny(corpus, "model=local", "model.path=/nonexistent"), out_dir=tmp_path)


def test_run_py_exits_with_status_1_and_one_line_on_a_bad_value(tmp_path):
    result = run_cli(
        "model=local", "model.path=/nonexistent", "progress=false", f"hydra.run.dir={tmp_path}", cwd=tmp_path
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("enhance-long: model.path='/nonexistent' is not a folder")
    assert "Traceback" not in result.stderr
