"""What the report reads: evaluation JSONs, each job's measured seconds (beside Snakemake's benchmark
files), the checkpoint folders (which (method, pattern, setting, stage) each holds, from core.layout; their
per-linear errors, densities and max|W| / max|W_dense|) and the bytes each stage's output takes on disk."""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

from ..core.layout import LAYERS, ONE_SHOT_STAGES, Place, RunLayout, benchmark_job, place_of
from ..core.patterns import pattern_from_slug
from ..storage.digests import CHECKSUM_SUFFIX, TENSORS_SUFFIX
from ..storage.documents import read_json
from ..storage.records import OUTPUT_RECORD
from .plots import LayerErrors


def benchmark_seconds(paths: list[str]) -> dict[str, float]:
    """'stage/wildcards' → seconds of each job of results/<run>/benchmarks/<stage>/<name>.tsv: the stage's
    own measured seconds (<name>.seconds.json beside it, written by the stage: the duration its MLflow run
    shows), else Snakemake's wall time from the .tsv (a stage that wrote no seconds file)."""
    seconds = {}
    for path in paths:
        p = Path(path)
        measured = p.with_suffix(".seconds.json")
        if measured.is_file():
            seconds[benchmark_job(p)] = float(read_json(measured)["seconds"])
            continue
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


def sparsity_profiles(checkpoints: list[Checkpoint]) -> dict[tuple[str, str], dict]:
    """(method, pattern) → the per-layer sparsity profile its prune1 recorded (sparsity_profile 'owl':
    `layer_sparsity`, `owl`), for those with one."""
    out = {}
    for ckpt in checkpoints:
        path = ckpt.path / LAYERS
        if ckpt.stage != "prune1" or not path.is_file():
            continue
        summary = read_json(path)
        if summary.get("layer_sparsity"):
            out[(ckpt.method, ckpt.pattern)] = {k: summary[k] for k in ("sparsity_profile", "layer_sparsity", "owl")
                                                if k in summary}
    return out


@dataclass(frozen=True)
class WeightFigures:
    """What one checkpoint's linears hold (its layers.json): each one's density (non-zero fraction) and
    max|W| / max|W_dense| (`max_abs_ratio`), by full weight name."""
    method: str
    pattern: str
    stage: str
    recon: str
    density: dict[str, float]
    max_abs_ratio: dict[str, float]


def weight_figures(checkpoints: list[Checkpoint]) -> list[WeightFigures]:
    """Every checkpoint's per-linear density and max|W| / max|W_dense|, the dense reconstruction's too
    (whether the dense phase is dense is its question); checkpoints written before layers.json recorded
    them are left out."""
    out = []
    for ckpt in checkpoints:
        path = ckpt.path / LAYERS
        if not path.is_file():
            continue
        linears = {name: info for name, info in read_json(path).get("linears", {}).items()
                   if "density" in info and "max_abs_ratio" in info}
        if linears:
            out.append(WeightFigures(ckpt.method, ckpt.pattern, ckpt.stage, ckpt.recon,
                                     {n: float(i["density"]) for n, i in linears.items()},
                                     {n: float(i["max_abs_ratio"]) for n, i in linears.items()}))
    return out


# what lies beside a file output and is written with it: its checksum, per-tensor digests, ownership record
_BESIDE = (CHECKSUM_SUFFIX, TENSORS_SUFFIX, OUTPUT_RECORD)


def bytes_on_disk(path: str | Path) -> int | None:
    """The sizes of the files of an output summed: a folder's files at any depth, or a file and what is
    written beside it (_BESIDE); symbolic links are not followed (what they point to is not this output's).
    None if it is not there."""
    path = Path(path)
    if path.is_symlink() or not path.exists():
        return None
    if path.is_file():
        return sum(f.lstat().st_size for f in [path, *(path.with_name(path.name + s) for s in _BESIDE)]
                   if f.is_file() and not f.is_symlink())
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            st = os.lstat(os.path.join(folder, name))
            total += st.st_size if not os.path.islink(os.path.join(folder, name)) else 0
    return total


def model_weights_bytes(model_dir: str | Path) -> int | None:
    """The source model's weights: its *.safetensors files (a hub snapshot's links followed), or None."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    return sum(f.stat().st_size for f in files) if files else None


@dataclass(frozen=True)
class StageOutput:
    """What one benchmarked job wrote: its outputs (layout paths) and the (method, pattern slug) it belongs
    to, empty for the stages every method shares."""
    paths: tuple[Path, ...]
    method: str = ""
    pattern: str = ""


def _jobs(root: Path, places) -> dict[str, StageOutput]:
    """Every job's outputs in the run folder `root`, for the (method, pattern, setting)s of `places`."""
    L = RunLayout(root.name)

    def out(*layout_paths: str, place=None) -> StageOutput:
        paths = tuple(root / Path(p).relative_to(L.root) for p in layout_paths)
        return StageOutput(paths, *((place.method, place.pattern) if place else ()))

    jobs = {"corpus": out(L.corpus), "build_model": out(L.model), "calibration": out(L.calibration),
            "layer_inputs": out(L.layer_inputs), "activations": out(L.dense_activations),
            "zeroshot_tasks": out(L.tasks)}
    jobs = {benchmark_job(L.benchmark(stage)): o for stage, o in jobs.items()}
    jobs[benchmark_job(L.benchmark("evaluate", "dense"))] = out(L.evaluation())
    for pl in {Place(pl.method, pl.pattern, "") for pl in places}:
        m, p = pl.method, pl.pattern
        for stage in ONE_SHOT_STAGES:
            jobs[benchmark_job(L.benchmark(stage, m, p))] = out(L.checkpoint(m, p, stage), place=pl)
            jobs[benchmark_job(L.benchmark("evaluate", m, p, stage))] = out(L.evaluation(m, p, stage), place=pl)
            jobs[benchmark_job(L.benchmark("export", m, p, stage))] = out(L.export(m, p, stage), place=pl)
    for pl in {Place(pl.method, pl.pattern, "", pl.recon) for pl in places if pl.recon}:
        m, p, r = pl.method, pl.pattern, pl.recon
        parts = str(Path(L.reconstruct_layer(m, p, r, "0")).parent)  # a layer-parallel run's per-layer parts
        jobs[benchmark_job(L.benchmark("reconstruct", m, p, r))] = out(L.reconstruct(m, p, r), parts, place=pl)
        jobs[benchmark_job(L.benchmark("prune2", m, p, r))] = out(L.sds(m, p, r), place=pl)
        jobs[benchmark_job(L.benchmark("evaluate", m, p, r, "sds"))] = out(L.evaluation(m, p, "sds", r), place=pl)
    return jobs


def stage_outputs(benchmarks: list[str], checkpoints: list[str]) -> dict[str, StageOutput]:
    """'stage/job' (benchmark_seconds' keys) → what that job wrote, for the jobs among `benchmarks` whose output
    the layout knows (not the report's own). The run's folder is the one that holds the benchmark files (so
    relative and absolute paths both work); the (method, pattern, setting)s are the `checkpoints`' places."""
    places = [place_of(c) for c in checkpoints]
    known: dict[Path, dict[str, StageOutput]] = {}
    found = {}
    for path in map(Path, benchmarks):
        root = path.parent.parent.parent  # results/<run>/benchmarks/<stage>/<job>.tsv
        if root not in known:
            known[root] = _jobs(root, places)
        jobs = known[root]
        if benchmark_job(path) in jobs:
            found[benchmark_job(path)] = jobs[benchmark_job(path)]
    return found


def output_bytes(outputs: dict[str, StageOutput]) -> dict[str, int]:
    """'stage/job' → bytes on disk of what it wrote (the outputs that are there)."""
    sizes = {job: [bytes_on_disk(p) for p in out.paths] for job, out in outputs.items()}
    return {job: sum(n for n in found if n is not None) for job, found in sizes.items()
            if any(n is not None for n in found)}
