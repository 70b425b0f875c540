"""Zero-shot evaluation: the shipped task YAMLs on local data, the embedded default's own tasks, the
evaluate stage's results and the report's zero-shot table (lm-eval-harness on in-memory models)."""
import csv
import json
import math
import re

import pytest
import torch

from sds.core import tasksets
from sds.tracking.entries import shown
from sds.evaluation import zeroshot
from sds.core.errors import ConfigError
from sds.core.config import validate_config
from sds.demo.corpus import CHOICE_TASKS, NUMBERS, choice_items, generate_corpus

# --- tiny records in the real formats of each task's Hugging Face dataset --------------------------------

_ARC = {"id": "Mercury_7175875", "question": "Which of these is a source of light?",
        "choices": {"text": ["a mirror", "the Sun", "the Moon at noon", "a rock"], "label": ["A", "B", "C", "D"]},
        "answerKey": "B"}
RECORDS = {
    "copa": [{"premise": "The man turned on the faucet.", "choice1": "The toilet filled with water.",
              "choice2": "Water flowed from the spout.", "question": "effect", "idx": 0, "label": 1},
             {"premise": "My body cast a shadow over the grass.", "choice1": "The sun was rising.",
              "choice2": "The grass was cut.", "question": "cause", "idx": 1, "label": 0}],
    "lambada_openai": [{"text": "She opened the door and the dog ran out into the garden"},
                       {"text": "He picked up the phone and called his mother"}],
    "openbookqa": [{"id": "7-980", "question_stem": "The sun is responsible for",
                    "choices": {"text": ["puppies learning new tricks", "children growing up",
                                         "flowers wilting in a vase", "plants sprouting and growing"],
                                "label": ["A", "B", "C", "D"]}, "answerKey": "D"}],
    "piqa": [{"goal": "How do I ready a guinea pig cage?", "sol1": "Put fresh bedding in it.",
              "sol2": "Put fresh bedding on the roof.", "label": 0}],
    "rte": [{"sentence1": "Dana Reeve died of lung cancer.", "sentence2": "Dana Reeve had cancer.", "label": 0,
             "idx": 0},
            {"sentence1": "The cat sat on the mat.", "sentence2": "The dog sat on the mat.", "label": 1, "idx": 1}],
    "storycloze_2016": [{"story_id": "138d5bfb", "input_sentence_1": "Rick grew up in a troubled household.",
                         "input_sentence_2": "He never found good support in family.",
                         "input_sentence_3": "He turned to gangs.", "input_sentence_4": "It did not go well.",
                         "sentence_quiz1": "He is happy now.", "sentence_quiz2": "He joined a gang.",
                         "answer_right_ending": 1}],
    "winogrande": [{"sentence": "Sarah was a much better surgeon than Maria so _ always got the harder cases.",
                    "option1": "Sarah", "option2": "Maria", "answer": "1"},
                   {"sentence": "The trophy doesn't fit into the suitcase because _ is too large.",
                    "option1": "trophy", "option2": "suitcase", "answer": "1"}],
    "boolq": [{"question": "is the sun a star", "passage": "The Sun is the star at the centre of the Solar System.",
               "idx": 0, "label": 1}],
    "hellaswag": [{"ind": 24, "activity_label": "Roof shingle removal",
                   "ctx_a": "A man is sitting on a roof.", "ctx_b": "he", "ctx": "A man is sitting on a roof. he",
                   "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                               "is holding a rubik's cube.", "starts pulling up roofing on a roof."],
                   "source_id": "activitynet~v_-JhWjGDPHMY", "split": "val", "split_type": "indomain",
                   "label": "3"}],
    "arc_easy": [_ARC],
    "arc_challenge": [dict(_ARC, id="Mercury_SC_415702")],
}
WITH_ACC_NORM = {"openbookqa", "piqa", "hellaswag", "arc_easy", "arc_challenge"}


def write_records(root, tasks=RECORDS, suffix=".jsonl"):
    for name in tasks:
        for split, rel in tasksets.task_spec(name)["dataset_kwargs"]["data_files"].items():
            path = (root / rel).with_suffix(suffix)
            path.parent.mkdir(parents=True, exist_ok=True)
            if suffix == ".parquet":
                import pandas as pd

                pd.DataFrame(RECORDS[name]).to_parquet(path)
            else:
                path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS[name]))
    return root


@pytest.fixture(scope="module")
def random_lm():
    """A random tiny OPT with a BPE tokenizer trained on generated text (no training of the model)."""
    from transformers import OPTForCausalLM

    from sds.demo.builder import make_opt_config, train_tokenizer

    tok = train_tokenizer(generate_corpus(30, 0), 300)
    torch.manual_seed(0)
    model = OPTForCausalLM(make_opt_config(tok, layers=1, hidden=16, ffn=32, heads=2, max_positions=512)).eval()
    return model, tok


# --- task names, files and config ------------------------------------------------------------------------

def test_task_sets_name_shipped_yamls():
    assert tasksets.resolve_tasks("sds") == ["copa", "lambada_openai", "openbookqa", "piqa", "rte",
                                             "storycloze_2016", "winogrande"]
    assert tasksets.resolve_tasks("wanda") == ["boolq", "rte", "hellaswag", "winogrande", "arc_easy",
                                               "arc_challenge", "openbookqa"]
    assert tasksets.resolve_tasks(["sds", "wanda", "builtin"])[-3:] == list(CHOICE_TASKS)
    assert len(tasksets.resolve_tasks(["sds", "wanda"])) == 11
    assert tasksets.resolve_tasks(["rte", "copa", "rte"]) == ["rte", "copa"]
    with pytest.raises(ValueError, match="unknown zero-shot task 'hellaswagg'"):
        tasksets.resolve_tasks(["hellaswagg"])
    for name in tasksets.available_tasks():
        spec = tasksets.task_spec(name)
        assert spec["task"] == name and spec["dataset_path"] == "json"
        assert all(rel.startswith(f"{name}/") for rel in spec["dataset_kwargs"]["data_files"].values())
        assert name in RECORDS or name in CHOICE_TASKS, f"{name}: no test records"


def test_config_reports_missing_task_data_before_any_work(tmp_path):
    base = {"run": "t", "evaluate": {"zeroshot": {"tasks": ["sds"], "data_dir": str(tmp_path)}}}
    with pytest.raises(ConfigError) as err:
        validate_config(base)
    assert "'copa'" in str(err.value) and str(tmp_path / "copa" / "validation.jsonl") in str(err.value)
    write_records(tmp_path)
    assert validate_config(base)["evaluate"]["zeroshot"]["tasks"] == ["sds"]
    with pytest.raises(ConfigError, match="evaluate.zeroshot.data_dir' is required .* boolq"):
        validate_config({"run": "t", "evaluate": {"zeroshot": {"tasks": "wanda"}}})
    with pytest.raises(ConfigError, match="evaluate.zeroshot.tasks.*'piqq'"):
        validate_config({"run": "t", "evaluate": {"zeroshot": {"tasks": ["piqq"]}}})
    # built-in tasks are made by the pipeline: nothing to check up front; disabled: nothing at all
    validate_config({"run": "t"})
    validate_config({"run": "t", "evaluate": {"zeroshot": {"enabled": False, "tasks": "sds"}}})


def test_missing_task_file_fails_the_stage_before_evaluation(tmp_path, capsys):
    """The stage checks every task's file before it loads the model (here: a model that does not exist)."""
    from sds.cli import main

    write_records(tmp_path / "data")
    (tmp_path / "data" / "winogrande" / "validation.jsonl").unlink()
    cfg = validate_config({"run": "t", "mlflow": {"enabled": False}})
    # as if the file went missing after the config was validated
    cfg["evaluate"]["zeroshot"].update(tasks=["copa", "winogrande"], data_dir=str(tmp_path / "data"))
    config_json = tmp_path / "config.json"
    config_json.write_text(json.dumps(cfg))
    rc = main(["evaluate", "--config", str(config_json), f"model_dir={tmp_path / 'no-model'}",
               f"out={tmp_path / 'e.json'}"])
    err = capsys.readouterr().err
    assert rc == 1 and "winogrande" in err and str(tmp_path / "data" / "winogrande" / "validation.jsonl") in err
    from sds.stages import evaluate as stages

    with pytest.raises(tasksets.TaskDataError, match=r"task 'winogrande': data file .*validation.jsonl"):
        stages.evaluate(cfg, model_dir=str(tmp_path / "no-model"), corpus_dir=None, out=str(tmp_path / "e.json"))
    assert not (tmp_path / "e.json").exists()


# --- the shipped YAMLs, end to end on local files --------------------------------------------------------

def test_every_shipped_task_runs_offline_on_local_records(tmp_path, random_lm, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tok = random_lm
    names = tasksets.resolve_tasks(["sds", "wanda"])
    files = tasksets.task_files(names, write_records(tmp_path), None)
    tasks = zeroshot.load_tasks(names, files, tmp_path / "arrow")
    out = zeroshot.evaluate_zeroshot(model, tok, tasks, batch_size=8, bootstrap_iters=0)
    assert list(out["tasks"]) == names
    for name, row in out["tasks"].items():
        assert row["n"] == len(RECORDS[name]), name
        assert round(row["acc"] * row["n"], 9).is_integer(), (name, row)  # a count of right answers over n
        assert ("acc_norm" in row) == (name in WITH_ACC_NORM), name
    # two tasks recomputed independently: the model's log-likelihoods of each continuation, summed directly
    piqa = [[_loglikelihood(model, tok, f"Question: {d['goal']}\nAnswer:", " " + c) for c in (d["sol1"], d["sol2"])]
            for d in RECORDS["piqa"]]
    assert min(abs(lls[0][0] - lls[1][0]) for lls in piqa) > 1e-3, "a near tie would make the comparison fragile"
    assert out["tasks"]["piqa"]["acc"] == _mean(max((0, 1), key=lambda i: lls[i][0]) == d["label"]
                                                for lls, d in zip(piqa, RECORDS["piqa"]))
    lengths = [(len(d["sol1"]), len(d["sol2"])) for d in RECORDS["piqa"]]
    assert out["tasks"]["piqa"]["acc_norm"] == _mean(
        max((0, 1), key=lambda i: lls[i][0] / n[i]) == d["label"] for lls, n, d in zip(piqa, lengths, RECORDS["piqa"]))
    lambada = [_loglikelihood(model, tok, d["text"].rsplit(" ", 1)[0], " " + d["text"].rsplit(" ", 1)[1])
               for d in RECORDS["lambada_openai"]]
    assert out["tasks"]["lambada_openai"]["perplexity"] == pytest.approx(
        math.exp(-sum(ll for ll, _ in lambada) / len(lambada)), rel=1e-4)
    assert out["tasks"]["lambada_openai"]["acc"] == _mean(greedy for _, greedy in lambada)
    accs = [row["acc"] for row in out["tasks"].values()]
    assert out["mean"]["acc"] == pytest.approx(sum(accs) / len(accs))
    assert not model.training


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def _loglikelihood(model, tok, context: str, continuation: str) -> tuple[float, bool]:
    """log P(continuation | context) and whether it is the greedy continuation, computed the way the
    harness defines it (context and continuation tokenized together, no special tokens), without it."""
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    n_context = len(tok(context, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=torch.tensor([whole])).logits[0].double(), dim=-1)
    targets = torch.tensor(whole[n_context:])
    picked = logprobs[n_context - 1:len(whole) - 1]
    return float(picked.gather(1, targets[:, None]).sum()), bool((picked.argmax(-1) == targets).all())


def test_parquet_data_and_limit(tmp_path, random_lm):
    model, tok = random_lm
    files = tasksets.task_files(["rte", "winogrande"], write_records(tmp_path, ["rte", "winogrande"], ".parquet"), None)
    assert files["rte"]["validation"].suffix == ".parquet"
    out = zeroshot.evaluate_zeroshot(model, tok, zeroshot.load_tasks(list(files), files, tmp_path / "arrow"),
                                     batch_size=4, limit=1)
    assert {row["n"] for row in out["tasks"].values()} == {1}


def test_summary_means_and_stderrs():
    results = {"results": {"a": {"acc,none": 0.5, "acc_stderr,none": 0.03, "alias": "a"},
                           "b": {"acc,none": 0.7, "acc_stderr,none": 0.04, "acc_norm,none": 0.9,
                                 "acc_norm_stderr,none": "N/A"}},
               "n-samples": {"a": {"original": 10, "effective": 10}, "b": {"original": 20, "effective": 5}}}
    out = zeroshot.summarize(results, ["a", "b"])
    assert out["tasks"]["a"] == {"acc": 0.5, "acc_stderr": 0.03, "n": 10}
    assert out["tasks"]["b"]["acc_norm_stderr"] is None and out["tasks"]["b"]["n"] == 5
    assert out["mean"]["acc"] == pytest.approx(0.6)
    assert out["mean"]["acc_stderr"] == pytest.approx(0.025)  # sqrt(0.03² + 0.04²) / 2
    assert out["mean"]["acc_norm"] == pytest.approx(0.7)  # a has no acc_norm: its acc counts
    assert out["mean"]["acc_norm_stderr"] is None
    metrics = zeroshot.flat_metrics(out)
    assert metrics["zeroshot.b.acc_norm"] == 0.9 and metrics["zeroshot.mean.acc"] == pytest.approx(0.6)
    assert "zeroshot.b.acc_norm_stderr" not in metrics and not any(k.endswith(".n") for k in metrics)


# --- the embedded default's own tasks ------------------------------------------------------------------------

def test_builtin_items_are_deterministic_and_well_formed():
    for task, n_choices in zip(CHOICE_TASKS, (2, 4, 3)):
        items = choice_items(task, 40, 3)
        assert items == choice_items(task, 40, 3) and items != choice_items(task, 40, 4)
        assert all(len(it["choices"]) == n_choices == len(set(it["choices"])) for it in items)
        labels = [it["label"] for it in items]
        assert set(labels) == set(range(n_choices)), "the right answer is not always in the same place"
        assert all(c.startswith(" ") and c.endswith(" .") for it in items for c in it["choices"])
    for it in choice_items("sds_count", 30, 0):
        announced = NUMBERS.index(re.search(r"There were (\w+) things at [^:]+:$", it["context"]).group(1)) + 2
        right = it["choices"][it["label"]]
        assert right.count(" , ") + 2 == announced
    for it in choice_items("sds_agreement", 30, 0):
        right, wrong = it["choices"][it["label"]], it["choices"][1 - it["label"]]
        diff = [(a, b) for a, b in zip(right.split(), wrong.split()) if a != b]
        assert len(diff) == 1 and diff[0][0].rstrip("es") == diff[0][1].rstrip("es")
    with pytest.raises(ValueError, match="unknown built-in task"):
        choice_items("sds_nope", 1, 0)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small model trained on the generated corpus: enough to learn the grammar the tasks probe."""
    from sds.demo.builder import build_model

    root = tmp_path_factory.mktemp("trained")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model trains faster on one thread, and much faster on a busy machine
    try:  # about 10 s: the topic and agreement tasks are learnt, list counting is not yet
        build_model(generate_corpus(200, 0), root / "model", vocab_size=1024, layers=2, hidden=64, ffn=128, heads=4,
                    max_positions=256, steps=200, batch_size=8, seqlen=128, lr=0.006, seed=0)
    finally:
        torch.set_num_threads(threads)
    return root


def _magnitude_weights(model, sparsity) -> dict:
    """Every decoder linear's weight, magnitude-pruned (a checkpoint's weights.safetensors content)."""
    from sds.model.decoder import decoder_layers, decoder_layers_prefix, find_linears
    from sds.core.patterns import parse_pattern
    from sds.algorithms.dispatch import prune

    pattern, prefix = parse_pattern(f"unstructured:{sparsity}"), decoder_layers_prefix(model)
    return {f"{prefix}.{i}.{name}.weight": prune("magnitude", lin.weight.detach(), pattern, {})[0]
            for i, layer in enumerate(decoder_layers(model)) for name, lin in find_linears(layer).items()}


def test_builtin_tasks_discriminate_dense_from_heavily_pruned(trained, monkeypatch):
    """Through the pipeline's own stages: zeroshot_tasks writes the tasks, evaluate scores a checkpoint
    (dense, then 90% magnitude-pruned weights) and logs the results to its JSON and MLflow metrics."""
    from sds.stages import build as build_stages
    from sds.stages import evaluate as stages
    from sds.storage.documents import read_json
    from sds.storage.safetensors import save_tensors
    from sds.model.loading import load_model

    (trained / "held_out.txt").write_text(generate_corpus(10, 99))
    cfg = validate_config({"run": "t", "threads": 1, "mlflow": {"enabled": False},
                           "evaluate": {"datasets": {"held_out": str(trained / "held_out.txt")},
                                        "zeroshot": {"builtin_items": 150}}})
    build_stages.zeroshot_tasks(cfg, out=str(trained / "tasks"))
    assert sorted(p.name for p in (trained / "tasks").iterdir() if p.is_dir()) == sorted(CHOICE_TASKS)
    tracked = []
    monkeypatch.setattr(stages, "track_stage", lambda config, stage, **kw: tracked.append((stage, kw["metrics"])))
    stages.evaluate(cfg, model_dir=str(trained / "model"), corpus_dir=None, out=str(trained / "dense.json"),
                    tasks_dir=str(trained / "tasks"))
    model, _ = load_model(trained / "model")
    save_tensors(trained / "pruned.safetensors", _magnitude_weights(model, 0.9))
    stages.evaluate(cfg, model_dir=str(trained / "model"), corpus_dir=None, out=str(trained / "pruned.json"),
                    weights=str(trained / "pruned.safetensors"), stage="prune1", method="magnitude",
                    pattern="unstructured90", tasks_dir=str(trained / "tasks"))
    dense, pruned = (read_json(trained / f) for f in ("dense.json", "pruned.json"))
    assert pruned["sparsity"] == pytest.approx(0.9, abs=0.01)
    chance = (1 / 2 + 1 / 4 + 1 / 3) / 3
    d, p = dense["zeroshot"]["mean"], pruned["zeroshot"]["mean"]
    print(f"dense {dense['zeroshot']['tasks']}\npruned {pruned['zeroshot']['tasks']}")
    assert d["acc"] > chance + 4 * d["acc_stderr"], "the dense model scores clearly above chance"
    assert p["acc"] < d["acc"] - 3 * (d["acc_stderr"] ** 2 + p["acc_stderr"] ** 2) ** 0.5, "heavy pruning lowers it"
    assert {t: r["n"] for t, r in dense["zeroshot"]["tasks"].items()} == {t: 150 for t in CHOICE_TASKS}
    assert dense["ppl"]["held_out"] < pruned["ppl"]["held_out"]
    metrics = dict(tracked)["evaluate/dense"]
    # MLflow gets the figure as it shows it (rounded), the eval JSON keeps it exact
    assert metrics["zeroshot.mean.acc"] == shown(d["acc"]) and "zeroshot.sds_count.acc_norm" in metrics


# --- the report --------------------------------------------------------------------------------------------

def _eval(stage, method="", pattern="", recon="", acc=0.5):
    tasks = {"sds_agreement": {"acc": acc, "acc_stderr": 0.02, "acc_norm": acc, "acc_norm_stderr": 0.02, "n": 300},
             "copa": {"acc": acc - 0.1, "acc_stderr": 0.05, "n": 100}}
    return {"stage": stage, "method": method, "pattern": pattern, "recon": recon, "ppl": {"builtin": 10 / acc},
            "windows": {"builtin": 4}, "sparsity": 0.0 if stage == "dense" else 0.5,
            "zeroshot": zeroshot.summarize({"results": {t: {f"{k},none": v for k, v in r.items() if k != "n"}
                                                        for t, r in tasks.items()},
                                            "n-samples": {t: {"effective": r["n"]} for t, r in tasks.items()}},
                                           list(tasks))}


def test_report_has_zero_shot_table_and_csv_and_keeps_summary_columns(tmp_path):
    from sds.report.report import SUMMARY_COLUMNS, build_report
    from sds.storage.documents import write_json

    cfg = validate_config({"run": "t"})
    evals = []
    for i, r in enumerate([_eval("dense", acc=0.9), _eval("prune1", "sparsegpt", "2:4", acc=0.6),
                           _eval("prune1+adjust", "sparsegpt", "2:4", acc=0.65),
                           _eval("sds", "sparsegpt", "2:4", "default", acc=0.7)]):
        evals.append(str(tmp_path / f"e{i}.json"))
        write_json(tmp_path / f"e{i}.json", r, output=True)  # as the evaluation writes it, with its checksum
    out = tmp_path / "report"
    build_report(cfg, evals, [], out, tmp_path / "summary.csv", str(tmp_path), [])
    md = (out / "report.md").read_text()
    assert "## Zero-shot accuracy (lm-eval-harness)" in md
    assert "| sparsegpt | 2:4 | sds_agreement | 0.900 ± 0.020 | 0.600 ± 0.020 | 0.650 ± 0.020 | 0.700 ± 0.020 | " \
           "default | +0.100 |" in md
    assert "| sparsegpt | 2:4 | **mean** | 0.850 ± 0.027 |" in md
    with (tmp_path / "summary.csv").open() as fh:
        assert next(csv.reader(fh)) == SUMMARY_COLUMNS
    rows = list(csv.DictReader((out / "zeroshot.csv").open()))
    assert len(rows) == 4 * 3 and {r["task"] for r in rows} == {"sds_agreement", "copa", "mean"}
    sds_mean = next(r for r in rows if r["stage"] == "sds" and r["task"] == "mean")
    assert sds_mean["acc"] == "0.6500" and sds_mean["acc_norm"] == "0.6500" and sds_mean["recon"] == "default"
    assert next(r for r in rows if r["task"] == "copa")["acc_norm"] == ""
    merged = list(csv.DictReader((tmp_path / "zeroshot_summary.csv").open()))
    assert merged == rows
