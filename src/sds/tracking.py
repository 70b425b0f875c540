"""MLflow tracking: one parent run per pipeline config (keyed by the config hash), a child run per stage.

The default store is SQLite under results/ (no server). MLFLOW_TRACKING_URI points it elsewhere. If the
store cannot be reached, the stage still succeeds: the record is kept under
results/<run>/mlflow_pending/ and `python -m sds.cli sync` replays it later.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)

RESULTS = Path("results")


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


def _client():
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    logging.getLogger("alembic").setLevel(logging.WARNING)
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri())


def _parent_run(client, experiment: str, record: dict) -> str:
    exp = client.get_experiment_by_name(experiment)
    if exp:
        exp_id = exp.experiment_id
    else:
        # the default local store keeps artifacts under results/ too (MLflow would use ./mlruns)
        local = "MLFLOW_TRACKING_URI" not in os.environ or not os.environ["MLFLOW_TRACKING_URI"]
        location = (RESULTS / "mlartifacts").resolve().as_uri() if local else None
        exp_id = client.create_experiment(experiment, artifact_location=location)
    found = client.search_runs([exp_id], filter_string=f"tags.sds_config_hash = '{record['config_hash']}' "
                                                        f"and tags.sds_role = 'pipeline'", max_results=1)
    if found:
        return found[0].info.run_id
    run = client.create_run(exp_id, run_name=f"{record['run']}-{record['config_hash']}",
                            tags={"sds_config_hash": record["config_hash"], "sds_role": "pipeline",
                                  "sds_run": record["run"], **record.get("provenance", {})})
    from mlflow.entities import Param

    params = [Param(k[:250], v[:6000]) for k, v in sorted(flatten(record["config"]).items())]
    params.append(Param("config_hash", record["config_hash"]))
    for i in range(0, len(params), 90):
        client.log_batch(run.info.run_id, params=params[i:i + 90])
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def _log_record(record: dict) -> None:
    from mlflow.entities import Metric, Param

    client = _client()
    parent = _parent_run(client, record["experiment"], record)
    exp_id = client.get_run(parent).info.experiment_id
    child = client.create_run(exp_id, run_name=record["stage"],
                              tags={"mlflow.parentRunId": parent, "sds_config_hash": record["config_hash"],
                                    "sds_role": "stage", "sds_stage": record["stage"], **record.get("provenance", {})})
    rid = child.info.run_id
    now = int(time.time() * 1000)
    params = [Param(k[:250], str(v)[:6000]) for k, v in sorted(flatten(record["params"]).items())]
    metrics = [Metric(k[:250], float(v), now, step) for k, v, step in record["metrics"]]
    for i in range(0, max(len(params), len(metrics)), 200):
        client.log_batch(rid, params=params[i:i + 200], metrics=metrics[i:i + 200])
    for path in record.get("artifacts", []):
        client.log_artifact(rid, path)
    for path in record.get("parent_artifacts", []):
        client.log_artifact(parent, path)
    client.set_terminated(rid)


def record_stage(config: dict, config_hash: str, stage: str, *, params: dict, metrics: dict | list,
                 artifacts: list[str] = (), parent_artifacts: list[str] = (), provenance: dict | None = None) -> bool:
    """Logs one stage; returns False (after a single warning) if the tracking store is unreachable."""
    if not config["mlflow"]["enabled"]:
        return True
    if isinstance(metrics, dict):
        metrics = [(k, v, 0) for k, v in metrics.items()]
    record = {"run": config["run"], "experiment": config["mlflow"]["experiment"], "config": config,
              "config_hash": config_hash, "stage": stage, "params": params,
              "metrics": [(k, float(v), int(s)) for k, v, s in metrics],
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
        log.warning("MLflow store %s unreachable (%s); stage results are on disk and the record is kept in %s "
                    "for `python -m sds.cli sync`", tracking_uri(), type(exc).__name__, pending)
        return False


def sync_pending(run: str) -> tuple[int, int]:
    """Replays records kept while the store was unreachable; returns (logged, still pending)."""
    pending = sorted((RESULTS / run / "mlflow_pending").glob("*.json"))
    done = 0
    for path in pending:
        record = json.loads(path.read_text())
        try:
            with _store_lock():
                _log_record(record)
        except Exception as exc:
            log.warning("sync of %s failed: %s", path, exc)
            continue
        path.unlink()
        done += 1
    return done, len(pending) - done
