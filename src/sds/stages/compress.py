"""The compression stages: first prune, the adjust ablation, dense reconstruction and the second prune.

A stage reads its inputs, hands the work to the layer drivers (`model.passes`) with the per-linear decisions
of the method (`algorithms.method`), writes its outputs atomically (`storage`, `model.checkpoints`) and
records itself in MLflow (`tracking`).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from ..algorithms import method as sds_method
from ..algorithms.owl import layer_pattern
from ..core.config import second_prune_settings
from ..core.layout import LAYERS, MODEL, STATS, STREAM, WEIGHTS, WORK
from ..core.patterns import pattern_from_slug
from ..core.runtime import setup
from ..core.stage_keys import OWL_KEYS
from ..model.checkpoints import CheckpointWriter, write_model_folder
from ..report.modelcard import model_card
from ..storage.atomic import atomic_dir
from ..storage.documents import write_json
from ..tracking.entries import checkpoint_reference, layer_metrics, registered_name, sds_model_entry
from ..tracking.stage_runs import track_stage
from .common import (calibration_shape, checkpoint_readers, checkpoint_tags, layerwise_model, profile_metrics,
                     profile_params, profile_tags, recorded_profile, sparsity_profile, start_layer_stage)

log = logging.getLogger("sds")


def prune1(config: dict, model_dir: str, inputs_dir: str, method: str, pattern: str, out: str,
           cache_stream: str = "false", owl_file: str | None = None) -> None:
    """First prune: one-shot, sequential, every linear of every decoder layer. Also saves each layer's
    input statistics (stats/: what the reconstruction fits on, so it needs no forward pass) and, with
    `cache_stream` (needed only by the 'dense_stream' reconstruction target), the pruned model's
    per-layer inputs (stream/). With sparsity_profile 'owl', each decoder layer is pruned to its OWL ratio
    (from the `owl` stage's outlier fractions, `owl_file`), recorded in layers.json for the later stages."""
    from ..model.passes import sequential_pass

    started = time.time()
    pat = pattern_from_slug(pattern)
    stage = start_layer_stage(config, model_dir, inputs_dir)
    profile_keys = {"sparsity_profile", *(key.removeprefix("prune.") for key in OWL_KEYS)}
    prune_settings = {k: v for k, v in config.get("prune", {}).items() if k not in profile_keys}  # the pruner's
    profile = sparsity_profile(config, pat, owl_file, len(stage.lm))

    def update(i, name, W, W_dense, stats):
        return sds_method.first_prune(method, W, W_dense, stats, layer_pattern(pat, profile.get("layer_sparsity"), i),
                                      prune_settings)

    start = time.monotonic()
    with atomic_dir(out) as tmp:
        stream_out = tmp / STREAM if cache_stream == "true" else None
        if stream_out:
            stream_out.mkdir()
        (tmp / STATS).mkdir()
        checkpoint = CheckpointWriter(tmp, stage.lm, range(len(stage.lm)), masks=True)
        infos = sequential_pass(config, stage.lm, stage.nsamples, stage.seqlen, inputs_dir, update, tmp / WORK,
                                checkpoint, stream_out=stream_out, stats_out=tmp / STATS,
                                what=f"prune1 {method} {pat} layer")
        checkpoint.close({"method": method, "pattern": str(pat), **profile})
    log.info("prune1 %s %s done in %.1fs", method, pat, time.monotonic() - start)
    tags = {"method": method, "pattern": str(pat), "stage": "prune1", **profile_tags(profile)}
    track_stage(config, f"prune1/{method}/{pattern}", started=started,
                params={"method": method, "pattern": str(pat), **prune_settings, **profile_params(profile)},
                metrics=layer_metrics(infos, "prune1") + profile_metrics(profile),
                tags={"sds_method": method, "sds_pattern": pattern, **profile_tags(profile, prefix="sds_")},
                model=checkpoint_reference(registered_name(config["run"], method, pattern, "prune1"), out, tags))


def prune1_adjust(config: dict, model_dir: str, inputs_dir: str, prune1_dir: str, out: str,
                  dense_dir: str | None = None) -> None:
    """Ablation: the post-prune weight adjustment applied to the first prune's masks directly (no dense
    phase), so the dense phase's own contribution is visible."""
    from ..model.passes import sequential_pass

    started = time.time()
    stage = start_layer_stage(config, model_dir, inputs_dir)
    first, masks = checkpoint_readers(prune1_dir, stage.device)

    def update(i, name, W, W_dense, stats):
        return sds_method.adjusted_first_prune(config["prune2"], W, masks[name].bool(), W_dense, stats)

    cross = config["prune2"]["adjust_target"] == "dense_stream"
    with atomic_dir(out) as tmp:
        checkpoint = CheckpointWriter(tmp, stage.lm, range(len(stage.lm)), masks=True)
        infos = sequential_pass(config, stage.lm, stage.nsamples, stage.seqlen, inputs_dir, update, tmp / WORK,
                                checkpoint, source=first, dense_dir=dense_dir if cross else None,
                                what="prune1+adjust layer")
        checkpoint.close(recorded_profile(prune1_dir))  # the masks are prune1's, and so are their ratios
    method, pattern, tags = checkpoint_tags(prune1_dir)
    track_stage(config, f"prune1_adjust/{method}/{pattern}", started=started, params=config["prune2"],
                metrics=layer_metrics(infos, "prune1_adjust"), tags=tags,
                model=checkpoint_reference(registered_name(config["run"], method, pattern, "prune1_adjust"), out,
                                           {"method": method, "pattern": str(pattern_from_slug(pattern)),
                                            "stage": "prune1_adjust"}))


def _dense_phase(config: dict, recon: str) -> dict:
    """The dense-phase keys of SDS setting `recon` (its `prune2` overrides are the second prune's)."""
    return {k: v for k, v in config["reconstruct"][recon].items() if k != "prune2"}


def _reconstruct_layers(config, model_dir, inputs_dir, dense_dir, prune1_dir, recon, layers: list[int] | None,
                        out: Path, extra: dict) -> dict:
    """Reconstructs the given decoder layers (all when None) into a checkpoint in `out`; returns its summary."""
    from ..model.passes import refit_layers

    device = setup(config)
    settings = _dense_phase(config, recon)
    lm = layerwise_model(config, model_dir, device)
    nsamples, seqlen = calibration_shape(inputs_dir)
    # a layer job reads its layer's tensors only: each is verified as it is read, not the whole file first
    first, masks = checkpoint_readers(prune1_dir, device, verify="per_tensor")
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
    started = time.time()
    with atomic_dir(out) as tmp:
        summary = _reconstruct_layers(config, model_dir, inputs_dir, dense_dir, prune1_dir, recon, None, tmp,
                                      {"settings": _dense_phase(config, recon)})
    method, pattern, tags = checkpoint_tags(prune1_dir, recon)
    track_stage(config, f"reconstruct/{method}/{pattern}/{recon}", started=started,
                params=_dense_phase(config, recon),
                metrics=layer_metrics(summary["linears"], "reconstruct"), tags=tags)


def reconstruct_one_layer(config: dict, model_dir: str, inputs_dir: str, prune1_dir: str, recon: str, layer: str,
                          out: str, dense_dir: str | None = None) -> None:
    """Layer-parallel mode: reconstructs decoder layer `layer` only (its own job); `out` is a folder with
    that layer's weights.safetensors and layers.json, merged by `reconstruct_gather`."""
    from ..tracking.stage_runs import stage_start

    i = int(layer)
    started, start = time.time(), time.monotonic()
    with atomic_dir(out) as tmp:
        summary = _reconstruct_layers(config, model_dir, inputs_dir, dense_dir, prune1_dir, recon, [i], tmp,
                                      {"layer": i})
        summary["seconds"] = time.monotonic() - start
        summary["started"] = stage_start(started)  # the gathered reconstruct run starts with its first layer job
        write_json(tmp / LAYERS, summary)


def reconstruct_gather(config: dict, recon: str, out: str, parts: list[str]) -> None:
    """Merges per-layer reconstruction outputs into the same checkpoint layout `reconstruct` writes."""
    from ..model.checkpoints import merge_checkpoints

    started = time.time()
    settings = _dense_phase(config, recon)
    with atomic_dir(out) as tmp:
        merged = merge_checkpoints([Path(p) for p in parts], tmp)
        write_json(tmp / LAYERS, {"linears": merged["linears"], "settings": settings, "layer_parallel": True,
                                  "parts": len(parts)})
    method, pattern, tags = checkpoint_tags(out, recon)
    # the gathered run starts with its first layer job
    track_stage(config, f"reconstruct/{method}/{pattern}/{recon}", started=min(started, merged["started"] or started),
                params={**settings, "layer_parallel": True}, metrics=layer_metrics(merged["linears"], "reconstruct"),
                tags=tags)


def prune2(config: dict, model_dir: str, inputs_dir: str, prune1_dir: str, reconstruct_dir: str, method: str,
           pattern: str, recon: str, out: str, dense_dir: str | None = None) -> None:
    """Second prune of the reconstructed model to the same pattern (sequential; see method.second_prune),
    with SDS setting `recon`'s second-prune keys; writes a loadable Hugging Face folder with masks and a card."""
    from ..model.passes import sequential_pass

    started = time.time()
    pat = pattern_from_slug(pattern)
    stage = start_layer_stage(config, model_dir, inputs_dir)
    refit, _ = checkpoint_readers(reconstruct_dir, stage.device, masks=False)
    first, first_masks = checkpoint_readers(prune1_dir, stage.device)
    settings = second_prune_settings(config, recon)
    prune_settings = config.get("prune", {})  # the pruner's own keys, and ADMM's for the gradual selection
    profile = recorded_profile(prune1_dir)  # prune1's OWL ratios, if any
    ratios = profile.get("layer_sparsity")

    def update(i, name, W, W_dense, stats):
        return sds_method.second_prune(method, W, W_dense, stats, layer_pattern(pat, ratios, i), prune_settings,
                                       settings, (first[name], first_masks[name]))

    cross = settings["adjust_target"] == "dense_stream"
    start = time.monotonic()
    with atomic_dir(out) as tmp:
        checkpoint = CheckpointWriter(tmp, stage.lm, range(len(stage.lm)), masks=True)
        infos = sequential_pass(config, stage.lm, stage.nsamples, stage.seqlen, inputs_dir, update, tmp / WORK,
                                checkpoint, source=refit, dense_dir=dense_dir if cross else None,
                                what=f"prune2 {method} {pat} layer")
        fallbacks = sum(1 for v in infos.values() if v.get("fallback"))
        summary = checkpoint.close({"method": method, "pattern": str(pat), "fallbacks": fallbacks, **profile})
        write_model_folder(stage.lm, tmp / WEIGHTS, tmp / MODEL,
                           model_card(config, "sds", method, pat, checkpoint.sparsity(), summary,
                                      stage.lm.folder))
    log.info("prune2 %s %s done in %.1fs; %d/%d linears kept their first-prune weights", method, pat,
             time.monotonic() - start, fallbacks, len(infos))
    track_stage(config, f"prune2/{method}/{pattern}/{recon}", started=started,
                params={"method": method, "pattern": str(pat), **settings},
                metrics=layer_metrics(infos, "prune2") + [("fallbacks", fallbacks, 0)],
                tags={"sds_method": method, "sds_pattern": pattern, "sds_recon": recon},
                model=sds_model_entry(config["run"], method, pattern, recon, str(pat), Path(out) / MODEL))
