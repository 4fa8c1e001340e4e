"""Passkey retrieval: find a random number hidden at a chosen depth of a long, repetitive filler.

The standard prompt (Mohtashami & Jaggi, 2023), built directly in token ids so that it is exactly ``ctx`` tokens
for the model's tokenizer::

    [BOS] TASK_DESCRIPTION  FILLER ... FILLER  NEEDLE  FILLER ... FILL  QUESTION
                            `---- depth ----'          `-- trimmed --'

The filler before the needle is a whole number of filler sentences (``depth`` of the filler budget, rounded);
the filler after it is trimmed to make the total exact. Each cell (length x depth) runs ``trials`` prompts with
keys drawn from ``random.Random(f"{seed}:{ctx}:{depth}:{trial}")``, decodes greedily through the patched model
and its KV cache, and counts an answer correct when the first number in the output equals the key.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from enhance_long.plots import Panel, heatmaps
from enhance_long.tables import describe_rows, grid_table, labels, ordered_labels
from enhance_long.tasks.base import Task, TaskEnv, require_positive
from enhance_long.tasks.generation import greedy, leading_special

TASK_DESCRIPTION = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there."
)
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"


@dataclass
class PasskeyConfig:
    """``task=passkey`` (``conf/task/passkey.yaml`` comments every key)."""

    name: str = "passkey"
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    trials: int = 5
    key_digits: int = 5
    max_new_tokens: int = 8
    batch_size: int = 1  # prompts per generate call (all prompts of a length have the same length: no padding)


def passkey(seed: int, ctx: int, depth: float, trial: int, digits: int) -> str:
    """The key of one trial: ``digits`` random digits (no leading zero), reproducible from the cell and trial."""
    rng = random.Random(f"{seed}:{ctx}:{depth}:{trial}")
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def build_prompt(tokenizer, ctx: int, depth: float, key: str) -> list[int]:
    """Token ids of a passkey prompt of exactly ``ctx`` tokens with ``key`` at ``depth`` (0 = first, 1 = last)."""
    head = leading_special(tokenizer) + _encode(tokenizer, TASK_DESCRIPTION)
    needle = _encode(tokenizer, NEEDLE.format(key=key))
    question = _encode(tokenizer, QUESTION)
    budget = ctx - len(head) - len(needle) - len(question)
    if budget < 0:
        raise ValueError(
            f"ctx={ctx} is too short for a passkey prompt, which needs {ctx - budget} tokens before any filler; "
            f"use ctx>={ctx - budget}"
        )
    unit = _encode(tokenizer, FILLER)
    filler = unit * (budget // len(unit) + 1)
    before = round(depth * budget / len(unit)) * len(unit)
    before = min(before, budget // len(unit) * len(unit))
    return head + filler[:before] + needle + filler[: budget - before] + question


def first_number(text: str) -> str | None:
    """The first run of digits in a model's answer (None if it gave no number)."""
    match = re.search(r"\d+", text)
    return match.group() if match else None


class Passkey(Task):
    name = "passkey"
    schema = PasskeyConfig
    uses_data = False  # the prompt is built in code; data=... does not change the result

    def check(self, cfg: Any, ctxs: Sequence[int]) -> None:
        if not cfg.depths:
            raise ValueError("task.depths=[] measures nothing; give depths in [0, 1], e.g. task.depths=[0,0.5,1]")
        for depth in cfg.depths:
            if not 0 <= depth <= 1:
                raise ValueError(
                    f"task.depths has {depth}; a depth is a fraction of the filler in [0, 1], e.g. task.depths=[0,0.5,1]"
                )
        require_positive("task.trials", cfg.trials, "task.trials=5", integer=True)
        require_positive("task.batch_size", cfg.batch_size, "task.batch_size=4", integer=True)
        if not 1 <= cfg.key_digits <= 32:
            raise ValueError(f"task.key_digits={cfg.key_digits} is invalid; use 1 to 32 digits, e.g. task.key_digits=5")
        if cfg.max_new_tokens < 1:
            raise ValueError(f"task.max_new_tokens={cfg.max_new_tokens} is invalid; it must be >= 1, e.g. 8")

    def cells(self, cfg, ctxs: Sequence[int]) -> list[dict]:
        self.check(cfg, ctxs)
        return [{"ctx": int(ctx), "depth": float(depth)} for ctx in ctxs for depth in cfg.depths]

    def measure(self, env: TaskEnv, cell: dict) -> list[dict]:
        cfg, tokenizer = env.cfg, env.tokenizer
        ctx, depth = cell["ctx"], cell["depth"]
        keys = [passkey(env.seed, ctx, depth, trial, cfg.key_digits) for trial in range(cfg.trials)]
        prompts = [build_prompt(tokenizer, ctx, depth, key) for key in keys]
        answers = greedy(
            env.model,
            tokenizer,
            prompts,
            cfg.max_new_tokens,
            batch_size=cfg.batch_size,
            eos_token_id=tokenizer.eos_token_id,
            desc=f"passkey ctx={ctx} depth={depth:g}",
            reuse_prefix=True,  # the trials share the prompt up to the needle: prefilled once where exact
            progress=env.progress,
        )
        outputs = [tokenizer.decode(answer, skip_special_tokens=True) for answer in answers]
        correct = sum(first_number(text) == key for key, text in zip(keys, outputs, strict=True))
        return [
            {
                **cell,
                "trials": cfg.trials,
                "correct": correct,
                "accuracy": correct / cfg.trials,
                "keys": keys,
                "outputs": outputs,
            }
        ]

    def brief(self, rows: Sequence[dict]) -> str:
        row = rows[-1]
        return f"accuracy={row['accuracy']:.2f} ({row['correct']}/{row['trials']})"

    def table(self, rows: Sequence[dict]) -> str:
        return passkey_table(rows)

    def plots(self, rows: Sequence[dict], out_dir: Path) -> list[Path]:
        return [plot_passkey_heatmap(rows, Path(out_dir) / "passkey_heatmap.png")] if rows else []


TASK = Passkey()


def passkey_table(rows: Sequence[dict]) -> str:
    """Methods x lengths of passkey accuracy, averaged over depths."""
    title = f"### Passkey accuracy, mean over depths ({describe_rows(rows)})"
    return grid_table(rows, "accuracy", title, cell=lambda values: f"{100 * sum(values) / len(values):.0f}%")


def plot_passkey_heatmap(rows: Sequence[dict], path: Path) -> Path:
    """Accuracy per depth and length, one panel per method."""
    label_of = labels(rows)
    ctxs = sorted({r["ctx"] for r in rows})
    depths = sorted({r["depth"] for r in rows})
    panels = []
    for label in ordered_labels(rows, label_of):
        grid = [[math.nan] * len(ctxs) for _ in depths]
        for r in rows:
            if label_of[r["key"]] == label:
                grid[depths.index(r["depth"])][ctxs.index(r["ctx"])] = 100 * r["accuracy"]  # as the cells read
        panels.append(Panel(label, [f"{d:g}" for d in depths], ctxs, grid))
    return heatmaps(panels, path, 100.0, lambda v: f"{v:.0f}", "context length", "depth", "accuracy (%)")
