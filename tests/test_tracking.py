"""MLflow tracking: the default local store, and an unreachable server that must not lose results."""
import json
import logging
import time
from pathlib import Path

import pytest

from sds.core.config import config_hash, validate_config
from sds.tracking.server import free_port


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
    from sds.tracking.stage_runs import record_stage

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
    from sds.tracking.stage_runs import record_stage, sync_pending

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


def _stage_runs(client, runs):
    return {r.data.tags["sds_stage"]: r for r in runs if r.data.tags.get("sds_role") == "stage"}


def test_experiment_is_a_model_training_one(in_tmp):
    """MLflow 3 opens an experiment on GenAI traces unless its kind says model training; an experiment made
    before the kind was set gets it on the next record."""
    from mlflow.tracking import MlflowClient

    from sds.tracking.stage_runs import record_stage

    (in_tmp / "results").mkdir()
    client = MlflowClient(tracking_uri=f"sqlite:///{in_tmp / 'results' / 'mlflow.db'}")
    exp_id = client.create_experiment("sds")
    assert "mlflow.experimentKind" not in client.get_experiment(exp_id).tags
    cfg = _config()
    assert record_stage(cfg, config_hash(cfg), "report", params={}, metrics={"rows": 4})
    assert client.get_experiment(exp_id).tags["mlflow.experimentKind"] == "custom_model_development"


def test_runs_keep_stage_times_through_sync_and_parent_spans_them(in_tmp, monkeypatch):
    """Records kept offline keep their stages' start and end; sync replays them oldest first, so the
    pipeline's run starts with its first stage and ends with its last."""
    from sds.tracking.stage_runs import close_pipeline, record_stage, sync_pending

    cfg = _config()
    h = config_hash(cfg)
    t0 = time.time() - 3600
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    assert record_stage(cfg, h, "prune2/m/2of4/default", params={}, metrics={}, started=t0 + 100, ended=t0 + 160,
                        parent_metrics={"ppl.wiki.m.2of4.default.sds": 20.0}) is False
    assert record_stage(cfg, h, "prune1/m/2of4", params={}, metrics={}, started=t0, ended=t0 + 40) is False
    store = f"sqlite:///{in_tmp / 'store.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    assert sync_pending("t") == (2, 0)
    client, runs = _runs(store)
    children = _stage_runs(client, runs)
    assert (children["prune1/m/2of4"].info.start_time, children["prune1/m/2of4"].info.end_time) == \
        (int(t0 * 1000), int((t0 + 40) * 1000))
    assert (children["prune2/m/2of4/default"].info.start_time, children["prune2/m/2of4/default"].info.end_time) == \
        (int((t0 + 100) * 1000), int((t0 + 160) * 1000))
    (parent,) = [r for r in runs if r.data.tags["sds_role"] == "pipeline"]
    assert (parent.info.status, parent.info.start_time) == ("RUNNING", int(t0 * 1000))
    assert parent.data.metrics["ppl.wiki.m.2of4.default.sds"] == 20.0
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.tags["mlflow.experiment.primaryMetric.name"] == "ppl.wiki.m.2of4.default.sds"
    assert close_pipeline(cfg, "FINISHED") == "FINISHED"
    assert client.get_run(parent.info.run_id).info.end_time == int((t0 + 160) * 1000), "ends with its last stage"

    # the stage run again under the same config replaces its earlier run (soft-deleted, restorable) ...
    assert record_stage(cfg, h, "prune1/m/2of4", params={}, metrics={"m": 2.0}, started=t0 + 200, ended=t0 + 210)
    # ... and a record older than the run already logged, replayed late, does not bring the old one back
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    assert record_stage(cfg, h, "prune1/m/2of4", params={}, metrics={"m": 1.0}, started=t0 + 50, ended=t0 + 60) is False
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    assert sync_pending("t") == (1, 0)
    from mlflow.entities import ViewType

    exp = client.get_experiment_by_name("sds")
    active = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("sds_stage") == "prune1/m/2of4"]
    deleted = [r for r in client.search_runs([exp.experiment_id], run_view_type=ViewType.DELETED_ONLY)]
    assert [r.data.metrics["m"] for r in active] == [2.0]
    assert [r.info.start_time for r in deleted] == [int(t0 * 1000)]
    assert client.get_run(parent.info.run_id).info.status == "RUNNING", "a later stage re-opens the pipeline"
    assert close_pipeline(cfg, "FINISHED") == "FINISHED"
    assert client.get_run(parent.info.run_id).info.end_time == int((t0 + 210) * 1000)


def test_layer_metrics_are_series_over_decoder_layers():
    """OPT and LLaMA weight names alike: one `by_layer/` series per quantity, stage and linear kind (step =
    decoder layer), and its mean and max over the layers, and over every linear, as single numbers."""
    import torch

    from conftest import tiny_llama, tiny_opt
    from sds.tracking.entries import layer_metrics

    opt = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"}
    llama = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
             "mlp.up_proj", "mlp.down_proj"}
    for model, kinds in ((tiny_opt(layers=3), opt), (tiny_llama(layers=3), llama)):
        names = [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
        infos = {n: {"rel_error": 0.01 * i, "rel_error_before": 0.02 * i, "fallback": True, "density": 0.5,
                     "max_abs_ratio": 1.0 + i, "near_zero": 0.1} for i, n in enumerate(names)}
        metrics = layer_metrics(infos, "prune2")
        series = [(k, v, step) for k, v, step in metrics if k.startswith("by_layer/")]
        summary = {k: v for k, v, step in metrics if not k.startswith("by_layer/")}
        assert {k for k, _, _ in series} == {f"by_layer/{q}.prune2.{kind}" for kind in kinds for q in
                                             ("rel_error", "rel_error_before", "density", "max_abs_ratio")}
        assert summary["max_abs_ratio.prune2.max"] == len(names)  # the last linear's 1 + i
        for key in {k for k, _, _ in series}:
            assert sorted(step for k, _, step in series if k == key) == [0, 1, 2]
        for i, name in enumerate(names):
            layer, kind = name.split(".layers.")[1].removesuffix(".weight").split(".", 1)
            assert (f"by_layer/rel_error.prune2.{kind}", 0.01 * i, int(layer)) in series
        for kind in kinds:
            values = [0.01 * i for i, n in enumerate(names) if n.endswith(f".{kind}.weight")]
            assert summary[f"rel_error.prune2.{kind}.max"] == round(max(values), 4)
            assert summary[f"rel_error.prune2.{kind}.mean"] == round(sum(values) / 3, 4)
        assert summary["rel_error.prune2.max"] == round(0.01 * (len(names) - 1), 4)
        assert summary["rel_error_before.prune2.mean"] == round(0.02 * (len(names) - 1) / 2, 4)


@pytest.mark.parametrize("copy_limit_mb, stored", [("0", "referenced"), ("256", "copied")])
def test_checkpoint_is_a_registered_model_with_its_card(in_tmp, monkeypatch, copy_limit_mb, stored):
    """A checkpoint folder becomes a logged model (card, config, tokenizer always) of the stage that wrote it
    (prune2), an output of that run and the pipeline's; its evaluation registers it with its tags (source
    run: prune2's) and has it as an input.
    Weights above the copy limit stay where they are: the model holds weights.json pointing at the folder,
    which loads; below it they are copied, and MLflow's copy loads."""
    from urllib.parse import urlparse

    import torch
    from mlflow.artifacts import download_artifacts
    from transformers import AutoModelForCausalLM

    from conftest import tiny_opt
    from sds.tracking.entries import model_entry, registered_name, sds_model_entry
    from sds.tracking.stage_runs import record_stage

    folder = in_tmp / "results" / "t" / "sds" / "model"
    original = tiny_opt()
    original.save_pretrained(folder)
    (folder / "README.md").write_text("# SDS model card\n")
    monkeypatch.setenv("SDS_MLFLOW_COPY_WEIGHTS_MB", copy_limit_mb)
    cfg = _config()
    h = config_hash(cfg)
    written = sds_model_entry("t", "sparsegpt", "2of4", "default", "2:4", folder)
    assert record_stage(cfg, h, "prune2/sparsegpt/2of4/default", params={}, metrics={}, model=written)
    name = registered_name("t", "sparsegpt", "2of4", "default")
    entry = {**model_entry(name, folder, {"method": "sparsegpt", "pattern": "2:4", "ppl.wiki": 12.5}),
             "producer": "prune2/sparsegpt/2of4/default"}
    assert record_stage(cfg, h, "evaluate/sparsegpt/2of4/default/sds", params={}, metrics={}, model=entry)

    uri = f"sqlite:///{in_tmp / 'results' / 'mlflow.db'}"
    client, runs = _runs(uri)
    children = _stage_runs(client, runs)
    (version,) = client.search_model_versions(f"name = '{name}'")
    assert name == "sds-t-sparsegpt-2of4-default"
    assert (version.tags["method"], version.tags["pattern"], version.tags["ppl.wiki"]) == ("sparsegpt", "2:4", "12.5")
    assert version.tags["weights"] == stored and version.tags["sds_config_hash"] == h
    producer = client.get_run(children["prune2/sparsegpt/2of4/default"].info.run_id)
    (model_id,) = [m.model_id for m in producer.outputs.model_outputs]
    assert version.source == f"models:/{model_id}"
    (parent,) = [r for r in runs if r.data.tags["sds_role"] == "pipeline"]
    # the version's source run is the stage that wrote the checkpoint; the pipeline lists it as an output
    assert version.run_id == client.get_logged_model(model_id).source_run_id == producer.info.run_id
    assert [m.model_id for m in parent.outputs.model_outputs] == [model_id]
    assert len(client.search_logged_models([parent.info.experiment_id])) == 1, "the evaluation reuses prune2's"
    evaluation = client.get_run(children["evaluate/sparsegpt/2of4/default/sds"].info.run_id)
    assert [m.model_id for m in evaluation.inputs.model_inputs] == [model_id]
    files = {f.path for f in client.list_logged_model_artifacts(model_id)}
    assert {"README.md", "config.json", "generation_config.json"} <= files
    assert ("model.safetensors" in files) == (stored == "copied")
    local = Path(download_artifacts(artifact_uri=client.get_logged_model(model_id).artifact_location,
                                    dst_path=str(in_tmp / "dl"), tracking_uri=uri))
    assert (local / "README.md").read_text() == "# SDS model card\n"
    if stored == "referenced":
        reference = json.loads((local / "weights.json").read_text())
        assert Path(urlparse(reference["uri"]).path) == folder.resolve()
        assert version.tags["weights_uri"] == reference["uri"]
        local = Path(urlparse(reference["uri"]).path)
        stored_bytes = sum(p.stat().st_size for p in (in_tmp / "results" / "mlartifacts").rglob("*") if p.is_file())
        assert stored_bytes < (folder / "model.safetensors").stat().st_size
    loaded = AutoModelForCausalLM.from_pretrained(local)
    for (key, a), (_, b) in zip(loaded.state_dict().items(), original.state_dict().items()):
        assert torch.equal(a, b), key


@pytest.mark.parametrize("store_at_close", ["unreachable", "reachable"])
def test_pipeline_end_kept_offline_is_replayed_after_its_stages(in_tmp, monkeypatch, store_at_close):
    """The pipeline's end, recorded while the store is unreachable, or while its stages' records are still
    pending (no pipeline run exists yet), is kept and replayed by sync after them."""
    from sds.tracking.stage_runs import close_pipeline, record_stage, sync_pending

    cfg = _config()
    t0 = time.time() - 600
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    assert record_stage(cfg, config_hash(cfg), "prune1/m/2of4", params={}, metrics={}, started=t0, ended=t0 + 9) is False
    store = f"sqlite:///{in_tmp / 'store.db'}"
    if store_at_close == "reachable":
        monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    assert close_pipeline(cfg, "FAILED") == ""
    assert len(list((in_tmp / "results" / "t" / "mlflow_pending").glob("*.json"))) == 2
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    assert sync_pending("t") == (2, 0)
    _, runs = _runs(store)
    (parent,) = [r for r in runs if r.data.tags["sds_role"] == "pipeline"]
    assert parent.info.status == "FAILED"
