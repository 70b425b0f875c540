"""Zero-shot task sets and their local data files: names, sets and file checks without lm_eval (cheap
enough for config validation); running the tasks is `evaluation.zeroshot`'s.

The task YAMLs ship in `sds/evaluation/tasks/` and read local data files only: `<data_dir>/<task>/<split>.jsonl`
(or `.parquet`). The embedded default model's own three tasks (`builtin`) are written by the pipeline.
"""
from __future__ import annotations

from pathlib import Path

import yaml

from .errors import TaskDataError

TASKS_DIR = Path(__file__).resolve().parents[1] / "evaluation" / "tasks"
# the built-in model's own tasks, generated from the corpus grammar (demo.tasks writes their data)
BUILTIN_TASKS = ("sds_agreement", "sds_topic", "sds_count")
TASK_SETS = {
    "builtin": list(BUILTIN_TASKS),
    "sds": ["copa", "lambada_openai", "openbookqa", "piqa", "rte", "storycloze_2016", "winogrande"],
    "wanda": ["boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"],
}


def available_tasks() -> list[str]:
    return sorted(p.stem for p in TASKS_DIR.glob("*.yaml"))


def resolve_tasks(spec: str | list[str]) -> list[str]:
    """Task names from a set name ('builtin', 'sds', 'wanda') or a list of task and set names, in order,
    without repeats. Raises ValueError naming the unknown entry."""
    items = [spec] if isinstance(spec, str) else list(spec)
    known = available_tasks()
    names: list[str] = []
    for item in items:
        expanded = TASK_SETS.get(item, [item])
        for name in expanded:
            if name not in known:
                raise ValueError(f"unknown zero-shot task {name!r}; expected a set ({', '.join(TASK_SETS)}) "
                                 f"or a task ({', '.join(known)})")
            if name not in names:
                names.append(name)
    return names


class _Loader(yaml.SafeLoader):
    """Reads a task YAML without resolving `!function` (no lm_eval import)."""


_Loader.add_constructor("!function", lambda loader, node: f"!function {loader.construct_scalar(node)}")


def task_spec(name: str) -> dict:
    return yaml.load((TASKS_DIR / f"{name}.yaml").read_text(encoding="utf-8"), Loader=_Loader)


def task_files(names: list[str], data_dir: str | Path | None, builtin_dir: str | Path | None) -> dict:
    """{task: {split: Path}} of every task's data files, checked to exist: built-in tasks read
    `builtin_dir` (the pipeline's tasks/ folder), the others `data_dir`. A `.parquet` file stands in for a
    missing `.jsonl`. Raises TaskDataError naming the task and the file."""
    files: dict[str, dict[str, Path]] = {}
    for name in names:
        base = builtin_dir if name in BUILTIN_TASKS else data_dir
        if base is None:
            what = "the pipeline's tasks folder" if name in BUILTIN_TASKS else "evaluate.zeroshot.data_dir"
            raise TaskDataError(f"zero-shot task {name!r} needs {what} (its data files are read from there)")
        files[name] = {}
        for split, rel in task_spec(name)["dataset_kwargs"]["data_files"].items():
            path = Path(base) / rel
            if not path.is_file() and path.with_suffix(".parquet").is_file():
                path = path.with_suffix(".parquet")
            if not path.is_file():
                raise TaskDataError(f"zero-shot task {name!r}: data file {str(path)!r} not found (records as "
                                    f"described in {TASKS_DIR / (name + '.yaml')})")
            files[name][split] = path
    return files
