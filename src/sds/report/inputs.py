"""What the report reads: evaluation JSONs, Snakemake's benchmark files and the checkpoint folders (which
(method, pattern, setting, stage) each holds, from core.layout; their per-linear errors)."""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from ..core.layout import LAYERS, benchmark_job, place_of
from ..core.patterns import pattern_from_slug
from ..storage.documents import read_json
from .plots import LayerErrors


def benchmark_seconds(paths: list[str]) -> dict[str, float]:
    """'stage/wildcards' → wall seconds, from results/<run>/benchmarks/<stage>/<name>.tsv files."""
    seconds = {}
    for path in paths:
        p = Path(path)
        if not p.is_file():
            continue
        rows = list(csv.DictReader(p.open(), delimiter="\t"))
        if rows:
            seconds[benchmark_job(p)] = float(rows[0]["s"])
    return seconds


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint folder of the run and what it holds, from the pipeline's output layout:
    <method>/<pattern slug>/{prune1,prune1_adjust} and <method>/<pattern slug>/<recon>/{reconstruct,sds}."""
    path: Path
    method: str
    pattern: str
    stage: str
    recon: str


def checkpoint_of(path: str | Path) -> Checkpoint:
    place = place_of(path)
    try:
        pattern = str(pattern_from_slug(place.pattern))
    except ValueError:
        pattern = place.pattern
    return Checkpoint(Path(path), place.method, pattern, place.label, place.recon)


def read_evals(evals: list[str]) -> list[dict]:
    """The eval JSONs in the order given (the config's order: the figures keep it), each verified against its
    checksum: a damaged one stops the report (and is removed for Snakemake to re-create) instead of being
    reported as measured."""
    return [read_json(p, verify=True) for p in evals]


def layer_errors(checkpoints: list[Checkpoint]) -> list[LayerErrors]:
    """Every sparse checkpoint's per-linear relative output error (its layers.json `rel_error`): after the
    first prune, after the adjustment, after SDS (the dense reconstruction is not a sparse model)."""
    out = []
    for ckpt in checkpoints:
        path = ckpt.path / LAYERS
        if ckpt.stage == "reconstruct" or not path.is_file():
            continue
        linears = read_json(path).get("linears", {})
        out.append(LayerErrors(ckpt.method, ckpt.pattern, ckpt.stage, ckpt.recon,
                               {name: float(info["rel_error"]) for name, info in linears.items()
                                if "rel_error" in info}))
    return out
