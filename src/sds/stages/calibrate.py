"""The stages every compression run starts with: calibration windows, decoder layer 0's inputs, the dense
model's per-layer inputs (the activation cache) and OWL's per-layer outlier fractions."""
from __future__ import annotations

import logging
import time
from pathlib import Path

from ..core.layout import MANIFEST
from ..core.runtime import seed, setup
from ..data.windows import read_calibration
from ..model.loading import load_tokenizer
from ..storage.atomic import atomic_dir
from ..storage.documents import write_json
from ..tracking.stage_runs import track_stage
from .common import layerwise_model

log = logging.getLogger("sds")


def calibration(config: dict, model_dir: str, out: str, corpus_dir: str | None = None) -> None:
    """Samples nsamples × seqlen token windows (seeded) → Parquet of token ids."""
    from ..data.texts import read_text_source, tokenize
    from ..data.windows import sample_windows, write_calibration
    from ..tracking.entries import text_input

    started = time.time()
    seed(config)
    cal = config["calibration"]
    # a folder without tokenizer files is named here, not found out as "calibration text has 0 tokens"
    tokenizer = load_tokenizer(model_dir, trust_remote_code=config["model"]["trust_remote_code"])
    builtin = Path(corpus_dir) / "train.txt" if corpus_dir else None
    text = read_text_source(cal["source"], text_field=cal["text_field"], builtin_text=builtin, split="train")
    ids = tokenize(tokenizer, text)
    windows = sample_windows(ids, cal["nsamples"], cal["seqlen"], config["seed"])
    write_calibration(out, windows)
    log.info("calibration: %d windows × %d tokens from %s (%d tokens)", *windows.shape, cal["source"], ids.numel())
    # the same numbers as the dataset's profile: tokens of the source text, windows × seqlen taken from it
    track_stage(config, "calibration", started=started, params=cal,
                metrics={"source_tokens": ids.numel(), "windows": windows.shape[0], "seqlen": windows.shape[1]},
                inputs=[text_input("calibration", cal["source"], text, ids.numel(), "calibration",
                                   path=builtin if cal["source"] == "builtin" else None,
                                   windows=windows.shape[0], seqlen=windows.shape[1])])


def _calibration_pass(config: dict, model_dir: str, calibration_file: str, out: str, write, dtype: str | None
                      ) -> tuple[int, int]:
    """Runs `write(config, lm, windows, folder)` into the output folder `out` with its manifest (layers,
    nsamples, seqlen and the cache `dtype`, None: the model's): what the stages after it read); returns
    (layers, windows)."""
    device = setup(config)
    lm = layerwise_model(config, model_dir, device)
    windows = read_calibration(calibration_file)
    with atomic_dir(out) as tmp:
        write(config, lm, windows, tmp)
        write_json(tmp / MANIFEST, {"layers": len(lm), "nsamples": windows.shape[0], "seqlen": windows.shape[1],
                                    "dtype": dtype or str(lm.dtype).removeprefix("torch.")})
    return len(lm), windows.shape[0]


def layer_inputs(config: dict, model_dir: str, calibration_file: str, out: str) -> None:
    """Decoder layer 0's input for every calibration window (the embeddings), in the model's dtype: where
    every sequential pass starts. Its manifest gives nsamples and seqlen to the stages after it."""
    from ..model.passes import write_layer_inputs

    started = time.time()
    layers, windows = _calibration_pass(config, model_dir, calibration_file, out, write_layer_inputs, None)
    log.info("layer inputs: %d windows, %d decoder layers", windows, layers)
    track_stage(config, "layer_inputs", started=started, metrics={"layers": layers, "windows": windows})


def activations(config: dict, model_dir: str, calibration_file: str, out: str) -> None:
    """Runs the dense model layer by layer; caches each decoder layer's input (and the last output),
    one Parquet file per layer boundary: layer_i = input of layer i = dense output of layer i−1. Only the
    settings that fit to the dense model's own hidden states read it."""
    from ..model.passes import dense_pass

    started = time.time()
    layers, _ = _calibration_pass(config, model_dir, calibration_file, out, dense_pass, config["activations"]["dtype"])
    track_stage(config, "activations", started=started, params=config["activations"], metrics={"layers": layers})



def owl(config: dict, model_dir: str, inputs_dir: str, out: str) -> None:
    """OWL's layer outlier distribution (sparsity_profile 'owl'): one dense pass over the calibration
    windows, each decoder layer's fraction of Wanda scores |W|·‖X_j‖ above owl_threshold × their mean,
    pooled over its linears, on the dense model's own inputs (the paper's protocol: the fractions, and so
    every layer's ratio, are known before the first layer is pruned). out: a JSON of the fractions, which
    every prune1 turns into per-layer ratios for its pattern."""
    from ..algorithms.owl import input_norms_from_hessian, outlier_fraction
    from ..model.decoder import find_linears
    from ..model.passes import dense_statistics_pass
    from ..storage.atomic import scratch_dir
    from ..tracking.entries import BY_LAYER
    from .common import start_layer_stage

    started = time.time()
    threshold = config["prune"]["owl_threshold"]
    stage = start_layer_stage(config, model_dir, inputs_dir)

    def measure(i, layer, acc):
        linears = find_linears(layer)
        return outlier_fraction({n: m.weight.detach() for n, m in linears.items()},
                                {n: input_norms_from_hessian(acc.stats(n).H) for n in linears}, threshold)

    with scratch_dir(out) as work:
        fractions = dense_statistics_pass(config, stage.lm, stage.nsamples, stage.seqlen, inputs_dir, measure, work,
                                          what="owl layer")
    write_json(out, {"threshold": threshold, "outlier_fraction": fractions, "layers": len(fractions),
                     "score": "|W|*||X_j|| (Wanda), pooled over each layer's linears, dense inputs"}, output=True)
    log.info("owl: outlier fractions (M=%g) %s", threshold, ", ".join(f"{f:.4f}" for f in fractions))
    track_stage(config, "owl", started=started, params={"owl_threshold": threshold},
                metrics=[(f"{BY_LAYER}outlier_fraction", f, i) for i, f in enumerate(fractions)]
                + [("outlier_fraction.mean", sum(fractions) / max(len(fractions), 1), 0)])
