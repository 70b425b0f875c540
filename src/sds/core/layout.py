"""Every path under results/: the run folder's layout, in one place. The rules, the stages, the report and the
CLI ask this module where a file is and, for a checkpoint folder, which (method, pattern, setting, stage) it
holds; nothing else builds or parses these paths.

    results/<run>/corpus/, model/                    the built-in model (corpus, build_model)
    results/<run>/calibration.parquet                calibration token windows
    results/<run>/activations/{input,dense}/         layer_NNN.parquet: decoder layer inputs
    results/<run>/activations/owl.json               OWL's per-layer outlier fractions (sparsity_profile: owl)
    results/<run>/<method>/<pattern>/prune1/         a stage checkpoint: weights.safetensors, masks.safetensors,
    results/<run>/<method>/<pattern>/prune1_adjust/  layers.json (prune1 also stats/layer_NNN.safetensors and,
    results/<run>/<method>/<pattern>/<recon>/reconstruct/      for the dense_stream target, stream/)
    results/<run>/<method>/<pattern>/<recon>/sds/    the SDS checkpoint, with model/ (a loadable folder)
    results/<run>/export/<method>/<pattern>/<stage>/ exported one-shot checkpoints (masks, model/)
    results/<run>/eval/…json, tasks/, report/, config/<hash>.json, logs/, benchmarks/, mlflow_pending/
    results/summary.csv, zeroshot_summary.csv, mlflow.db, mlflow-server/   shared by every run

`results/` is the results root: config key `results_dir` if a config sets it, else the environment variable
SDS_RESULTS, else `results` (e.g. a scratch file system: `SDS_RESULTS=/scratch/$USER/sds`). Whoever loads a
config (the Snakefile, the CLI) exports its root as SDS_RESULTS (`use_results_root`), so every stage process
and cluster job, the MLflow store and `sds sync` find the same folder; every path below follows it.

Paths are strings relative to the working directory (Snakemake's `-d`) unless the root is absolute; a
placeholder such as "{method}" passed for a part gives the rule's wildcard pattern.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

RESULTS_ENV = "SDS_RESULTS"
DEFAULT_RESULTS = "results"


def results_root(config: Mapping | None = None) -> str:
    """The results root: `config["results_dir"]` where set, else $SDS_RESULTS, else `results`."""
    configured = (config or {}).get("results_dir")
    return str(configured or os.environ.get(RESULTS_ENV) or DEFAULT_RESULTS).rstrip("/") or "/"


def use_results_root(config: Mapping | None = None) -> str:
    """Makes `config`'s results root this process's (and its children's: stages, cluster jobs) by exporting it
    as SDS_RESULTS; returns it."""
    root = results_root(config)
    os.environ[RESULTS_ENV] = root
    return root


# Files under the root that every run shares; each a function of the root (by default, the current one).
SHARED = {
    "SUMMARY_CSV": "summary.csv",
    "ZEROSHOT_SUMMARY_CSV": "zeroshot_summary.csv",
    "MLFLOW_DB": "mlflow.db",
    "MLFLOW_LOCK": ".mlflow.lock",
    "MLFLOW_SERVER_STATE": "mlflow-server",
    "MLFLOW_ARTIFACTS": "mlartifacts",  # the default local store's artifacts
}


def shared_file(name: str, root: str | None = None) -> str:
    """One of SHARED's files (by its constant's name, e.g. "MLFLOW_DB") under `root` (default: the current root)."""
    return f"{root or results_root()}/{SHARED[name]}"


def summary_csv(root: str | None = None) -> str:
    return shared_file("SUMMARY_CSV", root)


def mlflow_db(root: str | None = None) -> str:
    return shared_file("MLFLOW_DB", root)


def __getattr__(name: str) -> str:
    """`RESULTS`, `SUMMARY_CSV`, `MLFLOW_DB`, … as module attributes, resolved against the root when read
    (`from sds.core.layout import MLFLOW_DB` takes the root of that moment: the CLI sets it first)."""
    if name == "RESULTS":
        return results_root()
    if name in SHARED:
        return shared_file(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# inside a stage checkpoint folder
WEIGHTS = "weights.safetensors"
MASKS = "masks.safetensors"
LAYERS = "layers.json"
STATS = "stats"
STREAM = "stream"
MODEL = "model"
MANIFEST = "manifest.json"  # layer_inputs/activations: layers, nsamples, seqlen, dtype
BUILD_RECORD = "build.json"  # the built-in model's training record
WORK = "work"  # a layer pass's working stream, inside the output being built
PENDING = "mlflow_pending"  # in a run folder: MLflow records kept while the store was unreachable

ONE_SHOT_STAGES = ("prune1", "prune1_adjust")  # checkpoints directly below <method>/<pattern>/
SETTING_STAGES = ("reconstruct", "sds")  # checkpoints below <method>/<pattern>/<recon>/
STAGE_LABELS = {"prune1_adjust": "prune1+adjust"}  # how reports and evaluations name a stage


def layer_file(folder: str | Path, layer: int, suffix: str = ".parquet") -> Path:
    """Decoder layer `layer`'s file in a per-layer folder: a stream's layer_i (the input of decoder layer i)
    or prune1's stats/layer_i.safetensors."""
    return Path(folder) / f"layer_{layer:03d}{suffix}"


def stats_file(prune1_dir: str | Path, layer: int) -> Path:
    return layer_file(Path(prune1_dir) / STATS, layer, ".safetensors")


@dataclass(frozen=True)
class RunLayout:
    """The folder of one run, `<results root>/<run>` (`results`: the root, by default the current one)."""
    run: str
    results: str = field(default_factory=results_root)

    @property
    def root(self) -> str:
        return f"{self.results}/{self.run}"

    def _at(self, *parts: str) -> str:
        return "/".join((self.root, *parts))

    def config_json(self, digest: str) -> str:
        return self._at("config", f"{digest}.json")

    corpus = property(lambda self: self._at("corpus"))
    model = property(lambda self: self._at("model"))
    calibration = property(lambda self: self._at("calibration.parquet"))
    layer_inputs = property(lambda self: self._at("activations", "input"))
    dense_activations = property(lambda self: self._at("activations", "dense"))
    owl = property(lambda self: self._at("activations", "owl.json"))  # OWL's per-layer outlier fractions
    tasks = property(lambda self: self._at("tasks"))
    report_dir = property(lambda self: self._at("report"))
    report_md = property(lambda self: self._at("report", "report.md"))
    report_table = property(lambda self: self._at("report", "table.csv"))
    report_zeroshot = property(lambda self: self._at("report", "zeroshot.csv"))
    pending = property(lambda self: self._at(PENDING))

    def checkpoint(self, method="{method}", pattern="{pattern}", stage="{stage}", recon="{recon}") -> str:
        """A stage checkpoint folder: prune1 / prune1_adjust per (method, pattern), reconstruct / sds per
        setting too; `reconstruct_layers/<i>` is one layer's part of a layer-parallel reconstruction."""
        if stage in SETTING_STAGES or stage.startswith("reconstruct_layers"):
            return self._at(method, pattern, recon, stage)
        return self._at(method, pattern, stage)

    def prune1(self, method="{method}", pattern="{pattern}") -> str:
        return self.checkpoint(method, pattern, "prune1")

    def reconstruct(self, method="{method}", pattern="{pattern}", recon="{recon}") -> str:
        return self.checkpoint(method, pattern, "reconstruct", recon)

    def reconstruct_layer(self, method="{method}", pattern="{pattern}", recon="{recon}", layer="{layer}") -> str:
        return self.checkpoint(method, pattern, f"reconstruct_layers/{layer}", recon)

    def sds(self, method="{method}", pattern="{pattern}", recon="{recon}") -> str:
        return self.checkpoint(method, pattern, "sds", recon)

    def export(self, method="{method}", pattern="{pattern}", stage="{stage}") -> str:
        return self._at("export", method, pattern, stage)

    def evaluation(self, method="", pattern="", stage="dense", recon="") -> str:
        """The evaluation JSON of a checkpoint (dense: the model itself)."""
        if stage == "dense":
            return self._at("eval", "dense.json")
        return self._at("eval", method, pattern, *((recon,) if stage in SETTING_STAGES else ()), f"{stage}.json")

    def output_folders(self, methods, patterns, recons, *, builtin: bool) -> list[str]:
        """Every folder the rules of this run may write (a layer-parallel reconstruction's parts aside)."""
        out = [self.layer_inputs, self.dense_activations, self.tasks] + ([self.corpus, self.model] if builtin else [])
        for m in methods:
            for p in patterns:
                out += [self.checkpoint(m, p, s) for s in ONE_SHOT_STAGES]
                out += [self.export(m, p, s) for s in ONE_SHOT_STAGES]
                out += [self.checkpoint(m, p, s, r) for r in recons for s in SETTING_STAGES]
        return out

    def log(self, stage: str, *parts: str) -> str:
        """logs/<stage>.log, or logs/<stage>/<parts joined by _>.log for a stage with wildcards."""
        return self._at("logs", f"{stage}.log") if not parts else self._at("logs", stage, "_".join(parts) + ".log")

    def benchmark(self, stage: str, *parts: str) -> str:
        """benchmarks/<stage>/<parts joined by _ (or the stage's name)>.tsv: Snakemake's record of one job."""
        return self._at("benchmarks", stage, ("_".join(parts) or stage) + ".tsv")


@dataclass(frozen=True)
class Place:
    """What a checkpoint folder of the layout holds (`recon` empty for the one-shot stages)."""
    method: str
    pattern: str  # the pattern's slug, as in the path
    stage: str
    recon: str = ""

    @property
    def label(self) -> str:
        return STAGE_LABELS.get(self.stage, self.stage)


def place_of(path: str | Path) -> Place:
    """The (method, pattern, setting, stage) of a checkpoint folder (or of an export folder)."""
    p = Path(path)
    parts = ("", "", "", *p.parts)
    if p.parent.name == "reconstruct_layers":
        return Place(parts[-5], parts[-4], "reconstruct", parts[-3])
    if p.name in ONE_SHOT_STAGES:
        return Place(parts[-3], parts[-2], p.name)
    return Place(parts[-4], parts[-3], p.name, parts[-2])


def benchmark_job(path: str | Path) -> str:
    """'<stage>/<job>' of a benchmark file (see RunLayout.benchmark), as the report names it."""
    p = Path(path)
    return f"{p.parent.name}/{p.stem}"


def run_dir(run: str, results: str | None = None) -> Path:
    return Path(RunLayout(run, results or results_root()).root)


def runs_with_pending(results: str | None = None) -> list[str]:
    """The runs under the results root that hold MLflow records kept for `sds sync`."""
    root = Path(results or results_root())
    return sorted(p.parent.name for p in root.glob(f"*/{PENDING}") if p.is_dir() and any(p.glob("*.json")))
