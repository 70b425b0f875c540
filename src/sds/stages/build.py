"""The built-in demo's stages: the generated corpus, the small model trained on it, its zero-shot tasks."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from ..core.layout import BUILD_RECORD
from ..core.runtime import Progress, seed
from ..storage.atomic import atomic_dir
from ..storage.checksums import checksum_folder
from ..storage.documents import write_json
from ..tracking.stage_runs import track_stage

log = logging.getLogger("sds")


def corpus(config: dict, out: str) -> None:
    """Writes train.txt / test.txt: the generated corpus, or copies of configured text files."""
    from ..demo.corpus import builtin_splits

    started = time.time()
    spec = config["model"]["builtin"]["corpus"]
    with atomic_dir(out) as tmp:
        if spec["source"] == "generated":
            splits = builtin_splits(spec["documents"], spec["test_documents"], config["seed"])
        else:
            splits = {"train": Path(spec["train_path"]).read_text(encoding="utf-8"),
                      "test": Path(spec["test_path"]).read_text(encoding="utf-8")}
        for name, text in splits.items():
            if len(text.split()) < 1000:
                raise ValueError(f"corpus split {name!r} has only {len(text.split())} words; at least 1000 needed")
            (tmp / f"{name}.txt").write_text(text, encoding="utf-8")
    log.info("corpus: train %d chars, test %d chars", len(splits["train"]), len(splits["test"]))
    track_stage(config, "corpus", started=started, params=spec,
                metrics={f"{k}_characters": len(v) for k, v in splits.items()})


def build_model(config: dict, corpus_dir: str, out: str) -> None:
    """Trains the embedded default model (tokenizer + small OPT or LLaMA) on the corpus's train split."""
    from ..demo.builder import build_model as train

    started = time.time()
    seed(config)  # training runs on the CPU with its own thread count
    b = config["model"]["builtin"]
    torch.set_num_threads(b["threads"])
    text = (Path(corpus_dir) / "train.txt").read_text(encoding="utf-8")
    progress = Progress("train step", b["steps"])
    start = time.monotonic()
    with atomic_dir(out) as tmp:
        info = train(text, tmp, vocab_size=b["vocab_size"], layers=b["layers"], hidden=b["hidden"],
                     ffn=b["ffn"], heads=b["heads"], max_positions=b["max_positions"], steps=b["steps"],
                     batch_size=b["batch_size"], seqlen=b["seqlen"], lr=b["lr"], seed=config["seed"],
                     architecture=b["architecture"], kv_heads=b["kv_heads"],
                     progress=lambda s, n, loss, _e: progress(s, n, f"loss {loss:.3f}") if s % 250 == 0 else None)
        info["seconds"] = time.monotonic() - start
        checksum_folder(tmp)
        write_json(tmp / BUILD_RECORD, info)
    log.info("model built in %.1fs: %d parameters, final train loss %.3f", info["seconds"], info["parameters"],
             info["final_train_loss"])
    track_stage(config, "build_model", started=started, params=b,
                metrics=[("train_loss", v, (i + 1) * 10) for i, v in enumerate(info["loss_curve"])] +
                [("parameters", info["parameters"], 0)])


def zeroshot_tasks(config: dict, out: str) -> None:
    """Writes the embedded default's own multiple-choice tasks, generated from the corpus grammar, as
    <task>/test.jsonl: the local data files that the built-in task YAMLs (sds/evaluation/tasks/) read."""
    from ..demo.tasks import write_builtin_tasks

    n = config["evaluate"]["zeroshot"]["builtin_items"]
    with atomic_dir(out) as tmp:
        write_builtin_tasks(tmp, n, config["seed"])  # no MLflow record: n is in each evaluation
