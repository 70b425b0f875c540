"""Zero-shot from the local Hugging Face datasets cache with lm-eval's own task names and YAMLs (offline),
the refusal of the built-in tasks for an external model, and the evaluate stage's log: progress lines with
an ETA (perplexity per decoder layer, zero-shot per batch of requests) and no third-party progress bar."""
import hashlib
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT, save_tiny_opt_folder
from sds.core import tasksets
from sds.evaluation import zeroshot
from sds.core.config import validate_config
from sds.core.errors import ConfigError, TaskDataError
from sds.demo.corpus import generate_corpus
from test_zeroshot import RECORDS, _loglikelihood, write_records

# the tasks run here, by lm-eval's names, with the Hub dataset, config and splits their lm-eval YAMLs read
RTE = ("nyu-mll/glue", "rte", {"train": RECORDS["rte"][:1], "validation": RECORDS["rte"]})
PIQA = ("baber/piqa", None, {"train": RECORDS["piqa"], "validation": RECORDS["piqa"] * 3})


def cache_dataset(cache, repo_id: str, config: str | None, splits: dict, tmp) -> None:
    """Stores `splits` (records per split) in the datasets cache folder `cache` where `load_dataset(repo_id,
    config)` finds a Hub dataset offline: <namespace>___<name>/<config>/<version>/<hash>/ with Arrow files
    and dataset_info.json, written by datasets' own builder (the json one, from records written here); the
    hash folder is the content's, and load_dataset picks the latest one."""
    from datasets.packaged_modules.json.json import Json
    from datasets.naming import camelcase_to_snakecase

    namespace, name = repo_id.split("/")
    files = {}
    for split, records in splits.items():
        files[split] = str(tmp / f"{name}-{config}-{split}.jsonl")
        with open(files[split], "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in records)
    builder = Json(cache_dir=str(tmp / "build"), dataset_name=name, config_name=config or "default",
                   config_id=config or "default", data_files=files)
    builder.download_and_prepare(output_dir=str(cache / f"{namespace}___{camelcase_to_snakecase(name)}" /
                                                (config or "default") / "0.0.0" /
                                                hashlib.sha1(json.dumps(splits).encode()).hexdigest()))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty datasets cache of the test's own, offline (as the pipeline runs)."""
    import datasets

    root = tmp_path / "hf-datasets"
    monkeypatch.setenv("HF_DATASETS_CACHE", str(root))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", root)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    return root


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random OPT (2 decoder layers) and a BPE tokenizer, saved as an external model folder."""
    return save_tiny_opt_folder(tmp_path_factory.mktemp("zs-cache") / "model", documents=60, vocab=400, hidden=16, ffn=32)


def external(model_dir, tmp_path, **zeroshot) -> dict:
    text = tmp_path / "text.txt"
    text.write_text(generate_corpus(4, 3))
    return {"run": "t", "threads": 1, "mlflow": {"enabled": False}, "model": {"source": str(model_dir)},
            "calibration": {"source": str(text), "seqlen": 32},
            "evaluate": {"seqlen": 32, "datasets": {"text": str(text)}, "zeroshot": zeroshot}}


def test_lm_eval_task_names_find_lm_evals_own_yamls():
    """The task → YAML lookup (no lm_eval import) agrees with lm-eval's own index of that YAML's folder,
    and the dataset it reads (includes merged) with lm-eval's own YAML loader."""
    from lm_eval.tasks._index import TaskIndex
    from lm_eval.tasks._yaml_loader import load_yaml

    for name in tasksets.resolve_tasks(["sds", "wanda", "mmlu_anatomy"], "datasets_cache"):
        path = tasksets.harness_yaml(name)
        assert path.is_relative_to(tasksets.harness_tasks_dir()), name
        assert TaskIndex.build([path.parent])[name].yaml_path.resolve() == path.resolve(), name
        theirs = load_yaml(path, resolve_func=False)
        data = tasksets.harness_dataset(name)
        assert (data["path"], data["name"]) == (theirs["dataset_path"], theirs.get("dataset_name")), name
        assert data["splits"] == [theirs[k] for k in tasksets.SPLIT_KEYS if theirs.get(k)], name
    assert tasksets.harness_dataset("arc_challenge")["name"] == "ARC-Challenge"  # through arc_easy.yaml
    with pytest.raises(ValueError, match="unknown zero-shot task 'rtee': .*lm-eval's own YAMLs"):
        tasksets.resolve_tasks(["rtee"], "datasets_cache")
    with pytest.raises(ValueError, match="unknown zero-shot task 'mmlu_anatomy'; expected a set"):
        tasksets.resolve_tasks(["mmlu_anatomy"])  # files: only the shipped YAMLs


def test_both_sets_through_lm_evals_own_yamls_score_as_the_shipped_ones(tmp_path, cache, model_dir):
    """Every task of the sds and wanda sets, run through lm-eval's own YAML from a datasets cache, scores
    exactly as our shipped YAML of it on the same records as files: the shipped YAMLs are lm-eval's."""
    from sds.model.loading import load_model

    model, tok = load_model(model_dir)
    names = tasksets.resolve_tasks(["sds", "wanda"], "datasets_cache")
    for name in names:
        data = tasksets.harness_dataset(name)
        cache_dataset(cache, data["path"], data["name"], {split: RECORDS[name] for split in data["splits"]}, tmp_path)
    assert set(tasksets.check_datasets_cache(names)) == set(names)
    cached = zeroshot.evaluate_zeroshot(model, tok, zeroshot.load_tasks(names, {}, tmp_path / "a"), batch_size=8,
                                        bootstrap_iters=0)
    files = tasksets.task_files(names, write_records(tmp_path / "files"), None)
    shipped = zeroshot.evaluate_zeroshot(model, tok, zeroshot.load_tasks(names, files, tmp_path / "b"), batch_size=8,
                                         bootstrap_iters=0)
    assert list(cached["tasks"]) == names
    for name in names:
        assert cached["tasks"][name]["n"] == len(RECORDS[name]), name
        assert cached["tasks"][name] == pytest.approx(shipped["tasks"][name], rel=1e-6, abs=1e-12), name


def test_external_model_with_builtin_tasks_is_refused(model_dir, tmp_path):
    for settings in ({}, {"tasks": "builtin"}, {"tasks": ["sds_count"], "source": "datasets_cache"}):
        with pytest.raises(ConfigError) as err:
            validate_config(external(model_dir, tmp_path, **settings))
        message = str(err.value)
        assert "'evaluate.zeroshot.tasks'" in message and "built-in model's generated tasks" in message
        assert str(model_dir) in message and "\n" not in message
    validate_config(external(model_dir, tmp_path, enabled=False))
    # the embedded default keeps its own tasks, unchanged
    default = validate_config({"run": "t"})["evaluate"]["zeroshot"]
    assert (default["tasks"], default["source"], default["enabled"]) == ("builtin", "files", True)
    assert tasksets.resolve_tasks(default["tasks"], default["source"]) == list(tasksets.BUILTIN_TASKS)


def test_missing_cached_dataset_named_at_validation_and_before_the_model(model_dir, tmp_path, cache):
    cfg = external(model_dir, tmp_path, source="datasets_cache", tasks=["rte", "arc_easy"])
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    message = str(err.value)
    assert "task 'rte': dataset 'nyu-mll/glue' (config 'rte') is not in the local datasets cache" in message
    assert str(cache) in message and "\n" not in message
    cache_dataset(cache, "nyu-mll/glue", "rte", {"validation": RECORDS["rte"]}, tmp_path)  # no train split
    with pytest.raises(ConfigError, match=r"task 'rte': dataset 'nyu-mll/glue' \(config 'rte'\) in the datasets "
                                          r"cache .* has no split 'train' \(it has validation"):
        validate_config(cfg)
    cache_dataset(cache, *RTE, tmp_path)
    with pytest.raises(ConfigError, match=r"task 'arc_easy': dataset 'allenai/ai2_arc' \(config 'ARC-Easy'\)"):
        validate_config(cfg)
    cfg["evaluate"]["zeroshot"]["tasks"] = ["rte"]
    resolved = validate_config(cfg)
    # the evaluate job checks again before it loads the model (here: a model folder that does not exist)
    from sds.stages import evaluate as stages

    resolved["evaluate"]["zeroshot"]["tasks"] = ["rte", "arc_easy"]
    with pytest.raises(TaskDataError, match=r"task 'arc_easy': dataset 'allenai/ai2_arc' .*not in the local"):
        stages.evaluate(resolved, model_dir=str(tmp_path / "no-model"), out=str(tmp_path / "e.json"))
    assert not (tmp_path / "e.json").exists()


def test_stage_scores_lm_eval_tasks_from_the_datasets_cache_with_progress_lines(model_dir, tmp_path, cache):
    """The evaluate stage as the workflow runs it (a process of its own, its stderr is the rule's log), on
    lm-eval's own rte and piqa YAMLs over a datasets cache made here, offline; the accuracies recomputed
    from the model's own log-likelihoods of lm-eval's prompts."""
    for repo_id, config, splits in (RTE, PIQA):
        cache_dataset(cache, repo_id, config, splits, tmp_path)
    cfg = validate_config(external(model_dir, tmp_path, source="datasets_cache", tasks=["rte", "piqa"],
                                   batch_size=2, bootstrap_iters=0))
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_DATASETS_CACHE": str(cache), "HF_HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "sds.cli", "evaluate", "--config", str(tmp_path / "config.json"),
                           f"model_dir={model_dir}", f"out={tmp_path / 'e.json'}"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    zs = json.loads((tmp_path / "e.json").read_text())["zeroshot"]
    assert {t: r["n"] for t, r in zs["tasks"].items()} == {"rte": 2, "piqa": 3}
    from sds.model.loading import load_model

    model, tok = load_model(model_dir)
    rte = [[_loglikelihood(model, tok, f"{d['sentence1']}\nQuestion: {d['sentence2']} True or False?\nAnswer:",
                           " " + c)[0] for c in ("True", "False")] for d in RECORDS["rte"]]
    piqa = [[_loglikelihood(model, tok, f"Question: {d['goal']}\nAnswer:", " " + c)[0] for c in (d["sol1"], d["sol2"])]
            for d in RECORDS["piqa"] * 3]
    for name, lls, docs in (("rte", rte, RECORDS["rte"]), ("piqa", piqa, RECORDS["piqa"] * 3)):
        assert min(abs(a - b) for a, b in lls) > 1e-3, "a near tie would make the comparison fragile"
        right = [max((0, 1), key=lambda i: ll[i]) == d["label"] for ll, d in zip(lls, docs)]
        assert zs["tasks"][name]["acc"] == sum(right) / len(right), name
    # progress: perplexity per decoder layer, zero-shot per batch of requests (2 per rte item, 2 per piqa)
    lines = log.splitlines()
    assert sum(bool(re.search(r"evaluate dense layer [12]/2 · elapsed [\d.]+s · ETA [\d.]+s", ln)) for ln in lines) == 2
    zs_lines = [ln for ln in lines if re.search(r"zeroshot dense loglikelihood \d+/10 · elapsed [\d.]+s · ETA", ln)]
    assert len(zs_lines) >= 2 and zs_lines[-1].count("10/10") == 1 and zs_lines[-1].endswith("task piqa"), zs_lines
    assert any(ln.endswith("task rte") for ln in zs_lines)
    assert any("zero-shot task 1/2 rte: 2 documents (datasets cache)" in ln for ln in lines)
    assert any(re.search(r"dense: zero-shot piqa acc = [\d.]+, acc_norm = [\d.]+ \(n = 3\)", ln) for ln in lines)
    # and no third-party progress bar (tqdm's "…| 3/3 [00:00<00:00, 9.2it/s]", lm-eval's request bars)
    bars = [ln for ln in re.split(r"[\r\n]", log)
            if re.search(r"\d+%\||it/s\]|s/it\]|Running loglikelihood|Generating \w+ split", ln)]
    assert not bars, bars[:5]
