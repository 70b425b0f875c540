"""MLflow tracking: the default local store, and an unreachable server that must not lose results."""
import logging

import pytest

from sds.config import config_hash, validate_config
from sds.mlflow_server import free_port


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def _config():
    return validate_config({"run": "t"})


def _runs(uri):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("sds")
    return client, client.search_runs([exp.experiment_id])


def test_default_store_is_sqlite_under_results(in_tmp):
    from sds.tracking import record_stage

    cfg = _config()
    artifact = in_tmp / "a.txt"
    artifact.write_text("hello")
    assert record_stage(cfg, config_hash(cfg), "prune1/x", params={"k": 1}, metrics={"m": 2.5},
                        artifacts=[str(artifact)])
    assert record_stage(cfg, config_hash(cfg), "prune2/x", params={}, metrics={"m": 3.0})
    assert (in_tmp / "results" / "mlflow.db").is_file()
    assert not (in_tmp / "mlruns").exists(), "artifacts stay under results/"
    client, runs = _runs(f"sqlite:///{in_tmp / 'results' / 'mlflow.db'}")
    parents = [r for r in runs if r.data.tags["sds_role"] == "pipeline"]
    children = [r for r in runs if r.data.tags["sds_role"] == "stage"]
    assert len(parents) == 1 and len(children) == 2
    assert all(c.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for c in children)
    first = next(c for c in children if c.data.tags["sds_stage"] == "prune1/x")
    assert first.data.metrics["m"] == 2.5 and first.data.params["k"] == "1"
    assert [a.path for a in client.list_artifacts(first.info.run_id)] == ["a.txt"]


def test_unreachable_server_keeps_results_and_sync_replays_them(in_tmp, monkeypatch, caplog):
    from sds.tracking import record_stage, sync_pending

    cfg = _config()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    with caplog.at_level(logging.WARNING, logger="sds.tracking"):
        assert record_stage(cfg, config_hash(cfg), "evaluate/dense", params={}, metrics={"ppl": 5.0}) is False
    warnings = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(warnings) == 1 and "sync" in warnings[0].getMessage()
    pending = list((in_tmp / "results" / "t" / "mlflow_pending").glob("*.json"))
    assert len(pending) == 1
    # later the store is back (here: a local SQLite store) and sync records what was kept
    store = f"sqlite:///{in_tmp / 'store.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    assert sync_pending("t") == (1, 0)
    assert not list((in_tmp / "results" / "t" / "mlflow_pending").glob("*.json"))
    _, runs = _runs(store)
    stage = next(r for r in runs if r.data.tags.get("sds_stage") == "evaluate/dense")
    assert stage.data.metrics["ppl"] == 5.0
