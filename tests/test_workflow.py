"""End to end: the real Snakemake workflow on the micro config (about two minutes on 2 cores)."""
import csv
import json
from pathlib import Path

import pytest
import torch
import yaml

from conftest import planned_jobs, snakemake
from test_perplexity import summary_row_perplexity


def test_outputs_and_summary(micro_run):
    work, _, _ = micro_run
    r = work / "results" / "micro"
    assert (r / "report" / "report.md").is_file()
    assert (r / "report" / "ppl.png").stat().st_size > 1000
    assert (r / "report" / "histograms.png").stat().st_size > 1000
    rows = list(csv.DictReader((work / "results" / "summary.csv").open()))
    assert {"model", "method", "pattern", "stage", "ppl", "sparsity"} <= set(rows[0])
    assert {r_["stage"] for r_ in rows} == {"dense", "prune1", "prune1+adjust", "sds"}
    for row in rows:
        assert float(row["ppl"]) == pytest.approx(summary_row_perplexity(r, row), rel=1e-4), row
        expected = 0.0 if row["stage"] == "dense" else 0.5
        assert float(row["sparsity"]) == pytest.approx(expected, abs=1e-9)
    report = (r / "report" / "report.md").read_text()
    assert "| sparsegpt | 2:4 |" in report and "Seconds per stage" in report
    assert "## Zero-shot accuracy" in report and "| sparsegpt | 2:4 | **mean** |" in report
    zeroshot = list(csv.DictReader((r / "report" / "zeroshot.csv").open()))
    assert {z["stage"] for z in zeroshot} == {"dense", "prune1", "prune1+adjust", "sds"}
    assert {z["task"] for z in zeroshot} == {"sds_agreement", "sds_topic", "sds_count", "mean"}
    # no temporary files left behind by atomic writes
    assert not [p for p in r.rglob("*.tmp")]


def test_rerun_is_a_no_op_and_reconstruct_change_reruns_only_downstream(micro_run):
    work, cfg, _ = micro_run
    assert planned_jobs(snakemake(work, "-n", "--configfile", str(cfg)).stdout) == set()
    changed = yaml.safe_load(cfg.read_text())
    changed["reconstruct"]["default"]["l1"] = 0.05
    cfg2 = work / "micro_changed.yaml"
    cfg2.write_text(yaml.safe_dump(changed))
    out = snakemake(work, "-n", "--configfile", str(cfg2)).stdout
    assert planned_jobs(out) == {"reconstruct", "prune2", "evaluate_sds", "report", "all"}
    # a new pruning pattern reuses model, calibration and the layer inputs
    changed = yaml.safe_load(cfg.read_text())
    changed["prune"]["patterns"] = ["2:4", "unstructured:0.5"]
    cfg3 = work / "micro_pattern.yaml"
    cfg3.write_text(yaml.safe_dump(changed))
    jobs = planned_jobs(snakemake(work, "-n", "--configfile", str(cfg3)).stdout)
    assert "prune1" in jobs and not jobs & {"corpus", "build_model", "calibration", "layer_inputs", "activations"}


def _mlflow_runs(mlflow_server):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server)
    exp = client.get_experiment_by_name("sds")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("sds_role") == "pipeline"]
    assert len(parents) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    return client, exp, parents[0], {r.data.tags["sds_stage"]: r for r in children}


def test_mlflow_server_holds_parent_and_stage_runs(micro_run, mlflow_server):
    work, _, _ = micro_run
    assert not (work / "results" / "mlflow.db").exists(), "with MLFLOW_TRACKING_URI set, no local store is used"
    assert not (work / "results" / "micro" / "mlflow_pending").exists()
    client, exp, parent, children = _mlflow_runs(mlflow_server)
    # a model-training experiment, so MLflow 3 opens it on its runs rather than on GenAI traces
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert parent.data.params["config_hash"] == parent.data.tags["sds_config_hash"]
    assert parent.data.params["calibration.nsamples"] == "4"
    # one child per stage, each named by what it ran (stage / method / pattern / setting) and its pipeline
    short = f"micro-{parent.data.tags['sds_config_hash'][:6]}"
    assert all(r.info.run_name == f"{stage} @ {short}" for stage, r in children.items())
    # the pipeline's run ended with the invocation (the Snakefile's onsuccess hook), at its last stage's end
    assert parent.info.status == "FINISHED"
    assert parent.info.end_time == max(r.info.end_time for r in children.values())
    assert {"corpus", "build_model", "calibration", "layer_inputs", "prune1/sparsegpt/2of4",
            "prune1_adjust/sparsegpt/2of4", "reconstruct/sparsegpt/2of4/default", "prune2/sparsegpt/2of4/default",
            "evaluate/dense", "evaluate/sparsegpt/2of4/prune1", "evaluate/sparsegpt/2of4/prune1+adjust",
            "evaluate/sparsegpt/2of4/default/sds", "report"} == set(children)
    sds_eval = children["evaluate/sparsegpt/2of4/default/sds"]
    assert sds_eval.data.metrics["sparsity"] == pytest.approx(0.5)
    import json

    eval_json = work / "results" / "micro" / "eval" / "sparsegpt" / "2of4" / "default" / "sds.json"
    recorded = json.loads(eval_json.read_text())
    # what the stage wrote (exact there), rounded for display
    assert sds_eval.data.metrics["ppl.builtin"] == round(recorded["ppl"]["builtin"], 4)
    assert sds_eval.data.metrics["zeroshot.mean.acc"] == round(recorded["zeroshot"]["mean"]["acc"], 4)
    assert "git_revision" in sds_eval.data.tags
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert "report.md" in artifacts


def test_mlflow_parent_compares_every_checkpoint(micro_run, mlflow_server):
    """The pipeline's run carries each evaluated checkpoint's numbers, equal to summary.csv's rows; the
    report run carries them too, with the row count."""
    work, _, _ = micro_run
    _, _, parent, children = _mlflow_runs(mlflow_server)
    rows = [r for r in csv.DictReader((work / "results" / "summary.csv").open()) if r["run"] == "micro"]
    checkpoint = {"dense": "dense", "prune1": "sparsegpt.2of4.prune1", "prune1+adjust": "sparsegpt.2of4.prune1_adjust",
                  "sds": "sparsegpt.2of4.default.sds"}
    assert len(rows) == 4
    report = children["report"].data.metrics
    for row in rows:
        key = checkpoint[row["stage"]]
        for metrics in (parent.data.metrics, report):
            assert metrics[f"ppl.{row['dataset']}.{key}"] == pytest.approx(float(row["ppl"]), abs=5e-5)
            assert metrics[f"sparsity.{key}"] == pytest.approx(float(row["sparsity"]), abs=5e-5)
        zs = next(z for z in csv.DictReader((work / "results" / "micro" / "report" / "zeroshot.csv").open())
                  if z["stage"] == row["stage"] and z["task"] == "mean")
        assert parent.data.metrics[f"zeroshot_acc.{key}"] == pytest.approx(float(zs["acc"]), abs=5e-5)
    assert report["rows"] == len(rows) and report["checkpoints"] == 4


def test_mlflow_runs_span_the_stages_wall_clock(micro_run, mlflow_server):
    """Each stage's run lies within the interval Snakemake's benchmark timed for its job (the TSV is written
    as the job ends; `s` is its wall time); its `seconds` metric is its duration, and the report shows
    that number; the pipeline's run spans all of them."""
    work, _, _ = micro_run
    _, _, parent, children = _mlflow_runs(mlflow_server)
    bench = work / "results" / "micro" / "benchmarks"
    tsv = {"corpus": "corpus/corpus", "build_model": "build_model/build_model",
           "calibration": "calibration/calibration", "layer_inputs": "layer_inputs/layer_inputs",
           "prune1/sparsegpt/2of4": "prune1/sparsegpt_2of4",
           "prune1_adjust/sparsegpt/2of4": "prune1_adjust/sparsegpt_2of4",
           "reconstruct/sparsegpt/2of4/default": "reconstruct/sparsegpt_2of4_default",
           "prune2/sparsegpt/2of4/default": "prune2/sparsegpt_2of4_default", "evaluate/dense": "evaluate/dense",
           "evaluate/sparsegpt/2of4/prune1": "evaluate/sparsegpt_2of4_prune1",
           "evaluate/sparsegpt/2of4/prune1+adjust": "evaluate/sparsegpt_2of4_prune1_adjust",
           "evaluate/sparsegpt/2of4/default/sds": "evaluate/sparsegpt_2of4_default_sds", "report": "report/report"}
    assert set(tsv) == set(children)
    slack = 1.0  # seconds: file times and /proc clock ticks
    reported = json.loads((work / "results" / "micro" / "report" / "seconds.json").read_text())
    for name, run in children.items():
        path = bench / f"{tsv[name]}.tsv"
        job_end = path.stat().st_mtime
        job_seconds = float(next(csv.DictReader(path.open(), delimiter="\t"))["s"])
        start, end = run.info.start_time / 1000, run.info.end_time / 1000
        assert job_end - job_seconds - slack <= start < end <= job_end + slack, name
        assert end - start <= job_seconds + slack, name
        assert run.data.metrics["seconds"] == pytest.approx(end - start, abs=2e-3), name
        if name != "report":  # the report is written before its own run ends
            assert reported[tsv[name]] == pytest.approx(end - start, abs=2e-3), name
    assert parent.info.start_time == min(r.info.start_time for r in children.values())
    assert parent.info.end_time == max(r.info.end_time for r in children.values())


def test_mlflow_per_layer_errors_are_series_over_depth(micro_run, mlflow_server):
    """by_layer/rel_error.<stage>.<linear kind>: one value per decoder layer (step), equal to layers.json;
    its max over the layers as one metric."""
    work, _, _ = micro_run
    client, _, _, children = _mlflow_runs(mlflow_server)
    r = work / "results" / "micro" / "sparsegpt" / "2of4"
    for name, folder, stage in (("prune1/sparsegpt/2of4", r / "prune1", "prune1"),
                                ("prune1_adjust/sparsegpt/2of4", r / "prune1_adjust", "prune1_adjust"),
                                ("prune2/sparsegpt/2of4/default", r / "default" / "sds", "prune2")):
        linears = json.loads((folder / "layers.json").read_text())["linears"]
        run = children[name]
        assert not [k for k in run.data.metrics if "layers." in k], "no per-weight metric keys"
        for kind in ("fc1", "fc2", "self_attn.q_proj", "self_attn.out_proj"):
            history = client.get_metric_history(run.info.run_id, f"by_layer/rel_error.{stage}.{kind}")
            assert [m.step for m in sorted(history, key=lambda m: m.step)] == [0, 1]
            for m in history:
                expected = linears[f"model.decoder.layers.{m.step}.{kind}.weight"]["rel_error"]
                assert m.value == pytest.approx(expected, rel=1e-12)
            assert run.data.metrics[f"rel_error.{stage}.{kind}.max"] == round(max(m.value for m in history), 4)


def test_mlflow_dataset_inputs_name_the_texts(micro_run, mlflow_server):
    """Calibration and evaluation texts as dataset inputs: source file, token count, and a name and digest
    that say the windowing too (windows x seqlen)."""
    from transformers import AutoTokenizer

    from sds.data.texts import tokenize

    work, _, _ = micro_run
    _, _, parent, children = _mlflow_runs(mlflow_server)
    corpus = work / "results" / "micro" / "corpus"
    tokenizer = AutoTokenizer.from_pretrained(work / "results" / "micro" / "model")
    expected = {}
    eval_windows = json.loads((work / "results" / "micro" / "eval" / "dense.json").read_text())["windows"]["builtin"]
    for name, split, context, windows in (("calibration", "train", "calibration", 4),
                                          ("builtin", "test", "evaluation", eval_windows)):
        text = (corpus / f"{split}.txt").read_text(encoding="utf-8")
        expected[f"{name} {windows}x64"] = (str((corpus / f"{split}.txt").resolve()), tokenize(tokenizer, text).numel(),
                                            context)

    def inputs(run):
        found = {}
        for item in run.inputs.dataset_inputs:
            d = item.dataset
            found[d.name] = (json.loads(d.source)["uri"], json.loads(d.profile)["tokens"],
                             {t.key: t.value for t in item.tags}["mlflow.data.context"])
        return found

    assert inputs(parent) == expected
    assert inputs(children["calibration"]) == {"calibration 4x64": expected["calibration 4x64"]}
    assert inputs(children["evaluate/sparsegpt/2of4/default/sds"]) == {f"builtin {eval_windows}x64":
                                                                       expected[f"builtin {eval_windows}x64"]}
    assert children["calibration"].data.metrics["source_tokens"] == expected["calibration 4x64"][1]


def test_mlflow_registry_holds_the_sds_checkpoint(micro_run, mlflow_server, tmp_path):
    """prune2's SDS folder is a logged model (card included) of prune2's run, output of it and the pipeline's,
    registered under sds-<run>-<method>-<pattern>-<setting> with the numbers of summary.csv as its version's
    tags; small weights are copied, so the registered model loads from MLflow alone."""
    from mlflow.artifacts import download_artifacts
    from transformers import AutoModelForCausalLM

    work, _, _ = micro_run
    client, _, parent, children = _mlflow_runs(mlflow_server)
    row = next(r for r in csv.DictReader((work / "results" / "summary.csv").open())
               if r["run"] == "micro" and r["stage"] == "sds")
    (version,) = client.search_model_versions("name = 'sds-micro-sparsegpt-2of4-default'")
    tags = version.tags
    assert (tags["method"], tags["pattern"], tags["recon"]) == (row["method"], row["pattern"], row["recon"])
    assert f"{float(tags['sparsity']):.4f}" == row["sparsity"]
    assert f"{float(tags['ppl.' + row['dataset']]):.4f}" == row["ppl"]
    assert tags["sds_config_hash"] == parent.data.tags["sds_config_hash"] and tags["weights"] == "copied"
    producer = client.get_run(children["prune2/sparsegpt/2of4/default"].info.run_id)
    (model_id,) = [o.model_id for o in producer.outputs.model_outputs]
    assert version.source == f"models:/{model_id}"
    assert version.run_id == client.get_logged_model(model_id).source_run_id == producer.info.run_id
    assert model_id in [o.model_id for o in client.get_run(parent.info.run_id).outputs.model_outputs]
    assert client.get_logged_model(model_id).tags["ppl.builtin"] == tags["ppl.builtin"]
    folder = work / "results" / "micro" / "sparsegpt" / "2of4" / "default" / "sds" / "model"
    local = Path(download_artifacts(artifact_uri=client.get_logged_model(model_id).artifact_location,
                                    dst_path=str(tmp_path), tracking_uri=mlflow_server))
    assert (local / "README.md").read_text() == (folder / "README.md").read_text()
    loaded = AutoModelForCausalLM.from_pretrained(local)
    original = AutoModelForCausalLM.from_pretrained(folder)
    for (name, a), (_, b) in zip(loaded.state_dict().items(), original.state_dict().items()):
        assert torch.equal(a, b), name


def test_sds_model_loads_and_generates(micro_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sds.evaluation.perplexity import measured_sparsity, pattern_violations
    from sds.core.patterns import parse_pattern

    work, _, _ = micro_run
    path = work / "results" / "micro" / "sparsegpt" / "2of4" / "default" / "sds" / "model"
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert measured_sparsity(model)["overall"] == pytest.approx(0.5)
    assert pattern_violations(model, parse_pattern("2:4")) == 0
    ids = tok("The ship", return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] == ids.shape[1] + 10
    assert "SDS" in (path / "README.md").read_text() and "sparsity" in (path / "README.md").read_text()


def test_invalid_config_fails_before_any_work(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("run: bad\ncalibration: {nsampels: 3}\n")
    proc = snakemake(tmp_path, "--cores", "1", "--configfile", str(cfg), check=False)
    assert proc.returncode != 0
    assert "unknown config key 'nsampels' in 'calibration'" in proc.stderr + proc.stdout
    assert not (tmp_path / "results").exists()



def test_prune1_saves_the_statistics_reconstruction_fits_on(micro_run):
    """prune1 keeps each layer's input statistics; for layer 0 (nothing pruned upstream) they must equal
    the moments of the dense cache through the dense layer, recomputed here independently."""
    from sds.storage.parquet import iter_parquet_tensors
    from sds.storage.safetensors import load_tensors_with_metadata
    from sds.model.statistics import StatsAccumulator, collect_stats
    from sds.model.decoder import decoder_layers, layer_kwargs
    from sds.model.loading import load_model

    work, _, _ = micro_run
    r = work / "results" / "micro"
    p1 = r / "sparsegpt" / "2of4" / "prune1"
    assert sorted(p.name for p in (p1 / "stats").glob("*.safetensors")) == ["layer_000.safetensors",
                                                                             "layer_001.safetensors"]
    assert not (p1 / "work").exists(), "the working stream is deleted once the pass is done"
    assert not (p1 / "stream").exists(), "the pruned stream is cached only for the dense_stream target"
    saved = StatsAccumulator.from_tensors(*load_tensors_with_metadata(p1 / "stats" / "layer_000.safetensors"))
    model, _ = load_model(r / "model")
    stream = [t.float() for t in iter_parquet_tensors(r / "activations" / "input" / "layer_000.parquet")]
    fresh = collect_stats(decoder_layers(model)[0], stream, layer_kwargs(model, stream[0].shape[0]))
    for name in ("self_attn.q_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"):
        torch.testing.assert_close(saved.stats(name).H, fresh.stats(name).H, rtol=1e-5, atol=1e-6)
    tensors, meta = load_tensors_with_metadata(p1 / "stats" / "layer_000.safetensors")
    assert len(tensors) == 4, "q/k/v read one input: their statistics are stored once"


def test_dense_stream_target_without_a_stream_cache_is_named(micro_run):
    from sds.core.errors import CorruptFileError
    from sds.model.loading import LayerwiseModel
    from sds.model.passes import layer_statistics

    work, _, _ = micro_run
    r = work / "results" / "micro"
    p1 = r / "sparsegpt" / "2of4" / "prune1"
    lm = LayerwiseModel(r / "model")
    settings = {"inputs": "pruned", "target": "dense_stream", "l1": 0.01, "l2": 0.0, "l1_pruned_weight": 3.0,
                "steps": 2}
    with pytest.raises(CorruptFileError, match="prune1/stream: the 'dense_stream' target needs prune1's stream"):
        lm.layer(0)
        layer_statistics(lm, 0, settings, dense_dir=r / "activations" / "dense", prune1_dir=p1, kwargs=lm.kwargs(64),
                         batch=4)


def test_export_registers_the_one_shot_checkpoints(micro_run, tmp_path):
    """`snakemake export` on a copy of the run, logging to the default local store (SQLite under results/):
    each exported checkpoint is a registered model tagged with its evaluation's numbers in summary.csv."""
    import shutil

    from mlflow.tracking import MlflowClient

    work, _, _ = micro_run
    copy = tmp_path / "w"
    shutil.copytree(work, copy, symlinks=True)
    snakemake(copy, "--cores", "2", "--configfile", str(copy / "micro.yaml"), "--", "export")
    rows = {r["stage"]: r for r in csv.DictReader((copy / "results" / "summary.csv").open()) if r["run"] == "micro"}
    client = MlflowClient(tracking_uri=f"sqlite:///{copy / 'results' / 'mlflow.db'}")
    for stage, label in (("prune1", "prune1"), ("prune1_adjust", "prune1+adjust")):
        (version,) = client.search_model_versions(f"name = 'sds-micro-sparsegpt-2of4-{stage}'")
        assert (version.tags["stage"], version.tags["method"], version.tags["pattern"]) == (stage, "sparsegpt", "2:4")
        assert f"{float(version.tags['ppl.builtin']):.4f}" == rows[label]["ppl"]
        assert f"{float(version.tags['sparsity']):.4f}" == rows[label]["sparsity"]
        files = {f.path for f in client.list_logged_model_artifacts(version.source.removeprefix("models:/"))}
        assert {"README.md", "config.json", "model.safetensors"} <= files
