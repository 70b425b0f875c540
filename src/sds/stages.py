"""The pipeline's compression stages, corpus to second prune. Each Snakemake rule calls exactly one
function here or in `eval_stages` (export, evaluation, report) through `sds.cli`.

A stage reads its inputs, hands the work to the layer drivers (`passes`) with the per-linear decisions of
the method (`method`), writes its outputs atomically (`io`, `checkpoints`) and records itself in MLflow
(`tracking`). Heavy imports (transformers, lm-eval, MLflow, plotting) happen inside the stages that use them.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from . import method as sds_method
from .checkpoints import CheckpointWriter, write_model_folder
from .config import second_prune_settings
from .data import read_calibration
from .io import TensorReader, atomic_dir, checksum_folder, read_json, write_json
from .model import LayerwiseModel
from .modelcard import model_card
from .patterns import pattern_from_slug
from .runtime import Progress, setup
from .tracking import layer_metrics, track_stage

log = logging.getLogger("sds")


def _method_pattern(path) -> tuple[str, str]:
    """(method, pattern slug) of an output one level below `<method>/<pattern>/`, e.g. a prune1 folder."""
    path = Path(path)
    return path.parent.parent.name, path.parent.name


def _layerwise_model(config: dict, model_dir: str, device) -> LayerwiseModel:
    """The model for layer-by-layer stages: one decoder layer in memory at a time (see LayerwiseModel)."""
    return LayerwiseModel(model_dir, dtype=config["model"]["dtype"],
                          trust_remote_code=config["model"]["trust_remote_code"], device=str(device))


# --- 1. corpus and model ------------------------------------------------------------------------------

def corpus(config: dict, out: str) -> None:
    """Writes train.txt / test.txt: the generated corpus, or copies of configured text files."""
    from .corpus import builtin_splits

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
    from .modelbuild import build_model as train

    started = time.time()
    setup(config)  # seed; training runs on the CPU with its own thread count
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
        write_json(tmp / "build.json", info)
    log.info("model built in %.1fs: %d parameters, final train loss %.3f", info["seconds"], info["parameters"],
             info["final_train_loss"])
    track_stage(config, "build_model", started=started, params=b,
           metrics=[("train_loss", v, (i + 1) * 10) for i, v in enumerate(info["loss_curve"])] +
           [("parameters", info["parameters"], 0), ("seconds", info["seconds"], 0)])


# --- 2. calibration -------------------------------------------------------------------------------------

def calibration(config: dict, model_dir: str, out: str, corpus_dir: str | None = None) -> None:
    """Samples nsamples × seqlen token windows (seeded) → Parquet of token ids."""
    from transformers import AutoTokenizer

    from .data import read_text_source, sample_windows, tokenize, write_calibration
    from .tracking import text_input

    started = time.time()
    setup(config)
    cal = config["calibration"]
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=config["model"]["trust_remote_code"])
    builtin = Path(corpus_dir) / "train.txt" if corpus_dir else None
    text = read_text_source(cal["source"], text_field=cal["text_field"], builtin_text=builtin, split="train")
    ids = tokenize(tokenizer, text)
    windows = sample_windows(ids, cal["nsamples"], cal["seqlen"], config["seed"])
    write_calibration(out, windows)
    log.info("calibration: %d windows × %d tokens from %s (%d tokens)", *windows.shape, cal["source"], ids.numel())
    track_stage(config, "calibration", started=started, params=cal, metrics={"source_tokens": ids.numel()},
           inputs=[text_input("calibration", cal["source"], text, ids.numel(), "calibration",
                              path=builtin if cal["source"] == "builtin" else None,
                              windows=windows.shape[0], seqlen=windows.shape[1])])


# --- 3. layer inputs and the dense activation cache --------------------------------------------------------

def layer_inputs(config: dict, model_dir: str, calibration_file: str, out: str) -> None:
    """Decoder layer 0's input for every calibration window (the embeddings), in the model's dtype: where
    every sequential pass starts. Its manifest gives nsamples and seqlen to the stages after it."""
    from .passes import write_layer_inputs

    started = time.time()
    device = setup(config)
    lm = _layerwise_model(config, model_dir, device)
    windows = read_calibration(calibration_file)
    with atomic_dir(out) as tmp:
        write_layer_inputs(config, lm, windows, tmp)
        write_json(tmp / "manifest.json", {"layers": len(lm), "nsamples": windows.shape[0],
                                           "seqlen": windows.shape[1], "dtype": config["model"]["dtype"]})
    log.info("layer inputs: %d × %d tokens", *windows.shape)
    track_stage(config, "layer_inputs", started=started, metrics={"layers": len(lm), "windows": windows.shape[0]})


def activations(config: dict, model_dir: str, calibration_file: str, out: str) -> None:
    """Runs the dense model layer by layer; caches each decoder layer's input (and the last output),
    one Parquet file per layer boundary: layer_i = input of layer i = dense output of layer i−1. Only the
    settings that fit to the dense model's own hidden states read it."""
    from .passes import dense_pass

    started = time.time()
    device = setup(config)
    lm = _layerwise_model(config, model_dir, device)
    windows = read_calibration(calibration_file)
    with atomic_dir(out) as tmp:
        dense_pass(config, lm, windows, tmp)
        write_json(tmp / "manifest.json", {"layers": len(lm), "nsamples": windows.shape[0],
                                           "seqlen": windows.shape[1], "dtype": config["activations"]["dtype"]})
    track_stage(config, "activations", started=started, params=config["activations"], metrics={"layers": len(lm)})


# --- 4. first prune and the adjust ablation ---------------------------------------------------------------

def _calibration_shape(inputs_dir) -> tuple[int, int]:
    manifest = read_json(Path(inputs_dir) / "manifest.json")
    return manifest["nsamples"], manifest["seqlen"]


def prune1(config: dict, model_dir: str, inputs_dir: str, method: str, pattern: str, out: str,
           cache_stream: str = "false") -> None:
    """First prune: one-shot, sequential, every linear of every decoder layer. Also saves each layer's
    input statistics (stats/: what the reconstruction fits on, so it needs no forward pass) and, with
    `cache_stream` (needed only by the 'dense_stream' reconstruction target), the pruned model's
    per-layer inputs (stream/)."""
    from .passes import sequential_pass

    started = time.time()
    device = setup(config)
    pat = pattern_from_slug(pattern)
    lm = _layerwise_model(config, model_dir, device)
    nsamples, seqlen = _calibration_shape(inputs_dir)

    def update(i, name, W, W_dense, stats):
        return sds_method.first_prune(method, W, W_dense, stats, pat, config["prune"])

    start = time.monotonic()
    with atomic_dir(out) as tmp:
        stream_out = tmp / "stream" if cache_stream == "true" else None
        if stream_out:
            stream_out.mkdir()
        (tmp / "stats").mkdir()
        checkpoint = CheckpointWriter(tmp, lm, range(len(lm)), masks=True)
        infos = sequential_pass(config, lm, nsamples, seqlen, inputs_dir, update, tmp / "work", checkpoint,
                                stream_out=stream_out, stats_out=tmp / "stats", what=f"prune1 {method} {pat} layer")
        checkpoint.close({"method": method, "pattern": str(pat)})
    log.info("prune1 %s %s done in %.1fs", method, pat, time.monotonic() - start)
    track_stage(config, f"prune1/{method}/{pattern}", started=started,
           params={"method": method, "pattern": str(pat), **config["prune"]},
           metrics=layer_metrics(infos, "prune1") + [("seconds", time.monotonic() - start, 0)],
           tags={"sds_method": method, "sds_pattern": pattern})


def prune1_adjust(config: dict, model_dir: str, inputs_dir: str, prune1_dir: str, out: str,
                  dense_dir: str | None = None) -> None:
    """Ablation: the post-prune weight adjustment applied to the first prune's masks directly (no dense
    phase), so the dense phase's own contribution is visible."""
    from .passes import sequential_pass

    started = time.time()
    device = setup(config)
    lm = _layerwise_model(config, model_dir, device)
    nsamples, seqlen = _calibration_shape(inputs_dir)
    first = TensorReader(Path(prune1_dir) / "weights.safetensors", device=device)
    masks = TensorReader(Path(prune1_dir) / "masks.safetensors", device=device)

    def update(i, name, W, W_dense, stats):
        return sds_method.adjusted_first_prune(config["prune2"], W, masks[name].bool(), W_dense, stats)

    start = time.monotonic()
    cross = config["prune2"]["adjust_target"] == "dense_stream"
    with atomic_dir(out) as tmp:
        checkpoint = CheckpointWriter(tmp, lm, range(len(lm)), masks=True)
        infos = sequential_pass(config, lm, nsamples, seqlen, inputs_dir, update, tmp / "work", checkpoint,
                                source=first, dense_dir=dense_dir if cross else None, what="prune1+adjust layer")
        checkpoint.close()
    method, pattern = _method_pattern(prune1_dir)
    track_stage(config, f"prune1_adjust/{method}/{pattern}", started=started, params=config["prune2"],
           metrics=layer_metrics(infos, "prune1_adjust") + [("seconds", time.monotonic() - start, 0)],
           tags={"sds_method": method, "sds_pattern": pattern})


# --- 5. dense reconstruction ------------------------------------------------------------------------------

def _reconstruct_layers(config, model_dir, inputs_dir, dense_dir, prune1_dir, recon, layers: list[int] | None,
                        out: Path, extra: dict) -> dict:
    """Reconstructs the given decoder layers (all when None) into a checkpoint in `out`; returns its summary."""
    from .passes import refit_layers

    device = setup(config)
    settings = config["reconstruct"][recon]
    lm = _layerwise_model(config, model_dir, device)
    nsamples, seqlen = _calibration_shape(inputs_dir)
    first = TensorReader(Path(prune1_dir) / "weights.safetensors", device=device)
    masks = TensorReader(Path(prune1_dir) / "masks.safetensors", device=device)
    todo = list(range(len(lm))) if layers is None else layers

    def update(i, name, W, W_dense, stats):
        W_new, info = sds_method.reconstruct_linear(settings, first[name].float(), masks[name].bool(), W_dense, stats)
        return W_new, None, info

    checkpoint = CheckpointWriter(out, lm, todo, masks=False)
    refit_layers(lm, todo, settings, update, checkpoint, dense_dir=dense_dir, prune1_dir=prune1_dir, nsamples=nsamples,
                 seqlen=seqlen, config=config, what=f"reconstruct {recon} layer")
    return checkpoint.close(extra)


def reconstruct(config: dict, model_dir: str, inputs_dir: str, prune1_dir: str, recon: str, out: str,
                dense_dir: str | None = None) -> None:
    """Dense reconstruction of every decoder layer in one job."""
    started, start = time.time(), time.monotonic()
    with atomic_dir(out) as tmp:
        summary = _reconstruct_layers(config, model_dir, inputs_dir, dense_dir, prune1_dir, recon, None, tmp,
                                      {"settings": config["reconstruct"][recon]})
    method, pattern = _method_pattern(prune1_dir)
    track_stage(config, f"reconstruct/{method}/{pattern}/{recon}", started=started, params=config["reconstruct"][recon],
           metrics=layer_metrics(summary["linears"], "reconstruct") + [("seconds", time.monotonic() - start, 0)],
           tags={"sds_method": method, "sds_pattern": pattern, "sds_recon": recon})


def reconstruct_one_layer(config: dict, model_dir: str, inputs_dir: str, prune1_dir: str, recon: str, layer: str,
                          out: str, dense_dir: str | None = None) -> None:
    """Layer-parallel mode: reconstructs decoder layer `layer` only (its own job); `out` is a folder with
    that layer's weights.safetensors and layers.json, merged by `reconstruct_gather`."""
    from .tracking import stage_start

    i = int(layer)
    started, start = time.time(), time.monotonic()
    with atomic_dir(out) as tmp:
        summary = _reconstruct_layers(config, model_dir, inputs_dir, dense_dir, prune1_dir, recon, [i], tmp,
                                      {"layer": i})
        summary["seconds"] = time.monotonic() - start
        summary["started"] = stage_start(started)  # the gathered reconstruct run starts with its first layer job
        write_json(tmp / "layers.json", summary)


def reconstruct_gather(config: dict, recon: str, out: str, parts: list[str]) -> None:
    """Merges per-layer reconstruction outputs into the same checkpoint layout `reconstruct` writes."""
    from .checkpoints import merge_checkpoints

    started = time.time()
    with atomic_dir(out) as tmp:
        merged = merge_checkpoints([Path(p) for p in parts], tmp)
        write_json(tmp / "layers.json", {"linears": merged["linears"], "settings": config["reconstruct"][recon],
                                         "layer_parallel": True, "parts": len(parts)})
    method, pattern = _method_pattern(Path(out).parent)
    # the gathered run starts with its first layer job
    track_stage(config, f"reconstruct/{method}/{pattern}/{recon}", started=min(started, merged["started"] or started),
           params={**config["reconstruct"][recon], "layer_parallel": True},
           metrics=layer_metrics(merged["linears"], "reconstruct"),
           tags={"sds_method": method, "sds_pattern": pattern, "sds_recon": recon})


# --- 6. second prune ---------------------------------------------------------------------------------------

def prune2(config: dict, model_dir: str, inputs_dir: str, prune1_dir: str, reconstruct_dir: str, method: str,
           pattern: str, recon: str, out: str, dense_dir: str | None = None) -> None:
    """Second prune of the reconstructed model to the same pattern (sequential; see method.second_prune),
    with SDS setting `recon`'s second-prune keys; writes a loadable Hugging Face folder with masks and a card."""
    from .passes import sequential_pass

    started = time.time()
    device = setup(config)
    pat = pattern_from_slug(pattern)
    lm = _layerwise_model(config, model_dir, device)
    nsamples, seqlen = _calibration_shape(inputs_dir)
    refit = TensorReader(Path(reconstruct_dir) / "weights.safetensors", device=device)
    first = TensorReader(Path(prune1_dir) / "weights.safetensors", device=device)
    first_masks = TensorReader(Path(prune1_dir) / "masks.safetensors", device=device)

    settings = second_prune_settings(config, recon)

    def update(i, name, W, W_dense, stats):
        return sds_method.second_prune(method, W, W_dense, stats, pat, config["prune"], settings,
                                       (first[name], first_masks[name]))

    cross = settings["adjust_target"] == "dense_stream"
    start = time.monotonic()
    with atomic_dir(out) as tmp:
        checkpoint = CheckpointWriter(tmp, lm, range(len(lm)), masks=True)
        infos = sequential_pass(config, lm, nsamples, seqlen, inputs_dir, update, tmp / "work", checkpoint,
                                source=refit, dense_dir=dense_dir if cross else None,
                                what=f"prune2 {method} {pat} layer")
        fallbacks = sum(1 for v in infos.values() if v.get("fallback"))
        summary = checkpoint.close({"method": method, "pattern": str(pat), "fallbacks": fallbacks})
        write_model_folder(lm, model_dir, tmp / "weights.safetensors", tmp / "model",
                           model_card(config, "sds", method, pat, checkpoint.sparsity(), summary),
                           trust_remote_code=config["model"]["trust_remote_code"])
    log.info("prune2 %s %s done in %.1fs; %d/%d linears kept their first-prune weights", method, pat,
             time.monotonic() - start, fallbacks, len(infos))
    track_stage(config, f"prune2/{method}/{pattern}/{recon}", started=started,
           params={"method": method, "pattern": str(pat), **settings},
           metrics=layer_metrics(infos, "prune2") + [("seconds", time.monotonic() - start, 0),
                                                      ("fallbacks", fallbacks, 0)],
           tags={"sds_method": method, "sds_pattern": pattern, "sds_recon": recon})
