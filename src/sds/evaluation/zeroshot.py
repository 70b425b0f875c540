"""Zero-shot multiple-choice accuracy with lm-eval-harness 0.4 on the in-memory model.

The task YAMLs ship in `sds/evaluation/tasks/` and read local data files only (`dataset_path: json` + `data_files`
relative to a data directory), so nothing is downloaded: `<data_dir>/<task>/<split>.jsonl` (or `.parquet`).
Two task sets mirror the papers' tables (SDS: COPA, LAMBADA, OpenBookQA, PIQA, RTE, StoryCloze,
WinoGrande; Wanda: BoolQ, RTE, HellaSwag, WinoGrande, ARC-e, ARC-c, OpenBookQA); the embedded default
model has its own three tasks, generated from the corpus grammar by the pipeline (`builtin`).

Layout: task names and files are resolved in `core.tasksets` (no lm_eval import, used by config validation);
`evaluate_zeroshot` is the only function that runs lm_eval.
"""
from __future__ import annotations

import logging
import math
import tempfile
from pathlib import Path

from ..core.tasksets import TASKS_DIR
from ..data.texts import hub_offline

METRICS = ("acc", "acc_norm", "perplexity")
log = logging.getLogger("sds")


def task_configs(files: dict, cache_dir: str | Path) -> list[dict]:
    """lm_eval task configs (dicts, `!function`s resolved) reading the given local files."""
    from lm_eval.tasks._yaml_loader import load_yaml

    configs = []
    for name, splits in files.items():
        cfg = load_yaml(TASKS_DIR / f"{name}.yaml", resolve_func=True)
        parquet = {p.suffix for p in splits.values()} == {".parquet"}
        cfg["dataset_path"] = "parquet" if parquet else "json"
        cfg["dataset_kwargs"] = {"data_files": {s: str(p) for s, p in splits.items()}, "cache_dir": str(cache_dir)}
        configs.append(cfg)
    return configs


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


def evaluate_zeroshot(model, tokenizer, files: dict, *, batch_size: int = 32, limit: int | None = None,
                      bootstrap_iters: int = 1000, seed: int = 0) -> dict:
    """Runs lm_eval on the in-memory `model` (wrapped as HFLM: no re-load, no re-save) for the tasks of
    `files` (from `task_files`); returns `summarize`'s dict."""
    hub_offline()
    import datasets
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    was_training = model.training
    model.eval()
    # lm_eval's INFO lines and its expected warning about an in-memory model would swamp the stage's log
    quiet = {"lm_eval": logging.WARNING, "lm_eval.models.huggingface": logging.ERROR, "datasets": logging.WARNING}
    levels = {name: logging.getLogger(name).level for name in quiet}
    for name, level in quiet.items():
        logging.getLogger(name).setLevel(level)
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        with tempfile.TemporaryDirectory(prefix="sds-zeroshot-") as cache:
            results = simple_evaluate(model=lm, tasks=task_configs(files, cache), limit=limit,
                                      bootstrap_iters=bootstrap_iters, log_samples=False,
                                      task_manager=TaskManager(include_defaults=False), random_seed=seed,
                                      numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        if bars:
            datasets.enable_progress_bars()
        model.train(was_training)
    return summarize(results, list(files))


def flat_metrics(summary: dict) -> dict[str, float]:
    """MLflow metric names → values: zeroshot.<task>.<metric> and zeroshot.mean.<metric> (stderrs too)."""
    rows = {**summary["tasks"], "mean": summary["mean"]}
    return {f"zeroshot.{task}.{key}": float(value) for task, row in rows.items() for key, value in row.items()
            if key != "n" and value is not None}
