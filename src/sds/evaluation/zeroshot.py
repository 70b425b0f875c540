"""Zero-shot multiple-choice accuracy with lm-eval-harness 0.4 on the in-memory model.

Where a task's YAML and data come from is `core.tasksets`' (no lm_eval import, used by config validation):
the YAMLs shipped in `sds/evaluation/tasks/` reading local files (`dataset_path: json` + `data_files`
relative to a data directory, `<data_dir>/<task>/<split>.jsonl` or `.parquet`), or lm-eval's own YAMLs
reading the local datasets cache (offline). Two task sets mirror the papers' tables (SDS: COPA, LAMBADA,
OpenBookQA, PIQA, RTE, StoryCloze, WinoGrande; Wanda: BoolQ, RTE, HellaSwag, WinoGrande, ARC-e, ARC-c,
OpenBookQA); the embedded default model has its own three tasks, generated from the corpus grammar by the
pipeline (`builtin`).

`load_tasks` builds lm_eval's Task objects (their data loaded: a missing dataset fails before the model
is loaded); `evaluate_zeroshot` runs them, logging progress lines with an ETA per batch of requests and
keeping third-party progress bars (lm_eval's, datasets', transformers') out of the stage's log.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import math
from pathlib import Path

from ..core.errors import TaskDataError
from ..core.sources import hub_offline
from ..core.runtime import Progress
from ..core.tasksets import TASKS_DIR, describe_dataset, harness_dataset, harness_yaml

METRICS = ("acc", "acc_norm", "perplexity")
# about this many progress lines per request type (loglikelihood, ...) of a whole zero-shot evaluation
PROGRESS_LINES = 20
REQUEST_TYPES = ("loglikelihood", "loglikelihood_rolling", "generate_until")
log = logging.getLogger("sds")


def task_config(name: str, splits: dict, cache_dir: str | Path) -> dict:
    """lm_eval task config (a dict, `!function`s resolved) of a shipped YAML reading the given local files."""
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(TASKS_DIR / f"{name}.yaml", resolve_func=True)
    parquet = {p.suffix for p in splits.values()} == {".parquet"}
    cfg["dataset_path"] = "parquet" if parquet else "json"
    cfg["dataset_kwargs"] = {"data_files": {s: str(p) for s, p in splits.items()}, "cache_dir": str(cache_dir)}
    return cfg


@contextlib.contextmanager
def quiet_progress_bars():
    """No third-party progress bar in the stage's log while inside: datasets', transformers' and the
    Hub client's through their own switches; lm_eval's (request building, tokenising, scoring, bootstrap)
    have none, so its modules' `tqdm` (and `tqdm.tqdm`, which lm_eval imports inside functions) are a
    disabled tqdm until the block ends. lm_eval's and datasets' INFO/WARNING lines (the expected warning
    about an in-memory model, 'Using the latest cached version' per dataset) go too; errors stay."""
    import datasets
    import tqdm
    import transformers
    from lm_eval.api import model as lm_model
    from lm_eval.api import task as lm_task
    from lm_eval.models import huggingface as lm_hf

    class Silent(tqdm.tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    patched = [(module, "tqdm", module.tqdm) for module in (lm_task, lm_model, lm_hf, tqdm)]
    quiet = {"lm_eval": logging.ERROR, "datasets": logging.ERROR}
    levels = {name: logging.getLogger(name).level for name in quiet}
    bars = datasets.is_progress_bar_enabled(), transformers.utils.logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    for module, attr, _ in patched:
        setattr(module, attr, Silent)
    for name, level in quiet.items():
        logging.getLogger(name).setLevel(level)
    try:
        yield
    finally:
        for module, attr, original in patched:
            setattr(module, attr, original)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        if bars[0]:
            datasets.enable_progress_bars()
        if bars[1]:
            transformers.utils.logging.enable_progress_bar()


def load_tasks(names: list[str], files: dict, cache_dir: str | Path) -> dict:
    """lm_eval Task objects of `names`, in order, with their data loaded: the tasks of `files`
    (core.tasksets.task_files) through the shipped YAMLs, reading those files (`cache_dir`: where datasets
    keeps their Arrow copy; it must outlive the evaluation), every other one through lm-eval's own YAML
    (lm_eval/tasks/**, as core.tasksets finds it), reading the local datasets cache offline. Loaded by
    lm_eval's TaskManager from each task's YAML, without indexing all of lm-eval's 14 000 tasks."""
    hub_offline()
    from lm_eval.tasks import TaskManager

    manager, tasks = TaskManager(include_defaults=False), {}
    with quiet_progress_bars():
        for i, name in enumerate(names, 1):
            spec = task_config(name, files[name], cache_dir) if name in files else str(harness_yaml(name))
            try:
                tasks[name] = manager.load([spec])["tasks"][name]
            except Exception as exc:  # lm_eval and datasets raise many kinds; the task is what the user needs
                where = (f"files {', '.join(str(p) for p in files[name].values())}" if name in files
                         else f"dataset {describe_dataset(harness_dataset(name))}")
                detail = " ".join(str(exc).split())[:300]
                raise TaskDataError(f"zero-shot task {name!r} ({where}) could not be loaded: "
                                    f"{type(exc).__name__}: {detail}") from None
            log.info("zero-shot task %d/%d %s: %d documents (%s)", i, len(names), name, len(tasks[name].eval_docs),
                     "files" if name in files else "datasets cache")
    return tasks


def _number(value) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def summarize(results: dict, names: list[str]) -> dict:
    """Per task acc/acc_norm (where the task defines them, plus LAMBADA's perplexity) with stderrs and
    sample counts from lm_eval's `results`, and the means over tasks: `acc` over every task's acc, and
    `acc_norm` over acc_norm where a task defines it, else its acc (the lm-eval leaderboard convention).
    The stderr of a mean is sqrt(Σ stderr²)/n (tasks independent)."""
    tasks = {}
    for name in names:
        raw = results["results"][name]
        row = {}
        for metric in METRICS:
            if f"{metric},none" in raw:
                row[metric] = _number(raw[f"{metric},none"])
                row[f"{metric}_stderr"] = _number(raw.get(f"{metric}_stderr,none"))
        counts = results.get("n-samples", {}).get(name, {})
        row["n"] = int(counts.get("effective", counts.get("original", 0)))
        tasks[name] = row
    mean = {}
    for metric in ("acc", "acc_norm"):
        picked = [t.get(metric) if t.get(metric) is not None else t.get("acc") for t in tasks.values()]
        errs = [t.get(f"{metric}_stderr") if t.get(metric) is not None else t.get("acc_stderr") for t in tasks.values()]
        if picked and all(v is not None for v in picked):
            mean[metric] = sum(picked) / len(picked)
            mean[f"{metric}_stderr"] = (math.sqrt(sum(e * e for e in errs)) / len(errs)
                                        if all(e is not None for e in errs) else None)
    return {"tasks": tasks, "mean": mean}


def _in_chunks(method, what: str, batch_size: int):
    """`method` (an HFLM request method) run on consecutive chunks of its requests, one task's at a time
    and a whole number of batches each, about PROGRESS_LINES of them, with a progress line (done/total,
    elapsed, ETA, the task) after each. Results come back in the requests' order, as lm_eval expects."""
    def run(requests, disable_tqdm: bool = False):
        total = len(requests)
        progress = Progress(what, total)
        step = batch_size * max(1, math.ceil(total / (batch_size * PROGRESS_LINES)))
        out, done = [], 0
        for task, group in itertools.groupby(requests, key=lambda r: r.task_name):
            group = list(group)
            for start in range(0, len(group), step):
                chunk = group[start:start + step]
                out.extend(method(chunk, disable_tqdm=True))
                done += len(chunk)
                progress(done, extra=f"task {task}")
        return out
    return run


def evaluate_zeroshot(model, tokenizer, tasks: dict, *, batch_size: int = 32, limit: int | None = None,
                      bootstrap_iters: int = 1000, seed: int = 0, label: str = "") -> dict:
    """Runs lm_eval on the in-memory `model` (wrapped as HFLM: no re-load, no re-save) for `tasks` (from
    `load_tasks`); returns `summarize`'s dict. Logs 'zeroshot <label> <request type> i/n · elapsed ·
    ETA' lines as the requests are scored."""
    hub_offline()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    was_training = model.training
    model.eval()
    try:
        with quiet_progress_bars():
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
            for kind in REQUEST_TYPES:
                setattr(lm, kind, _in_chunks(getattr(lm, kind), " ".join(filter(None, ("zeroshot", label, kind))),
                                             batch_size))
            # the Task objects are loaded already: a manager without lm-eval's default index (36 s to build)
            results = simple_evaluate(model=lm, tasks=list(tasks.values()), limit=limit,
                                      bootstrap_iters=bootstrap_iters, log_samples=False,
                                      task_manager=TaskManager(include_defaults=False), random_seed=seed,
                                      numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
    finally:
        model.train(was_training)
    return summarize(results, list(tasks))


def flat_metrics(summary: dict) -> dict[str, float]:
    """MLflow metric names → values: zeroshot.<task>.<metric> and zeroshot.mean.<metric> (stderrs too)."""
    rows = {**summary["tasks"], "mean": summary["mean"]}
    return {f"zeroshot.{task}.{key}": float(value) for task, row in rows.items() for key, value in row.items()
            if key != "n" and value is not None}
