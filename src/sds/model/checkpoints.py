"""Checkpoints of the pruning stages: the decoder linears' weights (and masks) written layer by layer as
a pass finishes each, and loadable Hugging Face folders built from them.

A stage checkpoint is a folder with weights.safetensors (every decoder linear, full state-dict names),
masks.safetensors (keep-masks, uint8) and layers.json (per-linear figures). No stage holds more than one
decoder layer's weights, whatever the depth.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..core.layout import LAYERS, MASKS, WEIGHTS
from ..storage.checksums import checksum_folder
from ..storage.documents import read_json, write_json, write_text
from ..storage.safetensors import SafetensorsStreamWriter, TensorReader
from .loading import LayerwiseModel, load_tokenizer


class CheckpointWriter:
    """weights.safetensors (every decoder linear of `layers`), masks.safetensors (with `masks`) and
    layers.json, written layer by layer. Also counts each layer's exact zeros (the model card's sparsity)."""

    def __init__(self, out_dir: Path, lm: LayerwiseModel, layers, *, masks: bool):
        specs = lm.linear_specs(layers)
        self.out_dir, self.lm, self.infos, self.zeros = Path(out_dir), lm, {}, {}
        self.weights = SafetensorsStreamWriter(self.out_dir / WEIGHTS, specs)
        self.masks = SafetensorsStreamWriter(self.out_dir / MASKS,
                                             {k: (torch.uint8, shape) for k, (_, shape) in specs.items()}
                                             ) if masks else None

    def add(self, i: int, layer_infos: dict[str, dict]) -> None:
        """Writes decoder layer i's current linear weights (and the masks in `layer_infos`)."""
        zeros = total = 0
        for name, full in self.lm.linear_names(i).items():
            weight = self.lm.layers[i].get_submodule(name).weight.detach()
            self.weights.write(full, weight)
            zeros, total = zeros + int((weight == 0).sum()), total + weight.numel()
            info = dict(layer_infos[name])
            mask = info.pop("mask", None)
            if self.masks is not None:
                self.masks.write(full, mask.to(torch.uint8))
            self.infos[full] = info
        self.zeros[i] = (zeros, total)

    def sparsity(self) -> dict:
        zeros, total = (sum(v[k] for v in self.zeros.values()) for k in (0, 1))
        return {"overall": zeros / max(total, 1), "per_layer": {i: z / t for i, (z, t) in self.zeros.items()}}

    def close(self, extra: dict | None = None) -> dict:
        self.weights.close()
        if self.masks is not None:
            self.masks.close()
        summary = {"linears": self.infos, **(extra or {})}
        write_json(self.out_dir / LAYERS, summary)
        return summary


def checkpoint_sparsity(lm: LayerwiseModel, weights: TensorReader) -> dict:
    """Exact-zero fractions of a checkpoint's decoder linears, overall and per decoder layer."""
    per_layer, zeros, total = {}, 0, 0
    for i in range(len(lm)):
        z = t = 0
        for full in lm.linear_names(i).values():
            weight = weights[full]
            z, t = z + int((weight == 0).sum()), t + weight.numel()
        per_layer[i] = z / max(t, 1)
        zeros, total = zeros + z, total + t
    return {"overall": zeros / max(total, 1), "per_layer": per_layer}


def write_model_folder(lm: LayerwiseModel, model_dir, weights_file: Path, out: Path, card: str, *,
                       trust_remote_code: bool = False) -> None:
    """A loadable Hugging Face folder: the base checkpoint with every decoder linear replaced by the ones in
    `weights_file` (one tensor in memory at a time), the base tokenizer, checksums and the model card."""
    lm.save_pretrained(out, TensorReader(weights_file, device="cpu"))
    load_tokenizer(model_dir, trust_remote_code=trust_remote_code).save_pretrained(out)
    checksum_folder(out)
    write_text(out / "README.md", card)


def merge_checkpoints(parts: list[Path], out: Path) -> dict:
    """Concatenates stage checkpoints of disjoint decoder layers (layer-parallel reconstruction) into one
    weights.safetensors in `out`, one tensor in memory at a time; returns their merged per-linear infos
    and the earliest `started` time any part recorded."""
    readers = [TensorReader(Path(part) / WEIGHTS, device="cpu") for part in parts]
    infos, started = {}, None
    for part in parts:
        summary = read_json(Path(part) / LAYERS)
        infos.update(summary["linears"])
        if "started" in summary:
            started = summary["started"] if started is None else min(started, summary["started"])
    specs = {name: reader.spec(name) for reader in readers for name in reader.keys()}
    with SafetensorsStreamWriter(Path(out) / WEIGHTS, specs) as writer:
        for reader in readers:
            for name in reader.keys():
                writer.write(name, reader[name])
    return {"linears": infos, "started": started}
