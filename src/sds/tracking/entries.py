"""What the stages hand to MLflow, as plain data: metric keys per checkpoint, per-linear stepped metrics,
dataset inputs, registered model entries. No MLflow import here."""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from ..core.layout import place_of
from ..core.patterns import parse_pattern

# Model weights up to this size are copied into the artifact store; bigger ones are registered by
# reference (their folder's path), so a 7B checkpoint is not duplicated. A storage choice of the tracking
# destination, like MLFLOW_TRACKING_URI, so it is an environment variable and not part of the config hash.
COPY_WEIGHTS_ENV = "SDS_MLFLOW_COPY_WEIGHTS_MB"
COPY_WEIGHTS_DEFAULT_MB = 256


def checkpoint_id(method: str = "", pattern: str = "", recon: str = "", stage: str = "dense") -> str:
    """A checkpoint as a metric-key suffix: `dense`, `sparsegpt.2of4.prune1`, `sparsegpt.2of4.prune1_adjust`,
    `sparsegpt.2of4.default.sds` (pattern as its slug; '+' is not allowed in MLflow keys)."""
    if pattern and ":" in pattern:
        pattern = parse_pattern(pattern).slug
    return ".".join(x for x in (method, pattern, recon, stage.replace("+", "_")) if x)


def headline_metrics(result: dict) -> dict[str, float]:
    """The numbers that compare checkpoints, from one evaluation's result (an eval/*.json):
    ppl.<dataset>.<checkpoint>, sparsity.<checkpoint> and zeroshot_acc.<checkpoint> (mean over tasks)."""
    ckpt = checkpoint_id(result["method"], result["pattern"], result["recon"], result["stage"])
    out = {f"ppl.{name}.{ckpt}": float(value) for name, value in result["ppl"].items()}
    out[f"sparsity.{ckpt}"] = float(result["sparsity"])
    acc = ((result.get("zeroshot") or {}).get("mean") or {}).get("acc")
    if acc is not None:
        out[f"zeroshot_acc.{ckpt}"] = float(acc)
    return out


def layer_metrics(infos: dict, stage: str) -> list[tuple[str, float, int]]:
    """Per-linear quantities (every `rel_error*` entry) as stepped metrics: key `<quantity>.<stage>.<linear
    kind>`, step = decoder layer index. Both come from the full weight name, whatever the architecture:
    the layer index is its first numeric component (`model.decoder.layers.3.fc1.weight`,
    `model.layers.3.mlp.down_proj.weight`), the linear kind what follows it, without `.weight`."""
    metrics = []
    for name, info in sorted(infos.items()):
        parts = name.split(".")
        at = next((i for i, p in enumerate(parts) if p.isdigit()), None)
        layer, kind = (0, parts) if at is None else (int(parts[at]), parts[at + 1:])
        if kind and kind[-1] in ("weight", "bias"):
            kind = kind[:-1]
        for key, value in sorted(info.items()):
            if key.startswith("rel_error") and isinstance(value, (int, float)) and not isinstance(value, bool):
                metrics.append((f"{key}.{stage}.{'.'.join(kind)}", float(value), layer))
    return metrics


def text_input(name: str, source: str, text: str, tokens: int, context: str, path: str | Path | None = None,
               **profile) -> dict:
    """A text a stage read, as a dataset input: `source` is the configured source ('builtin', a path or
    'hf:<dataset>[:<config>[:<split>]]'), `path` the file actually read (for 'builtin'); the digest is of
    the text as tokenized (UTF-8, SHA-256, 16 hex digits)."""
    if path or not source.startswith("hf:"):
        source = str(Path(path or source).resolve())
    return {"name": name, "source": source, "context": context,
            "digest": hashlib.sha256(text.encode("utf-8")).hexdigest()[:16],
            "profile": {"tokens": int(tokens), "characters": len(text), **profile}}


def registered_name(run: str, *parts: str) -> str:
    """The Model Registry name of a checkpoint: sds-<run>-<method>-<pattern>-<setting>."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", "-".join(("sds", run, *parts)))


def model_entry(name: str, path: str | Path, tags: dict, producer: str | None = None) -> dict:
    """A checkpoint folder to log as a model and register under `name`, with `tags`. `producer`: the stage
    (child run name) that wrote it, which the model is linked to as an output."""
    limit_mb = float(os.environ.get(COPY_WEIGHTS_ENV, COPY_WEIGHTS_DEFAULT_MB))
    return {"name": name, "path": str(Path(path).resolve()), "tags": {k: str(v) for k, v in tags.items()},
            "producer": producer, "copy_weights_bytes": int(limit_mb * 2 ** 20)}


def evaluated_model_entry(run: str, result: dict, model_dir: str | Path) -> dict:
    """The model entry of an evaluated SDS checkpoint: registered when its evaluation finishes, so every
    registry version carries its perplexity and sparsity; prune2 wrote it."""
    method, pattern, recon = result["method"], result["pattern"], result["recon"]
    slug = place_of(Path(model_dir).parent).pattern  # <method>/<pattern slug>/<recon>/sds/model
    tags = {"method": method, "pattern": pattern, "recon": recon, "stage": result["stage"],
            "sparsity": result["sparsity"], **{f"ppl.{k}": v for k, v in result["ppl"].items()},
            "zeroshot_acc": (result.get("zeroshot") or {}).get("mean", {}).get("acc")}
    return model_entry(registered_name(run, method, slug, recon), model_dir,
                       {k: v for k, v in tags.items() if v is not None}, producer=f"prune2/{method}/{slug}/{recon}")
