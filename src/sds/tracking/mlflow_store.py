"""MLflow tracking: one parent run per pipeline config (keyed by the config hash), a child run per stage.

What a user compares lives where the MLflow UI shows it:
- the experiment is tagged a model-training one (`mlflow.experimentKind`; MLflow 3.17's UI picks its view
  from the address or the browser instead, so every link we print asks for the model-training one);
- every child run spans its stage's real wall-clock time (kept in the record, so also when replayed later);
  the parent starts with the first stage and stays RUNNING until the pipeline ends (`close_pipeline`,
  from the Snakefile's onsuccess/onerror hooks): FINISHED at its last stage's end, or FAILED;
- child runs are named `<stage> @ <run>-<hash>`, so they differ across configs;
- the parent carries the headline numbers of every evaluated checkpoint (`ppl.<dataset>.<checkpoint>`,
  `sparsity.<checkpoint>`, `zeroshot_acc.<checkpoint>`), logged as each evaluation finishes;
- per-linear quantities are stepped metrics, step = decoder layer: `by_layer/rel_error.<stage>.<linear>`,
  with their mean and max over layers as plain metrics;
- the texts a stage read are dataset inputs (source, digest of the text and its windowing, token count);
- checkpoints are logged models of the stage that wrote them (prune1's by reference), the SDS and exported
  ones registered under `sds-<run>-<method>-<pattern>-<setting>` with that stage's run as source.

The default store is SQLite under results/ (no server). MLFLOW_TRACKING_URI points it elsewhere. If the
store cannot be reached, the stage still succeeds: the record is kept under
results/<run>/mlflow_pending/ and `python -m sds.cli sync` replays it later, with its own times.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from pathlib import Path

from ..core.layout import MLFLOW_ARTIFACTS, MLFLOW_DB, MLFLOW_LOCK
from ..storage.atomic import exclusive
from .entries import child_name, config_params

log = logging.getLogger("sds.tracking")

# MLflow 3 picks an experiment's default view from this tag ("genai_development" opens on traces)
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
# MLflow's UI draws this metric first in the chart view of an experiment's runs
PRIMARY_METRIC = "mlflow.experiment.primaryMetric.name"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(MLFLOW_DB).resolve()}"


def _store_lock():
    """One process at a time writes to the tracking store (SQLite takes one writer)."""
    return exclusive(MLFLOW_LOCK)


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = json.dumps(value) if not isinstance(value, str) else value
    return out


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
        location = Path(MLFLOW_ARTIFACTS).resolve().as_uri() if local else None
        return client.create_experiment(name, artifact_location=location, tags=dict([EXPERIMENT_KIND]))
    if exp.tags.get(EXPERIMENT_KIND[0]) != EXPERIMENT_KIND[1]:  # created before the kind was set
        client.set_experiment_tag(exp.experiment_id, *EXPERIMENT_KIND)
    return exp.experiment_id


def _find_parent(client, exp_id: str, config_hash: str):
    found = client.search_runs([exp_id], filter_string=f"tags.sds_config_hash = '{config_hash}' "
                                                       f"and tags.sds_role = 'pipeline'", max_results=1)
    return found[0] if found else None


def _parent_run(client, exp_id: str, record: dict):
    """The pipeline's run of this config: created RUNNING with the first stage it hears of (MLflow cannot
    change a run's start once it exists; stages run in dependency order, sync replays records oldest
    first); a closed one is set RUNNING again while a later invocation adds stages (e.g. `export`)."""
    found = _find_parent(client, exp_id, record["config_hash"])
    if found:
        if found.info.status != "RUNNING":
            client.update_run(found.info.run_id, status="RUNNING")
        return found
    run = client.create_run(exp_id, start_time=record["start_ms"], run_name=f"{record['run']}-{record['config_hash']}",
                            tags={"sds_config_hash": record["config_hash"], "sds_role": "pipeline",
                                  "sds_run": record["run"], **record.get("provenance", {})})
    from mlflow.entities import Param

    params = [Param(k[:250], v[:6000]) for k, v in sorted(flatten(config_params(record["config"])).items())]
    params.append(Param("config_hash", record["config_hash"]))
    for i in range(0, len(params), 100):
        client.log_batch(run.info.run_id, params=params[i:i + 100])
    return client.get_run(run.info.run_id)


def _close_parent(client, exp_id: str, record: dict) -> str:
    """Ends the pipeline's run: FINISHED at its last stage's end, FAILED at the moment the failure was
    recorded; returns the status set ('' if this config has no run, e.g. nothing was logged)."""
    parent = _find_parent(client, exp_id, record["config_hash"])
    if parent is None:
        return ""
    stages = client.search_runs([exp_id], filter_string=f"tags.sds_config_hash = '{record['config_hash']}' and "
                                                        "tags.sds_role = 'stage'")
    last = max([r.info.end_time or 0 for r in stages] + [parent.info.start_time])
    status = record["close"]
    client.set_terminated(parent.info.run_id, status=status, end_time=last if status == "FINISHED" else record["end_ms"])
    return status


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


def _logged_model(client, exp_id: str, record: dict, source: str) -> str:
    """Logs a checkpoint folder as an MLflow logged model of run `source`: model card, config and tokenizer
    always, the weights too up to the copy limit (else a weights.json naming the folder); a reference
    entry (prune1's checkpoint) holds no files. Returns its id."""
    entry = record["model"]
    folder = Path(entry["path"])
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {folder} is gone; re-create it before `sds.cli sync`")
    files = [] if entry.get("reference") else sorted(p for p in folder.iterdir() if p.is_file())
    weights = [p for p in files if p.name.endswith(WEIGHT_SUFFIXES)]
    copy = not entry.get("reference") and sum(p.stat().st_size for p in weights) <= entry["copy_weights_bytes"]
    tags = {**entry["tags"], "sds_config_hash": record["config_hash"], "sds_run": record["run"],
            "weights": "copied" if copy else "referenced", "weights_uri": folder.as_uri()}
    model = client.create_logged_model(exp_id, name=entry["name"], source_run_id=source, tags=tags,
                                       model_type="sds-checkpoint")
    for path in files if copy else [p for p in files if p not in weights]:
        client.log_model_artifact(model.model_id, str(path))
    if weights and not copy:  # the weights stay where the pipeline wrote them; their checksums are copied
        with tempfile.TemporaryDirectory() as tmp:
            ref = Path(tmp) / "weights.json"
            ref.write_text(json.dumps({"uri": folder.as_uri(), "files": {p.name: p.stat().st_size for p in weights},
                                       "note": "weights not copied: load the folder at `uri`"}, indent=2))
            client.log_model_artifact(model.model_id, str(ref))
    client.finalize_logged_model(model.model_id, "READY")
    return model.model_id


def _log_model(client, exp_id: str, record: dict, child: str, parent: str) -> None:
    """A checkpoint as an MLflow model whose source run is the stage that wrote it (the producer: this
    stage, or the one `producer` names, whose model is reused): an output of that run and of the
    pipeline's (the UI calls a run with model outputs a training run), an input of this stage if it only
    evaluated it; registered with that source run if the entry says so."""
    from mlflow.entities import LoggedModelInput, LoggedModelOutput

    entry = record["model"]
    producer, model_id = child, None
    if entry.get("producer"):
        run = next(iter(_stage_runs(client, exp_id, record, entry["producer"])), None)
        if run is not None:
            producer = run.info.run_id
            model_id = next((m.model_id for m in client.get_run(producer).outputs.model_outputs
                             if client.get_logged_model(m.model_id).name == entry["name"]), None)
    if model_id is None:
        model_id = _logged_model(client, exp_id, record, producer)
        for run_id in dict.fromkeys((producer, parent)):
            client.log_outputs(run_id, [LoggedModelOutput(model_id, 0)])
    tags = {**entry["tags"], "sds_config_hash": record["config_hash"], "sds_run": record["run"]}
    client.set_logged_model_tags(model_id, tags)
    if child != producer:
        client.log_inputs(child, models=[LoggedModelInput(model_id)])
    if not entry.get("register"):
        return
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(entry["name"])
    except MlflowException:
        client.create_registered_model(entry["name"], tags={"sds_run": record["run"]},
                                       description=f"Checkpoints of sds run `{record['run']}`; one version per "
                                                   "pipeline config (tag sds_config_hash). Model card: README.md.")
    model = client.get_logged_model(model_id)
    with _process_tracking_uri(tracking_uri()):
        client.create_model_version(entry["name"], source=f"models:/{model_id}", run_id=producer,
                                    model_id=model_id,
                                    tags={k: v for k, v in model.tags.items() if not k.startswith("mlflow.")})


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


def _primary_metric(client, exp_id: str, keys: list[str]) -> None:
    """The one default the UI takes from the store for what to plot: the experiment's primary metric
    (the chart view's first chart); the first SDS perplexity logged, if none is set. The runs table's
    columns have no such setting in MLflow 3.17 (they are the browser's choice)."""
    sds = [k for k in keys if k.startswith("ppl.") and k.endswith(".sds")]
    if sds and PRIMARY_METRIC not in client.get_experiment(exp_id).tags:
        client.set_experiment_tag(exp_id, PRIMARY_METRIC, sds[0])


def _log_record(record: dict) -> str:
    """Logs one record: a stage (returns its child run id, '' if a newer run of the stage is already
    logged) or the pipeline's end (`close`: FINISHED or FAILED; returns the status set)."""
    from mlflow.entities import Metric, Param

    client = _client()
    exp_id = _experiment(client, record["experiment"])
    if record.get("close"):
        return _close_parent(client, exp_id, record)
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
    child = client.create_run(parent.info.experiment_id, start_time=record["start_ms"], tags=tags,
                              run_name=child_name(record["stage"], record["run"], record["config_hash"])).info.run_id
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
    _primary_metric(client, exp_id, [m.key for m in headline])
    if record.get("model"):
        _log_model(client, exp_id, record, child, parent_id)
    client.set_terminated(child, end_time=end)
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
