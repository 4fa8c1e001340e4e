"""Result rows on disk: atomic writes, resume keys, and merging the rows of many output folders.

A job's ``results.jsonl`` holds one JSON object per line; every row carries ``key``, a hash of everything that
determines its value (the resolved model, method, attention, task and data settings, the seed, and the cell).
Rows of one cell share its key. The file is rewritten whole through a temporary file and ``os.replace`` after
each cell, so a killed job leaves either the previous complete file or the new one, never half a row; a re-run
skips every cell whose key is already there.

Jobs that differ only in knobs their method ignores (``rope=none rope.alpha=1`` and ``rope.alpha=4``) have the
same keys: a job reuses such a cell from a sibling folder instead of measuring it again, and :func:`load_results`
keeps one copy of each cell.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

RESULTS = "results.jsonl"
KEY_VERSION = 1  # bump when a change makes old rows incomparable; old rows are then measured again


def machine_info() -> dict:
    """The facts that decide a float32 result's last bits: the CPU and the vector kernels torch runs on it, the GPU
    if any, torch's threads and the versions of torch and transformers. Rows format them with :func:`machine`; the
    benchmarks add the date, the cores and python. Read at each call: a benchmark sets torch's threads before it
    reports them."""
    import torch
    import transformers

    info = {
        "cpu": cpu_name(),
        "cpu_kernels": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def machine() -> str:
    """Where a row was measured, in one line (:func:`machine_info`). Rows measured on different machines can differ
    in the last float32 bits (CPU kernels with AVX2 and with AVX-512 round differently: ~1e-5 of a perplexity), so
    the board's rows say which machine each came from."""
    info = machine_info()
    where = f"{info['cpu']} ({info['cpu_kernels']})"
    if "gpu" in info:
        where += f", {info['gpu']}"
    return f"{where}, {info['torch_threads']} threads, torch {info['torch']}, transformers {info['transformers']}"


@functools.cache
def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo, else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_atomic(path: Path, data: str | bytes) -> None:
    """Replace ``path`` with ``data`` so that readers (and a crash) see the old file or the new one, never a mix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def replace_cell_lines(path: Path, cell: dict, lines: list[dict]) -> None:
    """Replace the lines of one cell (those whose fields equal ``cell``'s) in a JSONL side file such as a task's
    ``predictions.jsonl`` by ``lines``, atomically: a killed job leaves the file whole."""
    path = Path(path)
    kept = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            if any(record.get(key) != value for key, value in cell.items()):
                kept.append(line)
    kept += [json.dumps(line, ensure_ascii=False, default=str) for line in lines]
    write_atomic(path, "".join(line + "\n" for line in kept))


def cell_key(identity: Mapping[str, Any], cell: Mapping[str, Any]) -> str:
    """A stable 16-hex-digit hash of a run's identity plus one cell (order of dict keys does not matter)."""
    blob = json.dumps({"v": KEY_VERSION, "identity": identity, "cell": cell}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def read_rows(path: Path) -> list[dict]:
    """The rows of one ``results.jsonl``; a line that is not a JSON object is reported and skipped."""
    rows = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            log.warning("%s:%d is not JSON; skipped", path, number)
            continue
        if isinstance(row, dict) and "key" in row:
            rows.append(row)
        else:
            log.warning("%s:%d is not a result row (no key); skipped", path, number)
    return rows


def write_rows(rows: Iterable[dict], path: Path) -> Path:
    """Write ``rows`` as a ``results.jsonl`` (one JSON object a line), atomically."""
    write_atomic(path, "".join(json.dumps(row, default=str) + "\n" for row in rows))
    return Path(path)


def find_result_files(paths: Iterable[Path]) -> list[Path]:
    """Every ``results.jsonl`` in these folders (searched recursively) or given directly, in a stable order."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files.extend(sorted(path.rglob(RESULTS)))
        else:
            raise FileNotFoundError(f"{path} does not exist; pass output folders of run.py (outputs/..., multirun/...)")
    return list(dict.fromkeys(files))


def group_by_key(rows: Iterable[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["key"], []).append(row)
    return groups


def load_results(paths: Iterable[Path]) -> list[dict]:
    """The rows of all result files under ``paths``, one copy per cell (the first file that has it wins)."""
    merged: dict[str, list[dict]] = {}
    for file in find_result_files(paths):
        for key, rows in group_by_key(read_rows(file)).items():
            merged.setdefault(key, rows)
    return [row for rows in merged.values() for row in rows]


class ResultStore:
    """A job's ``results.jsonl``: which cells are measured, and adding a cell's rows atomically."""

    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / RESULTS
        self.rows = read_rows(self.path) if self.path.exists() else []

    def keys(self) -> set[str]:
        return {row["key"] for row in self.rows}

    def put(self, key: str, rows: list[dict]) -> None:
        """Store the rows of one cell (replacing any earlier rows of it) and rewrite the file atomically."""
        if any(row.get("key") != key for row in rows):
            raise ValueError(f"every row stored under key {key} must carry that key")
        self.rows = [row for row in self.rows if row["key"] != key] + list(rows)
        write_rows(self.rows, self.path)
