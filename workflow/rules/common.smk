# What every rule shares: the resolved config, the run's layout (src/sds/core/layout.py), each stage's
# config slice as its params (src/sds/core/stage_keys.py), cluster resources and the model's input files.
import json
import os
import shlex
import sys
from pathlib import Path

from snakemake.utils import update_config, validate

SRC = str(Path(workflow.basedir) / "src")
sys.path.insert(0, SRC)
from sds.core.config import ConfigError, config_hash, validate_config  # noqa: E402
from sds.core.layout import RunLayout, summary_csv, use_results_root  # noqa: E402
from sds.core.patterns import parse_pattern  # noqa: E402
from sds.core.stage_keys import DENSE_PHASE_KEYS, stage_params  # noqa: E402
from sds.storage.records import OUTPUT_RECORD, foreign_folders  # noqa: E402


# A job of a cluster run is its own Snakemake process that reads the Snakefile and the --configfiles again,
# which the user may have edited since the run started; every job must run the config its run started with.
# The run's first process names that config's file (written in `onstart`) in RUN_CONFIG, which sbatch
# exports to the jobs, and a job (remote or subprocess mode) reads it instead of the config files.
RUN_CONFIG = "SDS_RUN_CONFIG"
_JOB = workflow.remote_exec or workflow.subprocess_exec
if _JOB and os.environ.get(RUN_CONFIG):
    _started = json.loads(Path(os.environ[RUN_CONFIG]).read_text())
    config.clear()
    config.update(_started)
# Without --configfile the default config applies (with any --config overrides on top). A config given
# with --configfile stands alone: it is not merged with the default, so e.g. its `reconstruct` settings
# or `evaluate.datasets` are exactly the ones it names.
elif not workflow.overwrite_configfiles:
    import yaml

    _default = yaml.safe_load((Path(workflow.basedir) / "config" / "config.yaml").read_text())
    update_config(_default, dict(config))
    config.clear()
    config.update(_default)


# Every error at once, one line each; the first process of a run also finds each hf: dataset in the local
# cache (its jobs run the config it checked).
try:
    RESOLVED = validate_config(config, hf_sources=not _JOB)
except ConfigError as exc:
    sys.stderr.write(f"sds: invalid configuration: {exc.report()}\n")
    sys.exit(1)
validate(config, str(Path(workflow.basedir) / "config" / "schema.yaml"))  # the same schema through Snakemake

RUN = RESOLVED["run"]
# The results root (config `results_dir`, else $SDS_RESULTS, else results/), exported as SDS_RESULTS so that
# every stage process and cluster job (and the MLflow store they write) uses the same one.
RESULTS_ROOT = use_results_root(RESOLVED)
L = RunLayout(RUN, RESULTS_ROOT)
SUMMARY_CSV = summary_csv(RESULTS_ROOT)
R = L.root
BUILTIN = RESOLVED["model"]["source"] == "builtin"
METHODS = RESOLVED["prune"]["methods"]
PATTERNS = [parse_pattern(p).slug for p in RESOLVED["prune"]["patterns"]]
RECONS = list(RESOLVED["reconstruct"])
# prune1 caches its pruned stream (one Parquet file per layer) only for settings that re-run layers on it
PRUNED_STREAM = any(r["inputs"] == "pruned" and r["target"] == "dense_stream" for r in RESOLVED["reconstruct"].values())
# Layer 0's input, where every sequential pass starts; the dense model's input to every layer is cached
# (one forward pass of the calibration set) only for the settings that read it.
INPUTS = L.layer_inputs
DENSE = L.dense_activations
ADJUST_NEEDS_DENSE = RESOLVED["prune2"]["adjust_target"] == "dense_stream"
# OWL's outlier fractions (one dense pass) are computed once and read by every prune1
OWL = RESOLVED["prune"]["sparsity_profile"] == "owl"


def _dense_phase(recon):
    return json.dumps({k: RESOLVED["reconstruct"][recon][k] for k in DENSE_PHASE_KEYS}, sort_keys=True)


# SDS settings that differ only in their second prune share one dense reconstruction: each setting's
# reconstruct output is the first setting's with the same dense-phase keys.
RECON_SOURCE = {r: next(q for q in RECONS if _dense_phase(q) == _dense_phase(r)) for r in RECONS}


def recon_needs_dense(recon):
    settings = RESOLVED["reconstruct"][recon]
    return settings["inputs"] == "dense" or settings["target"] == "dense_stream"


PY = sys.executable

# Snakemake deletes a job's output folder before the job runs, so a folder of the user's at an output
# location (say notes kept in a checkpoint folder) would be lost without a word: such a run stops here,
# before any job, naming it. An output folder the pipeline wrote carries its ownership record.
_FOREIGN = foreign_folders(L.output_folders(METHODS, PATTERNS, RECONS, builtin=BUILTIN))
if _FOREIGN and not _JOB:
    sys.stderr.write(f"sds: {_FOREIGN[0]} exists and is not an output this pipeline wrote there (no "
                     f"{OUTPUT_RECORD} record naming it); Snakemake would delete it before re-creating it, so "
                     "nothing was run: move it elsewhere" + (f" ({len(_FOREIGN) - 1} more such folders)"
                                                            if len(_FOREIGN) > 1 else "") + "\n")
    sys.exit(1)

# The model every stage reads, and the files of it that are rule inputs: the built-in model is the
# build_model rule's output folder; an external one (a local folder, or a Hugging Face id resolved to its
# snapshot in the local cache) is the list of files a stage reads (weights, config, tokenizer), so
# replacing its weights re-runs everything downstream and nothing else.
if BUILTIN:
    MODEL = L.model
    MODEL_INPUT = MODEL
else:
    from sds.core.architectures import model_files  # noqa: E402
    from sds.core.config import model_folder  # noqa: E402

    MODEL = str(model_folder(RESOLVED))
    MODEL_INPUT = model_files(MODEL)


def text_input(source):
    """A text source as a rule input: a local file is one (editing it re-runs its readers); 'builtin' and
    hf: datasets are not files here."""
    return [] if source == "builtin" or source.startswith("hf:") else [source]


CALIBRATION_TEXT = text_input(RESOLVED["calibration"]["source"])
EVAL_TEXTS = [f for source in RESOLVED["evaluate"]["datasets"].values() for f in text_input(source)]

# The resolved config every stage reads, under a name given by its content, written when a run starts
# (`onstart` runs neither on a dry run nor when nothing is to be done, so `snakemake -n` writes nothing).
# It is not a rule input: a change re-runs only the rules whose `params` (their own slice of the config)
# changed. A run keeps reading the file it started with, even if the config is edited meanwhile.
_resolved_text = json.dumps(RESOLVED, indent=2, sort_keys=True) + "\n"
CONFIG_JSON = L.config_json(config_hash(RESOLVED))
if not _JOB:
    os.environ[RUN_CONFIG] = str(Path(CONFIG_JSON).resolve())  # for this run's cluster jobs (see above)


onstart:
    if not _JOB and (not os.path.exists(CONFIG_JSON) or open(CONFIG_JSON).read() != _resolved_text):
        os.makedirs(os.path.dirname(CONFIG_JSON), exist_ok=True)
        with open(CONFIG_JSON + ".tmp", "w") as _fh:
            _fh.write(_resolved_text)
        os.replace(CONFIG_JSON + ".tmp", CONFIG_JSON)


# quoted: a checkout or virtual environment whose path holds a space still runs every rule
STAGE = f"PYTHONPATH={shlex.quote(SRC)}${{PYTHONPATH:+:$PYTHONPATH}} {shlex.quote(PY)} -m sds.cli"


# The config's MLflow pipeline run stays RUNNING while stages run and ends once this invocation is over:
# FINISHED (at its last stage's end) or FAILED. The hooks run in the main Snakemake process only (on SLURM
# too, after every job), never in a job; they never fail the workflow (src/sds/tracking/pipeline.py).
def _close_pipeline_run(status):
    if not _JOB and RESOLVED["mlflow"]["enabled"] and os.path.exists(CONFIG_JSON):
        import subprocess

        path = os.pathsep.join(p for p in (SRC, os.environ.get("PYTHONPATH")) if p)
        subprocess.run([PY, "-m", "sds.tracking.pipeline", status, "--config", CONFIG_JSON],
                       env={**os.environ, "PYTHONPATH": path}, check=False)


onsuccess:
    _close_pipeline_run("finished")


onerror:
    _close_pipeline_run("failed")
THREADS = RESOLVED["threads"]


def keys_of(stage):
    """`params` of a rule: the values of the config keys its stage reads (core/stage_keys.py), per job's
    wildcards; Snakemake re-runs a job when they change."""
    def deps(wildcards):
        return stage_params(RESOLVED, stage, method=getattr(wildcards, "method", None),
                            recon=getattr(wildcards, "recon", None))
    return deps


def rule_resources(rule_name, inherits=None):
    """Cluster resources of a rule that runs as a job, from config `resources`: `default`, then the entry
    of `inherits` (reconstruct_layer takes reconstruct's), then the rule's own, key by key. Unset keys are
    left out, so the profile's default-resources and the rule's threads (as --cpus-per-task) apply. A `gpu: 0`
    is kept, so it also overrides a profile's default gpu (the SLURM plugin requests nothing for 0). Used as
    `resources: **rule_resources("name")`; see docs/cluster.md."""
    entries = [RESOLVED["resources"]["default"], RESOLVED["resources"].get(inherits, {}),
               RESOLVED["resources"].get(rule_name, {})]
    merged = {key: value for entry in entries for key, value in entry.items()}
    if not merged.get("gpu"):
        merged.pop("gpu_model", None)  # with no GPU count the plugin would request `--gpus=<model>:1`
    return merged


wildcard_constraints:
    method="magnitude|wanda|sparsegpt|admm|alps",
    pattern=r"\d+of\d+|unstructured[0-9p]+",
    recon=r"[A-Za-z0-9_.-]+",
