"""End to end: the real Snakemake workflow on the micro config (about two minutes on 2 cores)."""
import csv

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


def test_mlflow_server_holds_parent_and_stage_runs(micro_run, mlflow_server):
    from mlflow.tracking import MlflowClient

    work, _, _ = micro_run
    assert not (work / "results" / "mlflow.db").exists(), "with MLFLOW_TRACKING_URI set, no local store is used"
    assert not (work / "results" / "micro" / "mlflow_pending").exists()
    client = MlflowClient(tracking_uri=mlflow_server)
    exp = client.get_experiment_by_name("sds")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("sds_role") == "pipeline"]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.data.params["config_hash"] == parent.data.tags["sds_config_hash"]
    assert parent.data.params["calibration.nsamples"] == "4"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    stages = {r.data.tags["sds_stage"] for r in children}
    assert {"build_model", "calibration", "prune1/sparsegpt/2of4", "reconstruct/default",
            "prune2/sparsegpt/2of4", "evaluate/sparsegpt/2of4/default/sds", "report"} <= stages
    sds_eval = next(r for r in children if r.data.tags["sds_stage"] == "evaluate/sparsegpt/2of4/default/sds")
    assert sds_eval.data.metrics["sparsity"] == pytest.approx(0.5)
    import json

    eval_json = work / "results" / "micro" / "eval" / "sparsegpt" / "2of4" / "default" / "sds.json"
    recorded = json.loads(eval_json.read_text())
    assert sds_eval.data.metrics["ppl.builtin"] == recorded["ppl"]["builtin"]  # what the stage wrote, unrounded
    assert sds_eval.data.metrics["zeroshot.mean.acc"] == recorded["zeroshot"]["mean"]["acc"]
    assert "git_revision" in sds_eval.data.tags
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert "report.md" in artifacts


def test_sds_model_loads_and_generates(micro_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sds.evaluate import measured_sparsity, pattern_violations
    from sds.pruners import parse_pattern

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
    from sds.io import iter_parquet_tensors, load_tensors_with_metadata
    from sds.layerwise import StatsAccumulator, collect_stats
    from sds.model import decoder_layers, layer_kwargs, load_model

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
    from sds.io import CorruptFileError
    from sds.model import LayerwiseModel
    from sds.passes import layer_statistics

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
