"""Zero-shot task sets and where their data comes from: names, sets, data files and the datasets cache,
checked without importing lm_eval (cheap enough for config validation); running the tasks is
`evaluation.zeroshot`'s.

Two sources (`evaluate.zeroshot.source`):
- `files`: the task YAMLs shipped in `sds/evaluation/tasks/`, reading local files only:
  `<data_dir>/<task>/<split>.jsonl` (or `.parquet`);
- `datasets_cache`: lm-eval-harness's own task YAMLs (`lm_eval/tasks/**`, found by their `task:` name),
  reading their Hugging Face datasets from the local datasets cache (offline).
The embedded default model's own three tasks (`builtin`) are written by the pipeline, whatever the source.
"""
from __future__ import annotations

import functools
import importlib.util
import re
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
SOURCES = ("files", "datasets_cache")
# the splits a task YAML may name; lm-eval reads every one it names (training_split for its few-shot sampler)
SPLIT_KEYS = ("training_split", "validation_split", "test_split", "fewshot_split")


def available_tasks() -> list[str]:
    return sorted(p.stem for p in TASKS_DIR.glob("*.yaml"))


def resolve_tasks(spec: str | list[str], source: str = "files") -> list[str]:
    """Task names from a set name ('builtin', 'sds', 'wanda') or a list of task and set names, in order,
    without repeats: the shipped YAMLs' tasks (source 'files'), or any task of lm-eval's own YAMLs
    (source 'datasets_cache'; the built-in tasks are ours either way). Raises ValueError naming the
    unknown entry."""
    items = [spec] if isinstance(spec, str) else list(spec)
    known = available_tasks()
    names: list[str] = []
    for item in items:
        for name in TASK_SETS.get(item, [item]):
            if source == "datasets_cache" and name not in BUILTIN_TASKS:
                if harness_yaml(name) is None:
                    raise ValueError(f"unknown zero-shot task {name!r}: neither a set ({', '.join(TASK_SETS)}) "
                                     f"nor a task of lm-eval's own YAMLs ({harness_tasks_dir()}; a task's "
                                     f"name, not a group's or tag's)")
            elif name not in known:
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


def check_task_data(zs: dict, builtin_dir: str | Path | None) -> tuple[list[str], dict]:
    """The task names of the `evaluate.zeroshot` settings `zs` and the data files of those read from files
    (the built-in tasks from `builtin_dir`, the pipeline's; the others from `data_dir`, source 'files'),
    every other task's dataset checked in the datasets cache. Raises TaskDataError naming the task and its
    file or dataset."""
    names = resolve_tasks(zs["tasks"], zs["source"])
    if zs["source"] != "datasets_cache":
        return names, task_files(names, zs["data_dir"], builtin_dir)
    files = task_files([n for n in names if n in BUILTIN_TASKS], None, builtin_dir)
    check_datasets_cache(names)
    return names, files


# --- lm-eval's own task YAMLs and the local datasets cache ----------------------------------------------

def harness_tasks_dir() -> Path:
    """lm-eval-harness's own task folder (lm_eval/tasks), found without importing lm_eval."""
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        raise TaskDataError("evaluate.zeroshot.source 'datasets_cache' needs lm-eval-harness (lm_eval) installed")
    return Path(list(spec.submodule_search_locations)[0]) / "tasks"


# a top-level `task: name` line (key and value plain or quoted); a group's `task:` is a list on later lines
_TASK_LINE = re.compile(r"""^['"]?task['"]?:[ \t]*['"]?([^'"\s#]+)""", re.M)


@functools.lru_cache(maxsize=1)
def _harness_index() -> dict[str, Path]:
    """Task name → the YAML that defines it, over lm-eval's own YAMLs in path order (the first one wins,
    as in lm-eval's TaskManager index). Reads each file's `task:` line only: about 1 s for lm-eval
    0.4.13's 14 000 files, where TaskManager() parses them all with their includes (36 s, measured)."""
    index: dict[str, Path] = {}
    root = harness_tasks_dir()
    for path in sorted(root.glob("**/*.yaml"), key=lambda p: p.as_posix()):
        if "__pycache__" in path.parts or ".ipynb_checkpoints" in path.parts:
            continue
        for match in _TASK_LINE.finditer(path.read_text(encoding="utf-8", errors="replace")):
            index.setdefault(match.group(1), path)
    return index


def harness_yaml(name: str) -> Path | None:
    """The lm-eval YAML of task `name`, or None where lm-eval has no such task."""
    return _harness_index().get(name)


def harness_config(path: Path, _seen: tuple = ()) -> dict:
    """A task YAML with its `include`s merged (the including file's keys win, as lm-eval's loader does);
    `!function` left unresolved."""
    path = Path(path).resolve()
    if path in _seen:
        raise TaskDataError(f"task YAML {str(path)!r}: include cycle")
    cfg = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)
    includes = cfg.pop("include", None)
    if not includes:
        return cfg
    merged: dict = {}
    for inc in includes if isinstance(includes, list) else [includes]:
        inner = harness_config(path.parent / inc, (*_seen, path))
        inner.pop("task_list", None)
        merged.update(inner)
    return {**merged, **cfg}


def harness_dataset(name: str) -> dict:
    """What lm-eval's YAML of task `name` loads: {'path', 'name', 'kwargs', 'splits'} (the dataset on the
    Hub, its config, extra load_dataset arguments, and the splits the task reads)."""
    path = harness_yaml(name)
    if path is None:
        raise TaskDataError(f"zero-shot task {name!r} is not one of lm-eval's own tasks ({harness_tasks_dir()})")
    cfg = harness_config(path)
    return {"path": cfg.get("dataset_path"), "name": cfg.get("dataset_name"), "kwargs": cfg.get("dataset_kwargs") or {},
            "splits": [cfg[k] for k in SPLIT_KEYS if cfg.get(k)], "yaml": path}


def describe_dataset(data: dict) -> str:
    return repr(data["path"]) + (f" (config {data['name']!r})" if data["name"] else "")


def check_datasets_cache(names: list[str]) -> dict[str, dict]:
    """Every non-built-in task's dataset is in the local datasets cache with the splits its YAML reads,
    offline (datasets' own resolution, no download; a cached dataset is found in milliseconds). Returns
    {task: harness_dataset(task)}; raises TaskDataError naming the task and the dataset."""
    import logging

    from .sources import hub_offline

    hub_offline()
    import datasets

    found, quiet = {}, logging.getLogger("datasets")  # its 'Using the latest cached version' per dataset
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        for name in names:
            data = harness_dataset(name) if name not in BUILTIN_TASKS else {}
            if data.get("path"):  # a Python-defined task loads its data itself: checked when it runs
                _check_cached(datasets, name, data)
                found[name] = data
    finally:
        quiet.setLevel(level)
    return found


def _check_cached(datasets, name: str, data: dict) -> None:
    kwargs = {k: v for k, v in data["kwargs"].items() if k in ("data_dir", "data_files", "revision")}
    cache = datasets.config.HF_DATASETS_CACHE
    try:
        builder = datasets.load_dataset_builder(data["path"], data["name"], **kwargs)
    except Exception:  # datasets raises ConnectionError, ValueError or FileNotFoundError here
        raise TaskDataError(
            f"zero-shot task {name!r}: dataset {describe_dataset(data)} is not in the local datasets cache "
            f"({cache}; HF_DATASETS_CACHE); on a machine with the Hub: datasets.load_dataset("
            f"{data['path']!r}{', ' + repr(data['name']) if data['name'] else ''}), then copy the cache") from None
    cached = set((builder.info.splits or {}).keys())
    missing = [s for s in data["splits"] if cached and s not in cached]
    if missing:
        raise TaskDataError(f"zero-shot task {name!r}: dataset {describe_dataset(data)} in the datasets cache "
                            f"({cache}) has no split {', '.join(map(repr, missing))} (it has "
                            f"{', '.join(sorted(cached))}; lm-eval's {data['yaml'].name} reads it)")
