"""Checkpoints of the pruning stages: the decoder linears' weights (and masks) written layer by layer as
a pass finishes each, and loadable Hugging Face folders built from them.

A stage checkpoint is a folder with weights.safetensors (every decoder linear, full state-dict names),
masks.safetensors (keep-masks, 8 per byte) and layers.json (per-linear figures). No stage holds more than one
decoder layer's weights, whatever the depth.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..core.layout import LAYERS, MASKS, WEIGHTS
from ..storage.documents import copy_file, read_json, write_json, write_text
from ..storage.safetensors import SafetensorsStreamWriter, TensorReader
from .loading import LayerwiseModel


# masks.safetensors holds each keep-mask bit-packed, 8 inputs per byte (numpy.unpackbits(..., axis=1,
# bitorder="little")[:, :columns] restores it): a uint8 per weight would be half a bf16 checkpoint's bytes
# again in every folder that carries masks. The metadata names the format and each mask's column count.
MASK_FORMAT = "packbits-little-1"
_BITS = 2 ** torch.arange(8, dtype=torch.uint8)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A (rows x columns) keep-mask as rows x ceil(columns / 8) bytes, input j in bit j % 8 of byte j // 8."""
    rows, columns = mask.shape
    padded = torch.zeros(rows, -(-columns // 8) * 8, dtype=torch.uint8, device=mask.device)
    padded[:, :columns] = mask.to(torch.uint8)
    return (padded.reshape(rows, -1, 8) * _BITS.to(mask.device)).sum(-1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, columns: int) -> torch.Tensor:
    """The boolean keep-mask `pack_mask` packed."""
    bits = (packed.unsqueeze(-1) & _BITS.to(packed.device)) != 0
    return bits.reshape(packed.shape[0], -1)[:, :columns]


class MaskReader:
    """The keep-masks of a stage checkpoint, one at a time, unpacked onto the reader's device (files of the
    earlier one-byte-per-weight form are read as they are)."""

    def __init__(self, path: Path, *, device, verify: str = "file"):
        self.file = TensorReader(path, device=device, verify=verify)
        meta = self.file.metadata()
        self.columns = json.loads(meta["columns"]) if meta.get("mask_format") == MASK_FORMAT else None

    def keys(self) -> list[str]:
        return self.file.keys()

    def __contains__(self, name: str) -> bool:
        return name in self.file

    def __getitem__(self, name: str) -> torch.Tensor:
        stored = self.file[name]
        return unpack_mask(stored, self.columns[name]) if self.columns is not None else stored.bool()

    def close(self) -> None:
        self.file.close()


def dense_maxima(weights: dict[str, torch.Tensor]) -> dict[str, float]:
    """Linear name → max|W_dense|: what `CheckpointWriter.add` compares each written weight with."""
    return {name: float(W.detach().abs().max()) for name, W in weights.items()}


def max_abs_ratio(weight: torch.Tensor, dense_max: float) -> float:
    """max|W| / max|W_dense| (0 for an all-zero dense weight: no scale to compare with)."""
    return float(weight.detach().abs().max()) / dense_max if dense_max > 0 else 0.0


class CheckpointWriter:
    """weights.safetensors (every decoder linear of `layers`), masks.safetensors (with `masks`) and
    layers.json, written layer by layer. Also counts each layer's exact zeros (the model card's sparsity)."""

    def __init__(self, out_dir: Path, lm: LayerwiseModel, layers, *, masks: bool):
        specs = lm.linear_specs(layers)
        self.out_dir, self.lm, self.infos, self.zeros = Path(out_dir), lm, {}, {}
        self.weights = SafetensorsStreamWriter(self.out_dir / WEIGHTS, specs)
        self.masks = SafetensorsStreamWriter(
            self.out_dir / MASKS, {k: (torch.uint8, (shape[0], -(-shape[1] // 8))) for k, (_, shape) in specs.items()},
            {"mask_format": MASK_FORMAT, "columns": json.dumps({k: shape[1] for k, (_, shape) in specs.items()})}
        ) if masks else None

    def add(self, i: int, layer_infos: dict[str, dict], dense_max: dict[str, float]) -> None:
        """Writes decoder layer i's current linear weights (and the masks in `layer_infos`). Each linear's
        info gains what its written weights hold: `density` (non-zero fraction) and `max_abs_ratio`,
        max|W| / max|W_dense| (`dense_max`: linear name → max|W_dense|), so a weight blow-up or a dense
        phase that is not dense shows in layers.json."""
        zeros = total = 0
        for name, full in self.lm.linear_names(i).items():
            weight = self.lm.layers[i].get_submodule(name).weight.detach()
            self.weights.write(full, weight)
            nonzero = int(torch.count_nonzero(weight))
            zeros, total = zeros + weight.numel() - nonzero, total + weight.numel()
            info = dict(layer_infos[name])
            mask = info.pop("mask", None)
            if self.masks is not None:
                self.masks.write(full, pack_mask(mask))
            info["density"] = nonzero / weight.numel()
            info["max_abs_ratio"] = max_abs_ratio(weight, dense_max[name])
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


def write_model_folder(lm: LayerwiseModel, weights_file: Path, out: Path, card: str) -> None:
    """A loadable Hugging Face folder: the base checkpoint with every decoder linear replaced by the ones in
    `weights_file` (one tensor in memory at a time, in the base's dtype and shards), the base's config,
    tokenizer and license files, checksums (written with each shard) and the model card. Dense with exact
    zeros: as large as the base (docs/serving.md)."""
    from ..report.modelcard import license_files

    lm.save_pretrained(out, TensorReader(weights_file, device="cpu"))
    lm.copy_tokenizer(out)
    for f in license_files(lm.folder):
        copy_file(f, Path(out) / f.name)
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
