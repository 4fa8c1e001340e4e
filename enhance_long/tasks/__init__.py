"""Evaluation tasks by name; each module exposes ``TASK`` (see :mod:`enhance_long.tasks.base`).

Modules are imported only when their task is asked for, so a missing optional dependency of one task (say
LongBench's ``datasets``) cannot break the others.
"""

from __future__ import annotations

import importlib
import importlib.util

from enhance_long.tasks.base import Task, TaskEnv

TASK_MODULES = {
    "perplexity": "enhance_long.tasks.perplexity",
    "passkey": "enhance_long.tasks.passkey",
    "longbench": "enhance_long.tasks.longbench",
    "ruler": "enhance_long.tasks.ruler",
    "lm_eval": "enhance_long.tasks.harness",  # not tasks/lm_eval.py, which would shadow the lm_eval package
}


def available_tasks() -> list[str]:
    """Task names whose module is present in this checkout."""
    return [name for name, module in TASK_MODULES.items() if importlib.util.find_spec(module) is not None]


def get_task(name: str) -> Task:
    if name not in TASK_MODULES or importlib.util.find_spec(TASK_MODULES[name]) is None:
        raise ValueError(f"task={name} is unknown; choose one of {', '.join(available_tasks())} (e.g. task=perplexity)")
    return importlib.import_module(TASK_MODULES[name]).TASK


__all__ = ["TASK_MODULES", "Task", "TaskEnv", "available_tasks", "get_task"]
