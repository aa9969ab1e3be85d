"""Reasoning tasks: a generator, a loader, a tokenizer, a prompt/answer format and a checker per task.

Graph tasks' records use Coconut's ProsQA JSON format (`softar.tasks.prosqa`): `question`, `answer`, `steps`,
`edges`, `root`, `target`, `neg_target`, `idx_to_symbol`; `qa` reads free-text `question`, `steps`, `answer`
(`softar.tasks.qa`). A task renders a record as words (its question, its reasoning steps, its answer) and checks a
generated answer; `softar.tasks.data` turns rendered records into training sequences.
"""

from __future__ import annotations

from softar import SoftarError
from softar.tasks.base import VOCABULARY, Rendered, Task
from softar.tasks.pathfind import PathFind
from softar.tasks.prosqa import ProsQA
from softar.tasks.qa import QA
from softar.tasks.twins import Twins

TASKS: dict[str, Task] = {"prosqa": ProsQA(), "pathfind": PathFind(), "twins": Twins(), "qa": QA()}
TASK_NAMES = tuple(TASKS)

__all__ = ["TASKS", "TASK_NAMES", "VOCABULARY", "Rendered", "Task", "get_task"]


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise SoftarError(f"unknown task {name!r} (known: {', '.join(TASKS)})")
    return TASKS[name]
