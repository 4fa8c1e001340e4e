"""Evaluation tasks by name: every module of this package that defines ``TASK`` (a :class:`Task`) is one.

Adding a task is one module here and one YAML in ``conf/task/``; nothing else lists tasks. A task from outside the
package joins with :func:`register_task` (README, *How to add a task*). A module that fails to
import (a missing optional dependency) does not break the others: its task is simply not available, and asking for
it says why.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil

from enhance_long.tasks.base import Task, TaskEnv


@functools.cache
def _registry() -> tuple[dict[str, Task], dict[str, str]]:
    """(task name -> task, module -> why it could not be imported)."""
    tasks: dict[str, Task] = {}
    broken: dict[str, str] = {}
    for info in pkgutil.iter_modules(__path__):
        name = f"{__name__}.{info.name}"
        try:
            module = importlib.import_module(name)
        except ImportError as error:
            broken[name] = f"{type(error).__name__}: {error}"
            continue
        task = getattr(module, "TASK", None)
        if isinstance(task, Task):
            tasks[task.name] = task
    return tasks, broken


def register_task(task: Task) -> Task:
    """Add a task from outside the package (a module named in ``$ENHANCE_LONG_PLUGINS``); returns it."""
    if not isinstance(task, Task) or not task.name:
        raise ValueError(f"register_task takes a Task with a name, got {task!r}; subclass enhance_long.tasks.Task")
    _registry()[0][task.name] = task
    return task


def available_tasks() -> list[str]:
    return sorted(_registry()[0])


def all_tasks() -> list[Task]:
    return [_registry()[0][name] for name in available_tasks()]


def find_task(name: str) -> Task | None:
    return _registry()[0].get(name)


def get_task(name: str) -> Task:
    """The task called ``name``; an unknown one is a one-line ``ValueError`` listing the known ones."""
    task = find_task(name)
    if task is None:
        broken = "; ".join(f"{module} did not import ({why})" for module, why in _registry()[1].items())
        raise ValueError(
            f"task={name} is unknown; choose one of {', '.join(available_tasks())} (e.g. task=perplexity)"
            + (f"; {broken}" if broken else "")
        )
    return task


__all__ = ["Task", "TaskEnv", "all_tasks", "available_tasks", "find_task", "get_task", "register_task"]
