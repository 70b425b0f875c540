"""The embedded default model's own zero-shot tasks: multiple-choice items generated from the corpus grammar,
written as the local data files the built-in task YAMLs read."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from ..storage.documents import write_text
from .corpus import CHOICE_TASKS, choice_items

log = logging.getLogger("sds")


def write_builtin_tasks(folder: Path, items: int, seed: int) -> None:
    """The embedded model's tasks (generated from the corpus grammar) as <task>/test.jsonl in `folder`."""
    for task in CHOICE_TASKS:
        (folder / task).mkdir()
        write_text(folder / task / "test.jsonl", "".join(json.dumps(r) + "\n" for r in choice_items(task, items, seed)))
    log.info("zero-shot tasks: %d items each of %s", items, ", ".join(CHOICE_TASKS))
