"""Markdown tables from result rows: labels that tell rows apart, and the methods x lengths grid most tasks print.

Nothing here knows a task; each task's ``table`` (``enhance_long/tasks/``) composes these.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

LABEL_FIELDS = ("model", "attention", "data", "seed")  # besides the method, shown in a label when they vary


def labels(rows: Sequence[dict]) -> dict[str, str]:
    """A readable, unique label per result key: the method plus the settings that vary among these rows."""
    varying = [f for f in LABEL_FIELDS if len({json.dumps(r.get(f), default=str) for r in rows}) > 1]
    knobs = sorted({k for r in rows for k in r.get("settings", {})})
    varying_knobs = [k for k in knobs if len({json.dumps(r.get("settings", {}).get(k)) for r in rows}) > 1]
    out = {}
    for row in rows:
        parts = [str(row.get("method"))]
        parts += [f"{f}={row.get(f)}" for f in varying]
        parts += [f"{k}={row.get('settings', {}).get(k)}" for k in varying_knobs]
        out[row["key"]] = ", ".join(parts)
    return out


def ordered_labels(rows: Sequence[dict], label_of: dict[str, str]) -> list[str]:
    """Labels in first-seen order, the stock model (rope=none without LogN) first."""
    first = {}
    for index, row in enumerate(rows):
        label = label_of[row["key"]]
        baseline = row.get("rope") == "none" and not row.get("logn")
        first.setdefault(label, (not baseline, index))
    return sorted(first, key=first.get)


def grid(rows: Sequence[dict], value: str) -> tuple[list[str], list[int], dict[tuple[str, int], list[float]]]:
    """(labels in order, lengths, (label, ctx) -> the values of ``value`` in row order)."""
    label_of = labels(rows)
    ctxs = sorted({row["ctx"] for row in rows})
    cells: dict[tuple[str, int], list[float]] = {}
    for row in rows:
        if row.get(value) is not None:
            cells.setdefault((label_of[row["key"]], row["ctx"]), []).append(row[value])
    return ordered_labels(rows, label_of), ctxs, cells


def markdown_table(header: Sequence[str], body: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(map(str, line)) + " |" for line in body]
    return "\n".join(lines) + "\n"


def describe_rows(rows: Sequence[dict]) -> str:
    """``model m, data d``: what a table's rows were measured on."""
    models = ", ".join(sorted({str(r.get("model")) for r in rows}))
    data = sorted({str(r.get("data")) for r in rows if r.get("data")})
    return f"model {models}" + (f", data {', '.join(data)}" if data else "")


def grid_table(
    rows: Sequence[dict],
    value: str,
    title: str,
    cell: Callable[[list[float]], str] = lambda values: f"{values[-1]:.2f}",
) -> str:
    """``title``, then methods x lengths of ``value``: ``cell`` turns a (method, length)'s values into its text
    (default: the last one)."""
    order, ctxs, cells = grid(rows, value)
    body = [[label, *(cell(cells[(label, c)]) if (label, c) in cells else "-" for c in ctxs)] for label in order]
    return f"{title}\n\n" + markdown_table(["method", *ctxs], body)


def perplexity_text(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value:.2f}" if value < 1000 else f"{value:.3g}"
