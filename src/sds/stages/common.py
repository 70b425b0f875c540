"""What the stages share: the preamble of a layer-by-layer stage (device, the layer-wise model, the calibration
shape), readers of prune1's checkpoint, the MLflow tags of a checkpoint, and prune1's per-layer sparsity
profile (OWL)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..algorithms.owl import owl_ratios
from ..core.errors import HOW_TO_RECREATE, CorruptFileError
from ..core.layout import LAYERS, MANIFEST, MASKS, WEIGHTS, place_of
from ..core.patterns import Pattern
from ..core.runtime import setup
from ..model.checkpoints import MaskReader
from ..model.loading import LayerwiseModel
from ..storage.documents import read_json
from ..storage.safetensors import TensorReader


def layerwise_model(config: dict, model_dir: str, device) -> LayerwiseModel:
    """The model for layer-by-layer stages: one decoder layer in memory at a time (see LayerwiseModel)."""
    return LayerwiseModel(model_dir, dtype=config["model"]["dtype"],
                          trust_remote_code=config["model"]["trust_remote_code"], device=str(device))


def calibration_shape(inputs_dir) -> tuple[int, int]:
    """(nsamples, seqlen) of the calibration windows, from the layer_inputs manifest."""
    manifest = read_json(Path(inputs_dir) / MANIFEST)
    return manifest["nsamples"], manifest["seqlen"]


@dataclass
class LayerStage:
    """A layer-by-layer stage's start: its device, the layer-wise model and the calibration shape."""
    device: torch.device
    lm: LayerwiseModel
    nsamples: int
    seqlen: int


def start_layer_stage(config: dict, model_dir: str, inputs_dir: str) -> LayerStage:
    device = setup(config)
    lm = layerwise_model(config, model_dir, device)
    return LayerStage(device, lm, *calibration_shape(inputs_dir))


def checkpoint_readers(folder, device, *, masks: bool = True, verify: str = "file"
                       ) -> tuple[TensorReader, MaskReader | None]:
    """(weights, masks) of a stage checkpoint, read one tensor at a time onto `device`; `verify`: see
    TensorReader ("per_tensor" for a job that reads only some layers: it hashes what it reads)."""
    folder = Path(folder)
    return (TensorReader(folder / WEIGHTS, device=device, verify=verify),
            MaskReader(folder / MASKS, device=device, verify=verify) if masks else None)


def checkpoint_tags(folder, recon: str | None = None) -> tuple[str, str, dict]:
    """(method, pattern slug, MLflow tags) of the checkpoint folder a stage read or wrote."""
    place = place_of(folder)
    tags = {"sds_method": place.method, "sds_pattern": place.pattern}
    if recon is not None:
        tags["sds_recon"] = recon
    return place.method, place.pattern, tags


def sparsity_profile(config: dict, pattern: Pattern, owl_file: str | None, layers: int) -> dict:
    """What prune1 records of its per-layer sparsity (in layers.json, read back by prune2): nothing for the
    uniform profile; for 'owl', `layer_sparsity` (one ratio per decoder layer, from the `owl` stage's
    outlier fractions in `owl_file`, owl_lambda and the pattern's ratio) and the inputs behind it."""
    if config["prune"]["sparsity_profile"] != "owl":
        return {}
    if pattern.kind != "unstructured":
        raise ValueError(f"sparsity_profile 'owl' needs an unstructured pattern, not {pattern}")
    if owl_file is None:
        raise ValueError("sparsity_profile 'owl' needs the owl stage's outlier fractions (owl_file=...)")
    owl = read_json(owl_file, verify=True)
    fractions = owl.get("outlier_fraction")
    if not isinstance(fractions, list) or len(fractions) != layers:
        raise CorruptFileError(f"{owl_file}: holds {len(fractions or [])} outlier fractions, not one per decoder "
                               f"layer ({layers}); {HOW_TO_RECREATE}", owl_file)
    lam = config["prune"]["owl_lambda"]
    return {"sparsity_profile": "owl", "layer_sparsity": owl_ratios(fractions, pattern.ratio, lam),
            "owl": {"threshold": owl["threshold"], "lambda": lam, "outlier_fraction": fractions}}


PROFILE_KEYS = ("sparsity_profile", "layer_sparsity", "owl")


def recorded_profile(prune1_dir: str | Path) -> dict:
    """The per-layer sparsity prune1 recorded in its layers.json ({} for the uniform profile): what the
    checkpoints made from its masks (prune1_adjust, prune2) record and their model cards state."""
    summary = read_json(Path(prune1_dir) / LAYERS)
    return {k: summary[k] for k in PROFILE_KEYS if k in summary}


def profile_params(profile: dict) -> dict:
    """The profile as MLflow params: its name and, for OWL, M and λ."""
    if not profile:
        return {"sparsity_profile": "uniform"}
    return {"sparsity_profile": profile["sparsity_profile"], "owl_threshold": profile["owl"]["threshold"],
            "owl_lambda": profile["owl"]["lambda"]}


def profile_tags(profile: dict, prefix: str = "") -> dict:
    """Checkpoint tags: the profile, and OWL's per-layer ratios (4 decimals, comma-separated, layer order)."""
    if not profile:
        return {}
    return {f"{prefix}sparsity_profile": profile["sparsity_profile"],
            f"{prefix}layer_sparsity": ",".join(f"{r:.4f}" for r in profile["layer_sparsity"])}


def profile_metrics(profile: dict) -> list[tuple[str, float, int]]:
    """OWL's per-layer ratio and outlier fraction as series over depth (step = the layer index)."""
    if not profile:
        return []
    return ([("by_layer/target_sparsity.prune1", float(r), i) for i, r in enumerate(profile["layer_sparsity"])]
            + [("by_layer/outlier_fraction.prune1", float(f), i)
               for i, f in enumerate(profile["owl"]["outlier_fraction"])])
