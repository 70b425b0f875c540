"""The `sds` command (validate, export, sync), the results root every output follows, hf: sources checked
against the local caches before any work, and scripts/setup.sh's choice of torch build."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from conftest import LOCAL_PATH, ROOT, planned_jobs, snakemake
from sds.cli import main

MICRO = yaml.safe_load((ROOT / "config" / "micro.yaml").read_text())
# `python -m sds` runs this checkout's code; PATH: see conftest.LOCAL_PATH
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "PATH": LOCAL_PATH}


def _write(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


# --- sds validate ----------------------------------------------------------------------------------------

def test_validate_lists_every_error_at_once(tmp_path, capsys):
    bad = _write(tmp_path / "bad.yaml", {
        "run": "a b", "calibraton": {}, "seed": -1,
        "calibration": {"nsamples": 0, "source": str(tmp_path / "missing.txt")},
        "prune": {"patterns": ["4:4", "2:4", "unstructured:1.5"]},
        "evaluate": {"datasets": {"wiki": str(tmp_path / "absent.txt")}},
    })
    assert main(["validate", str(bad)]) == 1
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert lines[0] == f"sds validate: {bad}: 8 errors:", err
    expected = ["unknown config key 'calibraton'", "config key 'run' = 'a b' is invalid",
                "config key 'seed' = -1 is invalid", "config key 'calibration.nsamples' = 0 is invalid",
                "config key 'prune.patterns.0': pattern '4:4'", "config key 'prune.patterns.2'",
                f"config key 'calibration.source': file '{tmp_path / 'missing.txt'}' not found",
                f"config key 'evaluate.datasets.wiki': file '{tmp_path / 'absent.txt'}' not found"]
    assert len(lines) == 1 + len(expected)
    for text in expected:
        assert sum(text in line for line in lines[1:]) == 1, f"{text!r} not listed once in:\n{err}"


def test_validate_passes_a_valid_config_and_names_where_its_outputs_go(tmp_path, capsys):
    good = _write(tmp_path / "good.yaml", {**MICRO, "results_dir": str(tmp_path / "scratch")})
    assert main(["validate", str(good)]) == 0
    assert capsys.readouterr().out == (f"sds validate: {good}: valid (run 'micro', outputs under "
                                       f"{tmp_path}/scratch/micro/)\n")
    assert main(["validate", "--print", str(good)]) == 0
    resolved = json.loads(capsys.readouterr().out)
    assert resolved["results_dir"] == str(tmp_path / "scratch") and resolved["calibration"]["nsamples"] == 4


def test_python_m_sds_and_the_console_entry_point_run_the_same_main(tmp_path):
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, name = scripts["sds"].partition(":")
    assert getattr(__import__(module, fromlist=[name]), name) is main
    bad = _write(tmp_path / "bad.yaml", {"run": "x", "seed": "one", "threads": 0})
    for entry in ("sds", "sds.cli"):
        proc = subprocess.run([sys.executable, "-m", entry, "validate", str(bad)], capture_output=True, text=True,
                              env=ENV, timeout=120)
        assert proc.returncode == 1
        assert "2 errors:" in proc.stderr and "'seed' = 'one'" in proc.stderr and "'threads' = 0" in proc.stderr


# --- hf: sources --------------------------------------------------------------------------------------

def _cached_dataset(cache: Path, repo: str, rows: list[str], split: str = "test") -> None:
    """`repo` as `datasets` leaves it in its cache after an online load_dataset(repo): one prepared Arrow
    split under <cache>/<namespace>___<name>/default/0.0.0/<hash>/, which load_dataset finds offline."""
    import pandas as pd
    from datasets.packaged_modules.parquet.parquet import Parquet

    source = cache.parent / "rows.parquet"
    pd.DataFrame({"text": rows}).to_parquet(source)
    builder = Parquet(data_files={split: [str(source)]}, hash="0" * 16, cache_dir=str(cache.parent / "build"))
    builder.download_and_prepare()
    namespace, name = repo.split("/")
    target = cache / f"{namespace}___{name}" / "default" / "0.0.0" / ("0" * 16)
    shutil.copytree(builder.cache_dir, target)
    (target / f"parquet-{split}.arrow").rename(target / f"{name}-{split}.arrow")


def test_hf_datasets_are_looked_up_in_the_local_cache(tmp_path, monkeypatch, capsys):
    import datasets

    from sds.data.texts import read_text_source

    cache = tmp_path / "datasets-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _cached_dataset(cache, "someone/tiny", ["first line", "second line"])
    capsys.readouterr()  # the fixture's own progress bars
    present = {**MICRO, "evaluate": {**MICRO["evaluate"], "datasets": {"tiny": "hf:someone/tiny"}}}
    assert main(["validate", str(_write(tmp_path / "present.yaml", present))]) == 0
    assert capsys.readouterr().err == "", "datasets' own log lines and progress bars are not shown"
    assert read_text_source("hf:someone/tiny", split="test") == "first line\n\nsecond line"  # what the stage reads
    capsys.readouterr()  # datasets' log lines in a stage

    missing = {**present, "calibration": {**MICRO["calibration"], "source": "hf:someone/tiny"},  # no train split
               "evaluate": {**MICRO["evaluate"], "datasets": {"tiny": "hf:someone/tiny", "gone": "hf:nobody/gone"}}}
    assert main(["validate", str(_write(tmp_path / "missing.yaml", missing))]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"sds validate: {tmp_path / 'missing.yaml'}: 2 errors:" and len(err) == 3, err
    assert err[1].startswith("  config key 'calibration.source': dataset 'hf:someone/tiny' (split 'train') is not "
                             f"in the local datasets cache ({cache})") and "Unknown split" in err[1]
    assert err[2].startswith("  config key 'evaluate.datasets.gone': dataset 'hf:nobody/gone' (split 'test') is not "
                             "in the local datasets cache")
    no_field = {**present, "calibration": {**MICRO["calibration"], "source": "hf:someone/tiny::test",
                                           "text_field": "body"}}
    assert main(["validate", str(_write(tmp_path / "field.yaml", no_field))]) == 1
    assert capsys.readouterr().err == (f"sds validate: {tmp_path / 'field.yaml'}: config key 'calibration.source': "
                                       "dataset 'hf:someone/tiny::test' has no field 'body' (its fields: text)\n")


def test_an_hf_model_id_is_its_snapshot_in_the_local_hub_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from sds.core.architectures import resolve_model_dir
    from sds.core.config import config_errors

    snapshot = tmp_path / "hub" / "models--someone--tiny" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (tmp_path / "hub" / "models--someone--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--someone--tiny" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert resolve_model_dir("hf:someone/tiny") == resolve_model_dir("someone/tiny") == snapshot
    errors = config_errors({"run": "x", "model": {"source": "hf:someone/absent"}})[1]
    assert errors[0] == ("config key 'model.source': model 'hf:someone/absent' is neither a local folder nor in the "
                         f"local Hugging Face cache ({tmp_path / 'hub'}); nothing is downloaded at run time: give a "
                         "save_pretrained folder or download it once beforehand")


def test_an_hf_source_missing_from_the_cache_stops_the_run_before_any_work(tmp_path):
    cfg = {**MICRO, "calibration": {**MICRO["calibration"], "source": "hf:someone/absent-dataset"},
           "evaluate": {**MICRO["evaluate"],
                        "datasets": {"builtin": "builtin", "wiki": "hf:wikitext:wikitext-2-raw-v1"}}}
    path = _write(tmp_path / "hf.yaml", cfg)
    proc = snakemake(tmp_path, "--cores", "1", "--configfile", str(path), check=False,
                     env={"HF_HOME": str(tmp_path / "hf-home"), "HF_DATASETS_CACHE": str(tmp_path / "hf-home" / "ds")})
    assert proc.returncode == 1
    lines = proc.stderr.splitlines()
    first = lines.index("sds: invalid configuration: 2 errors:")
    assert lines[first + 1].startswith("  config key 'calibration.source': dataset 'hf:someone/absent-dataset' "
                                       "(split 'train') is not in the local datasets cache")
    assert lines[first + 2].startswith("  config key 'evaluate.datasets.wiki': dataset 'hf:wikitext:wikitext-2-raw-v1' "
                                       "(split 'test') is not in the local datasets cache")
    assert not (tmp_path / "results").exists()


# --- the results root ---------------------------------------------------------------------------------

def test_the_results_root_is_the_config_key_else_sds_results_else_results(monkeypatch):
    from sds.core import layout

    monkeypatch.delenv("SDS_RESULTS", raising=False)
    assert layout.results_root() == "results" and layout.results_root({"results_dir": None}) == "results"
    assert layout.RunLayout("r").prune1("wanda", "2of4") == "results/r/wanda/2of4/prune1"
    monkeypatch.setenv("SDS_RESULTS", "/scratch/me/sds/")
    assert layout.results_root() == "/scratch/me/sds"
    assert layout.results_root({"results_dir": "elsewhere"}) == "elsewhere"
    L = layout.RunLayout("r")
    assert L.root == "/scratch/me/sds/r" and layout.run_dir("r") == Path("/scratch/me/sds/r")
    assert L.log("prune1", "wanda", "2of4") == "/scratch/me/sds/r/logs/prune1/wanda_2of4.log"
    assert L.benchmark("report") == "/scratch/me/sds/r/benchmarks/report/report.tsv"
    assert L.pending == "/scratch/me/sds/r/mlflow_pending"
    # the shared files, also as the module attributes other modules import, read the root when read
    assert (layout.SUMMARY_CSV, layout.MLFLOW_DB, layout.MLFLOW_ARTIFACTS) == (
        "/scratch/me/sds/summary.csv", "/scratch/me/sds/mlflow.db", "/scratch/me/sds/mlartifacts")
    assert layout.summary_csv("x") == "x/summary.csv" and layout.mlflow_db() == "/scratch/me/sds/mlflow.db"
    assert layout.use_results_root({"results_dir": "/other"}) == "/other" and os.environ["SDS_RESULTS"] == "/other"
    assert layout.ZEROSHOT_SUMMARY_CSV == "/other/zeroshot_summary.csv" and layout.RESULTS == "/other"
    with pytest.raises(AttributeError):
        layout.NO_SUCH_PATH


def test_the_results_dir_is_not_part_of_the_config_hash():
    from sds.core.config import config_hash, validate_config

    assert config_hash(validate_config(MICRO)) == config_hash(validate_config({**MICRO, "results_dir": "/x"}))
    assert config_hash(validate_config(MICRO)) != config_hash(validate_config({**MICRO, "seed": 1}))


def _paths_of(dry_run: str) -> list[str]:
    """The output, log and benchmark paths of every job of a dry run, and the shell commands' out= and
    summary_csv= arguments."""
    found = []
    for line in dry_run.splitlines():
        key, _, value = line.strip().partition(": ")
        if key in ("output", "log", "benchmark"):
            found += value.split(", ")
        found += [word.split("=", 1)[1] for word in line.split() if word.startswith(("out=", "summary_csv="))]
    return found


def test_a_dry_run_with_another_root_puts_every_output_under_it(tmp_path):
    root = tmp_path / "scratch" / "sds"
    proc = snakemake(tmp_path, "-n", "-p", "--configfile", str(ROOT / "config" / "micro.yaml"),
                     env={"SDS_RESULTS": str(root)})
    paths = _paths_of(proc.stdout)
    assert {"corpus", "prune1", "prune2", "evaluate_sds", "report"} <= planned_jobs(proc.stdout)
    assert len(paths) > 40 and f"{root}/summary.csv" in paths and f"{root}/micro/report/report.md" in paths
    assert f"{root}/micro/logs/prune2/sparsegpt_2of4_default.log" in paths
    outside = [p for p in paths if not p.strip("'").startswith(f"{root}/")]
    assert not outside, outside
    assert not (tmp_path / "results").exists() and not root.exists()  # a dry run writes nothing


def test_sds_export_runs_the_export_target_under_the_configs_root(tmp_path):
    """`sds export` is snakemake's export target; the config's `results_dir` wins over SDS_RESULTS."""
    root = tmp_path / "from-config"
    cfg = _write(tmp_path / "micro.yaml", {**MICRO, "results_dir": str(root)})
    proc = subprocess.run([sys.executable, "-m", "sds", "export", str(cfg), "-n", "-p"], cwd=tmp_path, text=True,
                          capture_output=True, timeout=600, env={**ENV, "SDS_RESULTS": str(tmp_path / "from-env")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.startswith(f"sds export: {sys.executable} -m snakemake -s {ROOT / 'Snakefile'} "
                                  f"--configfile={cfg} --cores 2 export -n -p\n")
    assert planned_jobs(proc.stdout) >= {"export_checkpoint", "prune2", "export"}
    assert "report" not in planned_jobs(proc.stdout)
    paths = _paths_of(proc.stdout)
    assert f"{root}/micro/export/sparsegpt/2of4/prune1_adjust" in paths
    assert all(p.strip("'").startswith(f"{root}/") for p in paths), paths
    assert not (tmp_path / "from-env").exists() and not (tmp_path / "results").exists()


def test_sds_export_names_a_missing_config_and_export_config_json_is_still_the_stage(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("SDS_RESULTS", raising=False)  # a stage exports its root: unset again afterwards
    assert main(["export", str(tmp_path / "nope.yaml")]) == 1
    assert capsys.readouterr().err == f"sds export: error: config file '{tmp_path / 'nope.yaml'}' not found\n"
    from sds.core.config import validate_config

    resolved = tmp_path / "resolved.json"
    resolved.write_text(json.dumps(validate_config({"run": "t"})))
    # the export rule's own call: the stage, which reads the model folder it is given
    assert main(["export", "--config", str(resolved), f"model_dir={tmp_path / 'no-model'}", "stage=prune1",
                 f"checkpoint={tmp_path / 'ckpt'}", "method=sparsegpt", "pattern=2of4", f"out={tmp_path / 'o'}"]) == 1
    assert capsys.readouterr().err.endswith(
        f"sds export: error: model path '{tmp_path / 'no-model'}' does not exist or is not a directory\n")


def test_kept_mlflow_records_and_the_default_store_follow_the_root(tmp_path, monkeypatch, capsys):
    """A stage's record kept while the store is unreachable lies under the root; `sds sync` (no arguments)
    finds it there and logs it into the default store, also under the root."""
    root = tmp_path / "scratch"
    script = """
import os
from sds.cli import main
from sds.core.config import config_hash, validate_config
from sds.tracking.stage_runs import record_stage
cfg = validate_config({"run": "t"})
os.environ["MLFLOW_TRACKING_URI"] = "http://127.0.0.1:9"  # nothing listens there
assert record_stage(cfg, config_hash(cfg), "evaluate/dense", params={}, metrics={"ppl": 5.0}) is False
del os.environ["MLFLOW_TRACKING_URI"]
raise SystemExit(main(["sync"]))
"""
    env = {k: v for k, v in ENV.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env={**env, "SDS_RESULTS": str(root)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == "sds sync: t: 1 record(s) logged, 0 still pending\n"
    assert (root / "mlflow.db").is_file() and (root / "t" / "mlflow_pending").is_dir()
    assert not list((root / "t" / "mlflow_pending").iterdir())
    assert not (tmp_path / "results").exists() and not (tmp_path / "mlruns").exists()
    monkeypatch.setenv("SDS_RESULTS", str(tmp_path / "empty"))
    assert main(["sync"]) == 0
    assert capsys.readouterr().out == f"sds sync: no kept MLflow records under {tmp_path / 'empty'}/\n"


# --- scripts/setup.sh ---------------------------------------------------------------------------------

def _setup(venv: Path, torch_build: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "SDS_TORCH"}
    env |= {"SDS_VENV": str(venv)} | ({"SDS_TORCH": torch_build} if torch_build is not None else {})
    return subprocess.run(["bash", str(ROOT / "scripts" / "setup.sh")], capture_output=True, text=True, env=env,
                          timeout=60)


@pytest.mark.parametrize("torch_build,pip_args", [
    (None, "torch==2.13.0"),
    ("cpu", "torch==2.13.0+cpu --index-url https://download.pytorch.org/whl/cpu"),
    ("cu128", "torch==2.13.0+cu128 --index-url https://download.pytorch.org/whl/cu128"),
])
def test_setup_installs_the_torch_build_asked_for_and_is_a_no_op_when_up_to_date(tmp_path, torch_build, pip_args):
    """setup.sh run against a stand-in venv whose python records what it is asked to run."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    calls = tmp_path / "calls.txt"
    (venv / "bin" / "python").write_text(f'#!/bin/sh\necho "$*" >> {calls}\n')
    (venv / "bin" / "python").chmod(0o755)
    proc = _setup(venv, torch_build)
    assert proc.returncode == 0, proc.stderr
    pip = [line for line in calls.read_text().splitlines() if line.startswith("-m pip install")]
    assert pip[0] == f"-m pip install -q --disable-pip-version-check {pip_args}"
    assert pip[1:] == ["-m pip install -q --disable-pip-version-check -r requirements.txt",
                       "-m pip install -q --disable-pip-version-check --no-deps -e ."]
    pins = (ROOT / "requirements.txt").read_bytes() + (ROOT / "pyproject.toml").read_bytes()
    unset_stamp = hashlib.sha256(pins).hexdigest()  # the stamp of every setup before SDS_TORCH existed
    assert ((venv / ".sds-installed").read_text().strip() == unset_stamp) == (torch_build is None)
    before = calls.read_text()
    again = _setup(venv, torch_build)
    assert (again.returncode, again.stderr, calls.read_text()) == (0, "", before), "up to date: nothing runs"


def test_setup_refuses_an_unknown_torch_build(tmp_path):
    proc = _setup(tmp_path / "venv", "cuda")
    assert proc.returncode == 1 and not (tmp_path / "venv").exists()
    assert proc.stderr == "sds setup: SDS_TORCH=cuda is not a PyTorch wheel index (cpu, cu126, cu128, rocm6.4, ...)\n"
