"""What the stages share: the preamble of a layer-by-layer stage (device, the layer-wise model, the calibration
shape), readers of prune1's checkpoint, and the MLflow tags of a checkpoint."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.layout import MANIFEST, MASKS, WEIGHTS, place_of
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
