"""The README's worked examples (How to add a method, How to add a task), run as a user runs them: their files
written from the README, registered through ENHANCE_LONG_PLUGINS, found on Hydra's search path, run by run.py."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"```(?:python|yaml|bash)\n(.*?)```", re.S)


def section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"### {title}\n")
    end = text.find("\n##", start + 4)
    return text[start : end if end > 0 else None]


def files_and_command(title: str, folder: Path) -> list[str]:
    """Write the section's files (blocks whose first line is ``# <path>``) into ``folder``; return its command."""
    command = None
    for block in BLOCK.findall(section(title)):
        first = block.splitlines()[0]
        if re.fullmatch(r"# [\w/]+\.(py|yaml)", first):
            path = folder / first[2:]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(block)
        else:
            command = block.strip()
    assert command and command.split()[2:4] == ["run.py", "'hydra.searchpath=[file://my_conf]'"], command
    return command.split()


@pytest.fixture
def corpus(tmp_path):
    text = tmp_path / "book.txt"
    text.write_text(" ".join(f"word{(k * k) % 89}" for k in range(600)))
    return text


def run_example(title: str, tmp_path: Path, corpus: Path, *overrides: str) -> list[dict]:
    words = files_and_command(title, tmp_path)
    plugin = words[0].removeprefix("ENHANCE_LONG_PLUGINS=")
    env = {**os.environ, "ENHANCE_LONG_PLUGINS": plugin, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    arguments = [a.strip("'") for a in words[4:] if not a.startswith("ctxs=")]
    shrink = ["model=tiny_random", "data=local", f"data.path={corpus}", "ctxs=[64]", "progress=false"]
    command = [sys.executable, str(ROOT / "run.py"), f"hydra.searchpath=[file://{tmp_path / 'my_conf'}]"]
    command += [*arguments, *shrink, f"hydra.run.dir={tmp_path / 'out'}", *overrides]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]


def test_the_readme_method_example_runs_through_run_py(tmp_path, corpus):
    rows = run_example("How to add a method", tmp_path, corpus, "baseline=false")
    assert {(row["rope"], row["method"]) for row in rows} == {("divided", "divided(divisor=4)+logn")}
    assert all(row["ppl"] > 1 for row in rows)


def test_the_readme_task_example_runs_through_run_py(tmp_path, corpus):
    rows = run_example("How to add a task", tmp_path, corpus, "baseline=true")
    assert [(row["task"], row["method"]) for row in rows] == [
        ("top_one", "none"),
        ("top_one", "consistent_ntk(alpha=2,bucket=256,schedule=per_query)+logn"),
    ]
    assert all(0 <= row["score"] <= 100 and row["tokens"] == 63 for row in rows)
    assert "### top_one, score" in (tmp_path / "out" / "table.md").read_text()
