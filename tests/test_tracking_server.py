"""MLflow tracking against a real `mlflow server` (started by sds.tracking.server on 127.0.0.1): the
pipeline run's states, dataset keys, unique stage names, params, durations, and the server's own options."""
import json
import time
import uuid

import pytest

from sds.core.config import config_hash, validate_config


@pytest.fixture
def logged(tmp_path, monkeypatch, mlflow_server):
    """Records go to the real server, each test into an experiment of its own."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    experiment = f"t-{uuid.uuid4().hex[:8]}"

    def config(**overrides):
        return validate_config({"run": "t", "mlflow": {"experiment": experiment}, **overrides})

    from mlflow.tracking import MlflowClient

    return config, MlflowClient(tracking_uri=mlflow_server), experiment


def _runs(client, experiment, role):
    exp = client.get_experiment_by_name(experiment)
    return [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("sds_role") == role]


def test_pipeline_run_is_running_until_the_pipeline_ends(logged, tmp_path):
    """RUNNING while stages are logged (each stage's own run is FINISHED), FINISHED when the invocation
    ends (at its last stage's end), RUNNING again when a later invocation adds a stage, FAILED when that
    one fails; the hooks' command line does the closing."""
    from sds.tracking.pipeline import main
    from sds.tracking.stage_runs import close_pipeline, record_stage

    config, client, experiment = logged
    cfg = config()
    h = config_hash(cfg)
    t0 = time.time() - 100
    assert close_pipeline(cfg, "FINISHED") == "", "no run yet: nothing to close, none created"
    assert record_stage(cfg, h, "calibration", params={}, metrics={}, started=t0, ended=t0 + 5)
    assert record_stage(cfg, h, "prune1/sparsegpt/2of4", params={}, metrics={}, started=t0 + 5, ended=t0 + 20)
    (parent,) = _runs(client, experiment, "pipeline")
    assert parent.info.status == "RUNNING" and parent.info.end_time is None
    assert {r.info.status for r in _runs(client, experiment, "stage")} == {"FINISHED"}

    path = tmp_path / "resolved.json"
    path.write_text(json.dumps(cfg))
    assert main(["finished", "--config", str(path)]) == 0
    info = client.get_run(parent.info.run_id).info
    assert (info.status, info.end_time) == ("FINISHED", int((t0 + 20) * 1000))

    assert record_stage(cfg, h, "export/sparsegpt/2of4/prune1", params={}, metrics={}, started=t0 + 30, ended=t0 + 40)
    assert client.get_run(parent.info.run_id).info.status == "RUNNING"
    before = time.time()
    assert main(["failed", "--config", str(path)]) == 0
    info = client.get_run(parent.info.run_id).info
    assert info.status == "FAILED" and info.end_time >= int(before * 1000)
    assert len(_runs(client, experiment, "pipeline")) == 1


def test_datasets_are_keyed_by_text_and_windowing(logged):
    """Two configs read one file, windowed differently: two datasets, each with its own profile (MLflow keeps
    one dataset per name and digest, with the profile it was first logged with); the same windowing of the
    same text is one dataset."""
    from sds.tracking.entries import text_input
    from sds.tracking.stage_runs import record_stage

    config, client, experiment = logged
    text = "the ship sails at dawn. " * 50
    windowings = {128: (128, 128), 32: (32, 512)}
    for nsamples, (windows, seqlen) in windowings.items():
        cfg = config(calibration={"nsamples": nsamples})
        item = text_input("calibration", "corpus.txt", text, 300, "calibration", windows=windows, seqlen=seqlen)
        assert record_stage(cfg, config_hash(cfg), "calibration", params={}, metrics={"source_tokens": 300},
                            inputs=[item])
    seen = {}
    for run in _runs(client, experiment, "stage"):
        (item,) = run.inputs.dataset_inputs
        profile = json.loads(item.dataset.profile)
        seen[item.dataset.name] = (item.dataset.digest, profile["windows"], profile["seqlen"], profile["tokens"])
        assert profile["tokens"] == run.data.metrics["source_tokens"]
    assert set(seen) == {"calibration 128x128", "calibration 32x512"}
    assert seen["calibration 128x128"][1:] == (128, 128, 300) and seen["calibration 32x512"][1:] == (32, 512, 300)
    assert seen["calibration 128x128"][0] != seen["calibration 32x512"][0]
    again = text_input("calibration", "corpus.txt", text, 300, "calibration", windows=32, seqlen=512)
    assert again["digest"] == seen["calibration 32x512"][0]
    other_tokenizer = text_input("calibration", "corpus.txt", text, 280, "calibration", windows=32, seqlen=512)
    assert other_tokenizer["digest"] != again["digest"]


def test_stage_names_are_unique_across_configs(logged):
    """The same stage under two configs: two names that say the stage and which pipeline it belongs to."""
    from sds.tracking.stage_runs import record_stage

    config, client, experiment = logged
    hashes = []
    for nsamples in (4, 8):
        cfg = config(calibration={"nsamples": nsamples})
        hashes.append(config_hash(cfg))
        assert record_stage(cfg, hashes[-1], "prune1/sparsegpt/2of4", params={}, metrics={})
    names = {r.data.tags["mlflow.parentRunId"]: r.info.run_name for r in _runs(client, experiment, "stage")}
    parents = {r.info.run_id: r.data.tags["sds_config_hash"] for r in _runs(client, experiment, "pipeline")}
    assert len(set(names.values())) == 2
    for parent, name in names.items():
        assert name == f"prune1/sparsegpt/2of4 @ t-{parents[parent][:6]}"
    assert hashes[0][:6] != hashes[1][:6]


def test_params_leave_out_the_builtin_recipe_for_an_external_model(logged):
    from sds.tracking.stage_runs import record_stage

    config, client, experiment = logged
    builtin = config()
    external = {**builtin, "model": {**builtin["model"], "source": "/models/SmolLM2-135M"}}
    for cfg in (builtin, external):
        assert record_stage(cfg, config_hash(cfg), "calibration", params={}, metrics={})
    params = {r.data.params["model.source"]: r.data.params for r in _runs(client, experiment, "pipeline")}
    assert any(k.startswith("model.builtin.") for k in params["builtin"])
    assert not [k for k in params["/models/SmolLM2-135M"] if k.startswith("model.builtin.")]
    assert params["/models/SmolLM2-135M"]["calibration.nsamples"] == str(builtin["calibration"]["nsamples"])


def test_a_stage_has_one_duration(logged, tmp_path):
    """The stage's run spans what its seconds file says, its `seconds` metric is that span, and the report
    reads that file rather than Snakemake's (longer) job time."""
    from sds.core.layout import RunLayout
    from sds.report.inputs import benchmark_seconds
    from sds.tracking.stage_runs import track_stage

    config, client, experiment = logged
    cfg = config()
    started = time.time() - 2.5
    track_stage(cfg, "evaluate/sparsegpt/2of4/prune1+adjust", started=started, metrics={"seconds": 99.0, "x": 1.0})
    tsv = tmp_path / RunLayout("t").benchmark("evaluate", "sparsegpt", "2of4", "prune1_adjust")
    measured = json.loads(tsv.with_suffix(".seconds.json").read_text())
    (run,) = _runs(client, experiment, "stage")
    assert (run.info.start_time, run.info.end_time) == (int(measured["start"] * 1000), int(measured["end"] * 1000))
    assert measured["seconds"] == pytest.approx(measured["end"] - measured["start"]) and measured["seconds"] >= 2.5
    assert run.data.metrics["seconds"] == round(measured["seconds"], 3)
    tsv.write_text("s\th:m:s\n41.0\t0:00:41\n")  # Snakemake's job time: the shell, the interpreter's start and exit
    assert benchmark_seconds([str(tsv)]) == {"evaluate/sparsegpt_2of4_prune1_adjust": measured["seconds"]}


def test_parent_is_a_training_run_once_a_checkpoint_is_written(logged, tmp_path):
    """MLflow's UI calls a run without model outputs an evaluation run ("Eval"): prune1's checkpoint is a
    model (by reference: nothing copied) output by prune1's run and the pipeline's."""
    from sds.tracking.entries import checkpoint_reference, registered_name
    from sds.tracking.stage_runs import record_stage

    config, client, experiment = logged
    cfg = config()
    folder = tmp_path / "prune1"
    folder.mkdir()
    (folder / "weights.safetensors").write_bytes(b"0" * 1024)
    entry = checkpoint_reference(registered_name("t", "sparsegpt", "2of4", "prune1"), folder, {"stage": "prune1"})
    assert record_stage(cfg, config_hash(cfg), "prune1/sparsegpt/2of4", params={}, metrics={}, model=entry)
    (parent,) = _runs(client, experiment, "pipeline")
    (stage,) = _runs(client, experiment, "stage")
    (model_id,) = [m.model_id for m in parent.outputs.model_outputs]
    assert [m.model_id for m in stage.outputs.model_outputs] == [model_id]
    model = client.get_logged_model(model_id)
    assert model.source_run_id == stage.info.run_id and model.tags["weights_uri"] == folder.resolve().as_uri()
    assert client.list_logged_model_artifacts(model_id) == []
    assert client.search_registered_models(f"name = '{entry['name']}'") == []


def test_server_takes_a_backend_uri_and_names_itself_for_other_hosts(tmp_path):
    """The cluster options, on loopback: a backend given as a URI (here SQLite; PostgreSQL in
    docs/cluster.md) and an artifact folder are what the server uses; bound to every interface, the
    tracking URI handed to the jobs is the machine's name, not 127.0.0.1."""
    import socket

    from mlflow.tracking import MlflowClient

    from sds.tracking.server import free_port, start, stop, tracking_address

    db = tmp_path / "shared.db"
    url, _ = start(free_port(), state=tmp_path / "state", backend=f"sqlite:///{db}", artifacts=tmp_path / "art")
    try:
        assert url.startswith("http://127.0.0.1:")
        client = MlflowClient(tracking_uri=url)
        exp = client.create_experiment("cluster")
        run = client.create_run(exp)
        (tmp_path / "a.txt").write_text("x")
        client.log_artifact(run.info.run_id, str(tmp_path / "a.txt"))
        assert MlflowClient(tracking_uri=f"sqlite:///{db}").get_experiment(exp).name == "cluster"
        assert [p.name for p in (tmp_path / "art").rglob("a.txt")] == ["a.txt"]
        assert not (tmp_path / "state" / "mlflow.db").exists()
    finally:
        stop(tmp_path / "state")
    assert tracking_address("0.0.0.0", 5000) == f"http://{socket.getfqdn()}:5000"
    assert tracking_address("127.0.0.1", 5000) == "http://127.0.0.1:5000"
