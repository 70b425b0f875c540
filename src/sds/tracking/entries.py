"""What the stages hand to MLflow, as plain data: metric keys per checkpoint, per-linear stepped metrics,
dataset inputs, registered model entries. No MLflow import here."""
from __future__ import annotations

import hashlib
import json
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
# headline numbers are shown with this many decimals (the eval JSONs keep them exact)
DISPLAY_DIGITS = 4
# the prefix of per-layer series: the UI groups a run's charts by the part of a key before its "/"
BY_LAYER = "by_layer/"


def checkpoint_id(method: str = "", pattern: str = "", recon: str = "", stage: str = "dense") -> str:
    """A checkpoint as a metric-key suffix: `dense`, `sparsegpt.2of4.prune1`, `sparsegpt.2of4.prune1_adjust`,
    `sparsegpt.2of4.default.sds` (pattern as its slug; '+' is not allowed in MLflow keys)."""
    if pattern and ":" in pattern:
        pattern = parse_pattern(pattern).slug
    return ".".join(x for x in (method, pattern, recon, stage.replace("+", "_")) if x)


def shown(value: float) -> float:
    """A number as MLflow shows it: rounded to DISPLAY_DIGITS decimals (the eval JSON keeps it exact)."""
    return round(float(value), DISPLAY_DIGITS)


def headline_metrics(result: dict) -> dict[str, float]:
    """The numbers that compare checkpoints, from one evaluation's result (an eval/*.json), rounded for
    display: ppl.<dataset>.<checkpoint>, sparsity.<checkpoint> and zeroshot_acc.<checkpoint> (mean over
    tasks)."""
    ckpt = checkpoint_id(result["method"], result["pattern"], result["recon"], result["stage"])
    out = {f"ppl.{name}.{ckpt}": shown(value) for name, value in result["ppl"].items()}
    out[f"sparsity.{ckpt}"] = shown(result["sparsity"])
    acc = ((result.get("zeroshot") or {}).get("mean") or {}).get("acc")
    if acc is not None:
        out[f"zeroshot_acc.{ckpt}"] = shown(acc)
    return out


# per-linear figures of the written weights (model.checkpoints.CheckpointWriter) logged beside the errors
WEIGHT_FIGURES = ("density", "max_abs_ratio")


def layer_metrics(infos: dict, stage: str) -> list[tuple[str, float, int]]:
    """Per-linear quantities (every `rel_error*` entry, and what the checkpoint's weights hold: `density`, the
    non-zero fraction, and `max_abs_ratio`, max|W| / max|W_dense|) of a layer-by-layer stage:
    - `by_layer/<quantity>.<stage>.<linear kind>`, one value per decoder layer, step = the layer index (the
      UI's x axis says "Step": the `by_layer/` section of its charts says what a step is);
    - `<quantity>.<stage>.<linear kind>.mean|max` over the layers and `<quantity>.<stage>.mean|max` over
      every linear: one number each, so a compare table and a runs-table column mean something.
    Layer and kind come from the full weight name, whatever the architecture: the layer index is its first
    numeric component (`model.decoder.layers.3.fc1.weight`, `model.layers.3.mlp.down_proj.weight`), the
    linear kind what follows it, without `.weight`."""
    series, groups = [], {}
    for name, info in sorted(infos.items()):
        parts = name.split(".")
        at = next((i for i, p in enumerate(parts) if p.isdigit()), None)
        layer, kind = (0, parts) if at is None else (int(parts[at]), parts[at + 1:])
        if kind and kind[-1] in ("weight", "bias"):
            kind = kind[:-1]
        for key, value in sorted(info.items()):
            if (key.startswith("rel_error") or key in WEIGHT_FIGURES) and isinstance(value, (int, float)) \
                    and not isinstance(value, bool):
                series.append((f"{BY_LAYER}{key}.{stage}.{'.'.join(kind)}", float(value), layer))
                for group in (f"{key}.{stage}.{'.'.join(kind)}", f"{key}.{stage}"):
                    groups.setdefault(group, []).append(float(value))
    summary = [(f"{group}.{how}", shown(f(values)), 0) for group, values in sorted(groups.items())
               for how, f in (("mean", lambda v: sum(v) / len(v)), ("max", max))]
    return series + summary


def text_input(name: str, source: str, text: str, tokens: int, context: str, path: str | Path | None = None,
               **windowing) -> dict:
    """A text a stage read, as a dataset input: `source` is the configured source ('builtin', a path or
    'hf:<dataset>[:<config>[:<split>]]'), `path` the file actually read (for 'builtin'); `windowing` how
    the stage cut it (windows, seqlen, nsamples or max_windows). MLflow keeps one dataset per (name,
    digest) in an experiment, with the profile it was first logged with, so both say the windowing and the
    digest covers the text (UTF-8), its token count (the tokenizer's) and the windowing: two runs reading
    one file differently get two datasets, each with its own numbers. Name: `<name> <windows>x<seqlen>`."""
    if path or not source.startswith("hf:"):
        source = str(Path(path or source).resolve())
    profile = {"tokens": int(tokens), "characters": len(text), **{k: int(v) for k, v in windowing.items() if v is not None}}
    digest = hashlib.sha256(text.encode("utf-8"))
    digest.update(json.dumps(profile, sort_keys=True).encode())
    shape = f" {profile['windows']}x{profile['seqlen']}" if {"windows", "seqlen"} <= set(profile) else ""
    return {"name": f"{name}{shape}", "source": source, "context": context, "digest": digest.hexdigest()[:16],
            "profile": profile}


def config_params(config: dict) -> dict:
    """The config as the pipeline run's params: without `model.builtin` (the built-in model's recipe)
    when the model comes from a folder or the hub, where it plays no part."""
    if config["model"]["source"] == "builtin":
        return config
    return {**config, "model": {k: v for k, v in config["model"].items() if k != "builtin"}}


def child_name(stage: str, run: str, config_hash: str) -> str:
    """A stage run's name: the stage first (what it ran: stage/method/pattern/setting), then the pipeline it
    belongs to (`@ <run>-<6 hex digits of the config hash>`), so names differ across configs."""
    return f"{stage} @ {run}-{config_hash[:6]}"


def registered_name(run: str, *parts: str) -> str:
    """The Model Registry name of a checkpoint: sds-<run>-<method>-<pattern>-<setting>."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", "-".join(("sds", run, *parts)))


def model_entry(name: str, path: str | Path, tags: dict, *, register: bool = True) -> dict:
    """A checkpoint folder the recording stage wrote, to log as an MLflow model `name` (source run: that
    stage's) with `tags`, and to register if `register`."""
    limit_mb = float(os.environ.get(COPY_WEIGHTS_ENV, COPY_WEIGHTS_DEFAULT_MB))
    return {"name": name, "path": str(Path(path).resolve()), "tags": {k: str(v) for k, v in tags.items()},
            "producer": None, "register": register, "reference": False, "copy_weights_bytes": int(limit_mb * 2 ** 20)}


def checkpoint_reference(name: str, path: str | Path, tags: dict) -> dict:
    """A stage checkpoint that is not a loadable folder (prune1's weights and masks): an MLflow model that
    only names it (tag `weights_uri`, no files copied), the output of the stage that wrote it."""
    return {**model_entry(name, path, tags, register=False), "reference": True}


def evaluated_model_entry(run: str, result: dict, model_dir: str | Path) -> dict:
    """The SDS checkpoint, registered when its evaluation finishes (so every registry version carries its
    perplexity and sparsity): the model prune2 logged (its producer, also the version's source run), with
    the evaluation's numbers added to its tags."""
    method, pattern, recon = result["method"], result["pattern"], result["recon"]
    slug = place_of(Path(model_dir).parent).pattern  # <method>/<pattern slug>/<recon>/sds/model
    acc = (result.get("zeroshot") or {}).get("mean", {}).get("acc")
    tags = {"method": method, "pattern": pattern, "recon": recon, "stage": result["stage"],
            "sparsity": shown(result["sparsity"]), **{f"ppl.{k}": shown(v) for k, v in result["ppl"].items()},
            "zeroshot_acc": None if acc is None else shown(acc)}
    entry = model_entry(registered_name(run, method, slug, recon), model_dir,
                        {k: v for k, v in tags.items() if v is not None})
    return {**entry, "producer": f"prune2/{method}/{slug}/{recon}"}


def sds_model_entry(run: str, method: str, slug: str, recon: str, pattern: str, model_dir: str | Path) -> dict:
    """prune2's SDS folder as an MLflow model of prune2's run (registered later, by its evaluation)."""
    return model_entry(registered_name(run, method, slug, recon), model_dir,
                       {"method": method, "pattern": pattern, "recon": recon, "stage": "sds"}, register=False)
