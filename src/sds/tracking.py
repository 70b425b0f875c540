"""MLflow tracking: one parent run per pipeline config (keyed by the config hash), a child run per stage.

What a user compares lives where the MLflow UI shows it:
- the experiment is a model-training one (`mlflow.experimentKind`), so the UI opens on its runs;
- every child run spans its stage's real wall-clock time (kept in the record, so also when replayed later),
  and the parent spans them all (it is created with the first stage's start and ends with the last one);
- the parent carries the headline numbers of every evaluated checkpoint (`ppl.<dataset>.<checkpoint>`,
  `sparsity.<checkpoint>`, `zeroshot_acc.<checkpoint>`), logged as each evaluation finishes;
- per-linear quantities are stepped metrics, step = decoder layer: `rel_error.<stage>.<linear kind>`;
- the texts a stage read are dataset inputs (source, digest of the text, token count);
- SDS and exported checkpoints are logged models, registered under `sds-<run>-<method>-<pattern>-<setting>`.

The default store is SQLite under results/ (no server). MLFLOW_TRACKING_URI points it elsewhere. If the
store cannot be reached, the stage still succeeds: the record is kept under
results/<run>/mlflow_pending/ and `python -m sds.cli sync` replays it later, with its own times.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)

RESULTS = Path("results")
# MLflow 3 picks an experiment's default view from this tag ("genai_development" opens on traces)
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
# Model weights up to this size are copied into the artifact store; bigger ones are registered by
# reference (their folder's path), so a 7B checkpoint is not duplicated. A storage choice of the tracking
# destination, like MLFLOW_TRACKING_URI, so it is an environment variable and not part of the config hash.
COPY_WEIGHTS_ENV = "SDS_MLFLOW_COPY_WEIGHTS_MB"
COPY_WEIGHTS_DEFAULT_MB = 256
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(RESULTS / 'mlflow.db').resolve()}"


@contextlib.contextmanager
def _store_lock():
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / ".mlflow.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = json.dumps(value) if not isinstance(value, str) else value
    return out


# --- what the stages hand over ------------------------------------------------------------------------

def checkpoint_id(method: str = "", pattern: str = "", recon: str = "", stage: str = "dense") -> str:
    """A checkpoint as a metric-key suffix: `dense`, `sparsegpt.2of4.prune1`, `sparsegpt.2of4.prune1_adjust`,
    `sparsegpt.2of4.default.sds` (pattern as its slug; '+' is not allowed in MLflow keys)."""
    if pattern and ":" in pattern:
        from .patterns import parse_pattern

        pattern = parse_pattern(pattern).slug
    return ".".join(x for x in (method, pattern, recon, stage.replace("+", "_")) if x)


def headline_metrics(result: dict) -> dict[str, float]:
    """The numbers that compare checkpoints, from one evaluation's result (an eval/*.json):
    ppl.<dataset>.<checkpoint>, sparsity.<checkpoint> and zeroshot_acc.<checkpoint> (mean over tasks)."""
    ckpt = checkpoint_id(result["method"], result["pattern"], result["recon"], result["stage"])
    out = {f"ppl.{name}.{ckpt}": float(value) for name, value in result["ppl"].items()}
    out[f"sparsity.{ckpt}"] = float(result["sparsity"])
    acc = ((result.get("zeroshot") or {}).get("mean") or {}).get("acc")
    if acc is not None:
        out[f"zeroshot_acc.{ckpt}"] = float(acc)
    return out


def layer_metrics(infos: dict, stage: str) -> list[tuple[str, float, int]]:
    """Per-linear quantities (every `rel_error*` entry) as stepped metrics: key `<quantity>.<stage>.<linear
    kind>`, step = decoder layer index. Both come from the full weight name, whatever the architecture:
    the layer index is its first numeric component (`model.decoder.layers.3.fc1.weight`,
    `model.layers.3.mlp.down_proj.weight`), the linear kind what follows it, without `.weight`."""
    metrics = []
    for name, info in sorted(infos.items()):
        parts = name.split(".")
        at = next((i for i, p in enumerate(parts) if p.isdigit()), None)
        layer, kind = (0, parts) if at is None else (int(parts[at]), parts[at + 1:])
        if kind and kind[-1] in ("weight", "bias"):
            kind = kind[:-1]
        for key, value in sorted(info.items()):
            if key.startswith("rel_error") and isinstance(value, (int, float)) and not isinstance(value, bool):
                metrics.append((f"{key}.{stage}.{'.'.join(kind)}", float(value), layer))
    return metrics


def text_input(name: str, source: str, text: str, tokens: int, context: str, path: str | Path | None = None,
               **profile) -> dict:
    """A text a stage read, as a dataset input: `source` is the configured source ('builtin', a path or
    'hf:<dataset>[:<config>[:<split>]]'), `path` the file actually read (for 'builtin'); the digest is of
    the text as tokenized (UTF-8, SHA-256, 16 hex digits)."""
    if path or not source.startswith("hf:"):
        source = str(Path(path or source).resolve())
    return {"name": name, "source": source, "context": context,
            "digest": hashlib.sha256(text.encode("utf-8")).hexdigest()[:16],
            "profile": {"tokens": int(tokens), "characters": len(text), **profile}}


def registered_name(run: str, *parts: str) -> str:
    """The Model Registry name of a checkpoint: sds-<run>-<method>-<pattern>-<setting>."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", "-".join(("sds", run, *parts)))


def model_entry(name: str, path: str | Path, tags: dict, producer: str | None = None) -> dict:
    """A checkpoint folder to log as a model and register under `name`, with `tags`. `producer`: the stage
    (child run name) that wrote it, which the model is linked to as an output."""
    limit_mb = float(os.environ.get(COPY_WEIGHTS_ENV, COPY_WEIGHTS_DEFAULT_MB))
    return {"name": name, "path": str(Path(path).resolve()), "tags": {k: str(v) for k, v in tags.items()},
            "producer": producer, "copy_weights_bytes": int(limit_mb * 2 ** 20)}


def evaluated_model_entry(run: str, result: dict, model_dir: str | Path) -> dict:
    """The model entry of an evaluated SDS checkpoint: registered when its evaluation finishes, so every
    registry version carries its perplexity and sparsity; prune2 wrote it."""
    method, pattern, recon = result["method"], result["pattern"], result["recon"]
    slug = Path(model_dir).parent.parent.parent.name  # <method>/<pattern slug>/<recon>/sds/model
    tags = {"method": method, "pattern": pattern, "recon": recon, "stage": result["stage"],
            "sparsity": result["sparsity"], **{f"ppl.{k}": v for k, v in result["ppl"].items()},
            "zeroshot_acc": (result.get("zeroshot") or {}).get("mean", {}).get("acc")}
    return model_entry(registered_name(run, method, slug, recon), model_dir,
                       {k: v for k, v in tags.items() if v is not None}, producer=f"prune2/{method}/{slug}/{recon}")


# --- logging one record -------------------------------------------------------------------------------

def _client():
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    logging.getLogger("alembic").setLevel(logging.WARNING)
    logging.getLogger("mlflow.store.model_registry.abstract_store").setLevel(logging.WARNING)
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri())


def _experiment(client, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is None:
        # the default local store keeps artifacts under results/ too (MLflow would use ./mlruns)
        local = not os.environ.get("MLFLOW_TRACKING_URI")
        location = (RESULTS / "mlartifacts").resolve().as_uri() if local else None
        return client.create_experiment(name, artifact_location=location, tags=dict([EXPERIMENT_KIND]))
    if exp.tags.get(EXPERIMENT_KIND[0]) != EXPERIMENT_KIND[1]:  # created before the kind was set
        client.set_experiment_tag(exp.experiment_id, *EXPERIMENT_KIND)
    return exp.experiment_id


def _parent_run(client, exp_id: str, record: dict):
    found = client.search_runs([exp_id], filter_string=f"tags.sds_config_hash = '{record['config_hash']}' "
                                                       f"and tags.sds_role = 'pipeline'", max_results=1)
    if found:
        return found[0]
    # MLflow cannot change a run's start once it exists: the parent starts with the first stage it hears of
    # (stages run in dependency order; sync replays records oldest first); its end follows the last stage's
    run = client.create_run(exp_id, start_time=record["start_ms"], run_name=f"{record['run']}-{record['config_hash']}",
                            tags={"sds_config_hash": record["config_hash"], "sds_role": "pipeline",
                                  "sds_run": record["run"], **record.get("provenance", {})})
    from mlflow.entities import Param

    params = [Param(k[:250], v[:6000]) for k, v in sorted(flatten(record["config"]).items())]
    params.append(Param("config_hash", record["config_hash"]))
    for i in range(0, len(params), 100):
        client.log_batch(run.info.run_id, params=params[i:i + 100])
    client.set_terminated(run.info.run_id, end_time=record["end_ms"])
    return client.get_run(run.info.run_id)


def _stage_runs(client, exp_id: str, record: dict, stage: str) -> list:
    return client.search_runs([exp_id], filter_string=f"tags.sds_config_hash = '{record['config_hash']}' and "
                                                      f"tags.sds_role = 'stage' and tags.sds_stage = '{stage}'")


def _dataset_inputs(inputs: list[dict]) -> list:
    import warnings

    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    class TextDataset(MetaDataset):
        """Metadata of a text (no rows are logged), with its token count as the profile."""

        def __init__(self, source, name, digest, profile):
            self._profile = profile
            super().__init__(source, name=name, digest=digest)

        @property
        def profile(self):
            return self._profile

        def to_dict(self):
            return {**super().to_dict(), "profile": json.dumps(self._profile)}

    out = []
    for item in inputs:
        if item["source"].startswith("hf:"):
            from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource

            path, config_name, split = (item["source"][3:].split(":") + [None, None])[:3]
            source = HuggingFaceDatasetSource(path, config_name=config_name, split=split)
        else:
            from mlflow.data.dataset_source_registry import resolve_dataset_source

            with warnings.catch_warnings():  # two registered classes claim local paths; both are "local"
                warnings.simplefilter("ignore")
                source = resolve_dataset_source(item["source"])
        dataset = TextDataset(source, item["name"], item["digest"], item["profile"])
        out.append(DatasetInput(dataset._to_mlflow_entity(), [InputTag("mlflow.data.context", item["context"])]))
    return out


def _log_model(client, exp_id: str, record: dict, child: str, parent: str, producer: str) -> None:
    """Logs a checkpoint folder as an MLflow logged model (model card, config and tokenizer always; the
    weights too up to the copy limit, else a weights.json reference to the folder) and registers it.
    Its source run is the pipeline's (the runs table's Models column shows a model on its source run's
    row, so a config's checkpoints are on its row); it is an output of the stage that wrote it and an
    input of the stage logging it, if they differ."""
    from mlflow.entities import LoggedModelInput, LoggedModelOutput

    entry = record["model"]
    folder = Path(entry["path"])
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {folder} is gone; re-create it before `sds.cli sync`")
    files = sorted(p for p in folder.iterdir() if p.is_file())
    weights = [p for p in files if p.name.endswith(WEIGHT_SUFFIXES)]
    copy = sum(p.stat().st_size for p in weights) <= entry["copy_weights_bytes"]
    tags = {**entry["tags"], "sds_config_hash": record["config_hash"], "sds_run": record["run"],
            "weights": "copied" if copy else "referenced", "weights_uri": folder.as_uri()}
    model = client.create_logged_model(exp_id, name=entry["name"], source_run_id=parent, tags=tags,
                                       model_type="sds-checkpoint")
    for path in files if copy else [p for p in files if p not in weights]:
        client.log_model_artifact(model.model_id, str(path))
    if not copy:  # the weights stay where the pipeline wrote them; their checksums (.xxh3) are copied
        with tempfile.TemporaryDirectory() as tmp:
            ref = Path(tmp) / "weights.json"
            ref.write_text(json.dumps({"uri": folder.as_uri(), "files": {p.name: p.stat().st_size for p in weights},
                                       "note": "weights not copied: load the folder at `uri`"}, indent=2))
            client.log_model_artifact(model.model_id, str(ref))
    client.finalize_logged_model(model.model_id, "READY")
    for run_id in dict.fromkeys((producer, parent)):
        client.log_outputs(run_id, [LoggedModelOutput(model.model_id, 0)])
    if child != producer:
        client.log_inputs(child, models=[LoggedModelInput(model.model_id)])
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(entry["name"])
    except MlflowException:
        client.create_registered_model(entry["name"], tags={"sds_run": record["run"]},
                                       description=f"Checkpoints of sds run `{record['run']}`; one version per "
                                                   "pipeline config (tag sds_config_hash). Model card: README.md.")
    with _process_tracking_uri(tracking_uri()):
        client.create_model_version(entry["name"], source=f"models:/{model.model_id}", run_id=parent,
                                    model_id=model.model_id, tags=tags)


@contextlib.contextmanager
def _process_tracking_uri(uri: str):
    """MLflow's SQL registry store resolves a `models:/<id>` source through the process-wide tracking URI,
    not its client's (an MLflow TODO): point that at this store meanwhile, and leave the environment as it
    was (MLflow's own restore unsets MLFLOW_TRACKING_URI)."""
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    saved = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        with _use_tracking_uri(uri):
            yield
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved


def _log_record(record: dict) -> str:
    """Logs one stage record; returns the child run id ('' if a newer run of the stage is already logged)."""
    from mlflow.entities import Metric, Param

    client = _client()
    exp_id = _experiment(client, record["experiment"])
    parent = _parent_run(client, exp_id, record)
    parent_id = parent.info.run_id
    # a stage run once more under the same config replaces its earlier run (soft delete: restorable in
    # the UI), so child names stay unique; a replayed record older than the logged run is dropped
    earlier = _stage_runs(client, exp_id, record, record["stage"])
    if any(r.info.start_time > record["start_ms"] for r in earlier):
        log.info("MLflow already holds a newer run of %s; the older record is not logged", record["stage"])
        return ""
    for r in earlier:
        client.delete_run(r.info.run_id)
    tags = {"mlflow.parentRunId": parent_id, "sds_config_hash": record["config_hash"], "sds_role": "stage",
            "sds_stage": record["stage"], "sds_kind": record["stage"].split("/")[0], **record.get("tags", {}),
            **record.get("provenance", {})}
    child = client.create_run(parent.info.experiment_id, start_time=record["start_ms"], run_name=record["stage"],
                              tags=tags).info.run_id
    end = record["end_ms"]
    params = [Param(k[:250], str(v)[:6000]) for k, v in sorted(flatten(record["params"]).items())]
    metrics = [Metric(k[:250], float(v), end, step) for k, v, step in record["metrics"]]
    for i in range(0, len(params), 100):
        client.log_batch(child, params=params[i:i + 100])
    for i in range(0, len(metrics), 1000):
        client.log_batch(child, metrics=metrics[i:i + 1000])
    if record.get("inputs"):
        datasets = _dataset_inputs(record["inputs"])
        client.log_inputs(child, datasets)
        client.log_inputs(parent_id, datasets)  # the runs table shows a pipeline's texts on its row
    for path in record.get("artifacts", []):
        client.log_artifact(child, path)
    for path in record.get("parent_artifacts", []):
        client.log_artifact(parent_id, path)
    headline = [Metric(k[:250], float(v), end, 0) for k, v in sorted(record.get("parent_metrics", {}).items())]
    for i in range(0, len(headline), 1000):
        client.log_batch(parent_id, metrics=headline[i:i + 1000])
    if record.get("model"):
        producer = next((r.info.run_id for r in _stage_runs(client, exp_id, record, record["model"]["producer"])),
                        child) if record["model"].get("producer") else child
        _log_model(client, exp_id, record, child, parent_id, producer)
    client.set_terminated(child, end_time=end)
    client.set_terminated(parent_id, end_time=max(end, client.get_run(parent_id).info.end_time or 0))
    if record["stage"] == "report":
        log.info("MLflow: %s", ui_link(parent.info.experiment_id, parent_id))
    return child


def ui_link(exp_id: str, run_id: str) -> str:
    """Where to look: the parent run in the UI's model-training view (MLflow 3 otherwise opens on GenAI)."""
    uri = tracking_uri()
    where = f"#/experiments/{exp_id}/runs/{run_id}?workflowType=machine_learning"
    if uri.startswith("http"):
        return f"{uri.rstrip('/')}/{where}"
    return f"`mlflow ui --backend-store-uri {uri}`, then http://127.0.0.1:5000/{where}"


# --- the stage side -----------------------------------------------------------------------------------

def _process_start() -> float | None:
    """Wall-clock start of this process (Linux /proc), to within a clock tick; None elsewhere."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return time.time() - (uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def stage_start(started: float) -> float:
    """A stage run by Snakemake is its own process (`python -m sds.cli`, which Snakemake's benchmark
    times), so its run starts when the process did: imports and model loading are part of the stage.
    Called in-process (tests, notebooks), it starts when the stage function did."""
    main = getattr(sys.modules.get("__main__"), "__spec__", None)
    if main is not None and main.name in ("sds.cli", "sds.__main__"):
        return min(started, _process_start() or started)
    return started


def record_stage(config: dict, config_hash: str, stage: str, *, params: dict, metrics: dict | list,
                 artifacts: list[str] = (), parent_artifacts: list[str] = (), provenance: dict | None = None,
                 started: float | None = None, ended: float | None = None, parent_metrics: dict | None = None,
                 inputs: list[dict] = (), model: dict | None = None, tags: dict | None = None) -> bool:
    """Logs one stage (child run `stage`, spanning `started`..`ended`, epoch seconds); returns False (after
    a single warning) if the tracking store is unreachable. `parent_metrics` go on the pipeline's run,
    `inputs` (see `text_input`) are dataset inputs, `model` (see `model_entry`) a checkpoint to register."""
    if not config["mlflow"]["enabled"]:
        return True
    ended = time.time() if ended is None else ended
    started = ended if started is None else started
    if isinstance(metrics, dict):
        metrics = [(k, v, 0) for k, v in metrics.items()]
    record = {"run": config["run"], "experiment": config["mlflow"]["experiment"], "config": config,
              "config_hash": config_hash, "stage": stage, "params": params,
              "start_ms": int(started * 1000), "end_ms": int(ended * 1000),
              "metrics": [(k, float(v), int(s)) for k, v, s in metrics],
              "parent_metrics": {k: float(v) for k, v in (parent_metrics or {}).items()},
              "inputs": list(inputs), "model": model, "tags": {k: str(v) for k, v in (tags or {}).items() if v},
              "artifacts": [str(Path(a).resolve()) for a in artifacts],
              "parent_artifacts": [str(Path(a).resolve()) for a in parent_artifacts],
              "provenance": provenance or {}}
    try:
        with _store_lock():
            _log_record(record)
        return True
    except Exception as exc:  # any store failure must not lose the stage's results
        pending = RESULTS / config["run"] / "mlflow_pending"
        pending.mkdir(parents=True, exist_ok=True)
        from .io import write_json

        write_json(pending / f"{stage.replace('/', '_')}-{time.time_ns()}.json", record)
        log.warning("MLflow store %s unreachable (%s: %s); stage results are on disk and the record is kept in "
                    "%s for `python -m sds.cli sync`", tracking_uri(), type(exc).__name__, str(exc)[:300], pending)
        return False


def sync_pending(run: str) -> tuple[int, int]:
    """Replays records kept while the store was unreachable, oldest stage first; returns (logged, still
    pending). Records written before start/end were kept take the file's time."""
    records = []
    for path in (RESULTS / run / "mlflow_pending").glob("*.json"):
        record = json.loads(path.read_text())
        record.setdefault("end_ms", int(path.stat().st_mtime * 1000))
        record.setdefault("start_ms", record["end_ms"])
        records.append((record["start_ms"], path.name, path, record))
    done = 0
    for _, _, path, record in sorted(records, key=lambda r: r[:2]):
        try:
            with _store_lock():
                _log_record(record)
        except Exception as exc:
            log.warning("sync of %s failed: %s", path, exc)
            continue
        path.unlink()
        done += 1
    return done, len(records) - done


def track_stage(config: dict, stage: str, *, started: float, params=None, metrics=None, artifacts=(),
                parent_artifacts=(), **extra) -> None:
    """Records a pipeline stage as an MLflow child run named `stage` (unique within the pipeline), from
    `started` (time.time() when the stage began) to now; `extra`: parent_metrics, inputs, model, tags."""
    from .config import config_hash
    from .runtime import provenance

    ended = time.time()
    record_stage(config, config_hash(config), stage, params=params or {}, metrics=metrics or {},
                 artifacts=list(artifacts), parent_artifacts=list(parent_artifacts), provenance=provenance(),
                 started=stage_start(started), ended=ended, **extra)
