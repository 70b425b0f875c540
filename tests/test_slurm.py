"""Integration: the micro workflow through a real one-node SLURM cluster (scripts/slurm/start.sh) with the
repository's profile (`--profile profiles/slurm`). Its reconstruct job is scancelled mid-stage: that leaves no
output, and re-running the same command finishes the workflow with exactly the numbers of an uninterrupted
run. Needs root (apt, daemons); about 4 minutes on 2 idle cores."""
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from test_perplexity import summary_row_perplexity

pytestmark = pytest.mark.slow

START, STOP = ROOT / "scripts" / "slurm" / "start.sh", ROOT / "scripts" / "slurm" / "stop.sh"
SNAKEMAKE = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile")]
# Rules that must run as SLURM jobs, and the localrules that must not.
HEAVY = {"build_model", "layer_inputs", "prune1", "prune1_adjust", "reconstruct", "prune2", "evaluate_dense",
         "evaluate_prune1", "evaluate_sds"}
LOCAL = {"corpus", "calibration", "report"}
JOBCOMP = Path("/var/log/slurm/jobcomp.log")
R = Path("results/micro")
RECON_LOG = R / "logs/reconstruct/sparsegpt_2of4_default.log"
RECON_OUT = R / "sparsegpt/2of4/default/reconstruct"


def _cluster_up() -> bool:
    if not shutil.which("sinfo"):
        return False
    proc = subprocess.run(["sinfo", "-h", "-n", "localhost", "-o", "%T"], capture_output=True, text=True)
    return proc.returncode == 0 and proc.stdout.strip() in {"idle", "mixed", "allocated"}


@pytest.fixture(scope="module")
def cluster():
    """The one-node test cluster; stopped afterwards (also when a test fails) unless it was already up."""
    if os.geteuid() != 0:
        pytest.skip("needs root: scripts/slurm/start.sh installs slurm-wlm/munge with apt and starts daemons")
    if not shutil.which("apt-get") and not shutil.which("slurmctld"):
        pytest.skip("neither apt-get nor an installed slurmctld: cannot set up the SLURM test cluster")
    was_up = _cluster_up()
    proc = subprocess.run(["bash", str(START)], capture_output=True, text=True, timeout=600)
    if proc.returncode == 3:  # apt could not install slurm-wlm/munge (no repository reachable)
        pytest.skip(f"apt unavailable, cannot install SLURM: {proc.stderr.strip().splitlines()[-1]}")
    if proc.returncode != 0:
        subprocess.run(["bash", str(STOP)], capture_output=True)
        pytest.fail(f"scripts/slurm/start.sh failed:\n{proc.stdout}\n{proc.stderr}")
    try:
        yield
    finally:
        if not was_up:
            subprocess.run(["bash", str(STOP)], capture_output=True, text=True, timeout=120)


def _env() -> dict:
    # sbatch exports this environment to the jobs (--export=ALL). No MLflow server: the config disables it.
    return {**os.environ, "MLFLOW_TRACKING_URI": ""}


def _slurm_cmd(work: Path, cfg: Path) -> list[str]:
    # --slurm-keep-successful-logs: the per-job SLURM logs are part of the evidence that jobs went through SLURM.
    return [*SNAKEMAKE, "-d", str(work), "--profile", str(ROOT / "profiles" / "slurm"), "--configfile", str(cfg),
            "--slurm-keep-successful-logs"]


def submitted(output: str) -> dict[str, list[int]]:
    """Rule name -> SLURM job ids, from Snakemake's 'submitted with SLURM jobid N (log: .../rule_X/...)'."""
    jobs: dict[str, list[int]] = {}
    for jobid, rule in re.findall(r"submitted with SLURM jobid (\d+) \(log: \S*/slurm_logs/rule_(\w+)/", output):
        jobs.setdefault(rule, []).append(int(jobid))
    return jobs


def jobcomp() -> dict[int, str]:
    """SLURM job id -> its line in the controller's job completion log (written when a job ends)."""
    if not JOBCOMP.is_file():
        return {}
    return {int(m.group(1)): line for line in JOBCOMP.read_text().splitlines()
            if (m := re.search(r"JobId=(\d+) ", line))}


def _without_timings(value):
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if k != "seconds"}
    return value


def final_numbers(work: Path) -> dict:
    """What an interrupted-and-resumed run must reproduce exactly: the SDS evaluation (full precision, timings
    left out) and the checksums of the reconstructed and final weights."""
    d = work / R / "sparsegpt" / "2of4" / "default"
    evaluation = json.loads((work / R / "eval" / "sparsegpt" / "2of4" / "default" / "sds.json").read_text())
    return {"eval": _without_timings(evaluation),
            "reconstruct": (d / "reconstruct" / "weights.safetensors.xxh3").read_text(),
            "sds": (d / "sds" / "weights.safetensors.xxh3").read_text()}


def _scancel_reconstruct_mid_stage(work: Path, head: subprocess.Popen) -> int | None:
    """Waits until the reconstruct stage is computing (its log shows layer 1 of 2 done) and scancels its job."""
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline and head.poll() is None:
        stage_log = work / RECON_LOG
        if stage_log.is_file() and "layer 1/2" in stage_log.read_text():
            queue = subprocess.run(["squeue", "-h", "-t", "R", "-o", "%i %k"], capture_output=True, text=True).stdout
            match = re.search(r"^(\d+) rule_reconstruct_", queue, re.M)
            if match:
                subprocess.run(["scancel", match.group(1)], check=True)
                return int(match.group(1))
        time.sleep(0.2)
    return None


@pytest.fixture(scope="module")
def slurm_run(cluster, tmp_path_factory):
    """The micro config through --executor slurm; its reconstruct job is scancelled mid-stage, then the same
    command is run again to finish the workflow. Meanwhile a copy of the interrupted work folder finishes
    reconstruct..evaluate_sds locally, uninterrupted: the reference for the numbers."""
    work = tmp_path_factory.mktemp("slurm")
    cfg = yaml.safe_load((ROOT / "config" / "micro.yaml").read_text())
    cfg["mlflow"] = {"enabled": False}  # tracking has its own tests; it costs seconds in every job
    # Set through the config, as a user tunes them: 1 CPU per job lets the 2-CPU node run two jobs at once,
    # and the reconstruct entry overrides one key of `default`.
    cfg["resources"] = {"default": {"cpus_per_task": 1, "mem_mb": 1500, "runtime": 30},
                        "reconstruct": {"mem_mb": 1200}}
    cfg_path = work / "micro_slurm.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))

    start = time.monotonic()
    first_log = work / "snakemake_first.log"
    with first_log.open("w") as log:
        # The micro model's layers take milliseconds: the first run's reconstruct job holds after its first
        # layer (the stages' test hook, passed on by sbatch), so the scancel lands mid-stage on any machine.
        head = subprocess.Popen(_slurm_cmd(work, cfg_path), stdout=log, stderr=subprocess.STDOUT,
                                env={**_env(), "SDS_FAULT_SLEEP": "reconstruct:1:300"})
        try:
            cancelled = _scancel_reconstruct_mid_stage(work, head)
            first_rc = head.wait(timeout=400)
        finally:
            if head.poll() is None:
                head.kill()
    after_kill = {
        "cancelled": cancelled, "rc": first_rc, "log": first_log.read_text(),
        "stage_log": (work / RECON_LOG).read_text() if (work / RECON_LOG).is_file() else "",
        "output_exists": (work / RECON_OUT).exists(),
    }
    # The reference runs beside the re-run: that one mostly waits on SLURM status checks.
    ref = work.parent / (work.name + "-reference")
    shutil.copytree(work, ref, ignore=shutil.ignore_patterns("slurm_logs", "log", "*.log"))
    ref_log = ref / "snakemake_reference.log"
    with ref_log.open("w") as log:
        reference = subprocess.Popen([*SNAKEMAKE, "-d", str(ref), "--profile", str(ROOT / "profiles" / "local"),
                                      "--configfile", str(cfg_path), "--until", "evaluate_sds"],
                                     stdout=log, stderr=subprocess.STDOUT, env=_env())
        try:
            second = subprocess.run(_slurm_cmd(work, cfg_path), capture_output=True, text=True, timeout=600,
                                    env=_env())
            after_kill["reference_rc"] = reference.wait(timeout=600)
        finally:
            if reference.poll() is None:
                reference.kill()
    after_kill["reference"], after_kill["reference_log"] = ref, ref_log.read_text()
    (work / "snakemake_second.log").write_text(second.stdout + second.stderr)
    if second.returncode != 0:
        raise AssertionError(f"re-run failed:\n{second.stdout[-4000:]}\n{second.stderr[-6000:]}")
    print(f"\nmicro workflow through SLURM, with one scancel and a re-run: {time.monotonic() - start:.0f}s")
    return work, cfg_path, after_kill, second.stdout + second.stderr


def test_micro_workflow_runs_through_slurm(slurm_run):
    work, _, first, second = slurm_run
    assert (work / R / "report" / "report.md").is_file()
    rows = list(csv.DictReader((work / "results" / "summary.csv").open()))
    assert {row["stage"] for row in rows} == {"dense", "prune1", "prune1+adjust", "sds"}
    for row in rows:
        assert float(row["ppl"]) == pytest.approx(summary_row_perplexity(work / R, row), rel=1e-4), row
        assert float(row["sparsity"]) == pytest.approx(0.0 if row["stage"] == "dense" else 0.5, abs=1e-9)

    # Every heavy rule went through sbatch (over both runs); localrules did not.
    jobs = submitted(first["log"])
    for rule, ids in submitted(second).items():
        jobs.setdefault(rule, []).extend(ids)
    assert HEAVY <= set(jobs) and not LOCAL & set(jobs), first["log"][-3000:]
    assert len(jobs["evaluate_prune1"]) == 2
    slurm_logs = {p.name.removeprefix("rule_") for p in (work / ".snakemake" / "slurm_logs").iterdir()}
    assert HEAVY <= slurm_logs and not LOCAL & slurm_logs
    for rule in LOCAL:
        assert f"localrule {rule}:" in first["log"] + second, f"{rule} should run as a localrule"

    # The controller ran them to completion with the resources from the config (its TRES in the jobcomp log).
    done = jobcomp()
    for rule, ids in jobs.items():
        for jobid in ids:
            line = done.get(jobid, "")
            mem = 1200 if rule == "reconstruct" else 1500
            assert f"Tres=cpu=1,mem={mem}M" in line, f"{rule} job {jobid}: {line or 'not in ' + str(JOBCOMP)}"
            if jobid != first["cancelled"]:
                assert "JobState=COMPLETED" in line, f"{rule} job {jobid}: {line}"


def test_scancelled_job_leaves_no_output_and_rerun_matches_uninterrupted_run(slurm_run):
    work, cfg, first, second = slurm_run
    assert first["cancelled"] is not None, f"never saw reconstruct running:\n{first['log'][-3000:]}"
    assert "layer 2/2" not in first["stage_log"], "scancel came too late: the stage had finished"
    for _ in range(50):  # slurmctld writes the record once the job's processes are gone
        if first["cancelled"] in jobcomp():
            break
        time.sleep(0.2)
    assert "JobState=CANCELLED" in jobcomp().get(first["cancelled"], "")
    # Snakemake saw the job fail and stopped; the stage's output is absent, not partial.
    assert first["rc"] != 0 and "SLURM status is: 'CANCELLED'" in first["log"], first["log"][-3000:]
    assert not first["output_exists"]
    # The re-run (same command) picked up there and left no temporaries behind.
    assert {"reconstruct", "prune2", "evaluate_sds"} <= set(submitted(second))
    assert not list((work / "results").rglob("*.tmp")), "temporary files left behind"

    # Same numbers and the same bytes as the uninterrupted reference (local run of `--until evaluate_sds`
    # on a copy of the interrupted folder).
    assert first["reference_rc"] == 0, first["reference_log"][-3000:]
    assert "localrule reconstruct:" in first["reference_log"], "the reference did not run reconstruct"
    assert final_numbers(first["reference"]) == final_numbers(work)


def test_jobs_of_a_cluster_run_use_the_config_it_started_with(cluster, tmp_path):
    """The config file is edited right after the run starts (before any sbatch job has started): every job,
    which reads the Snakefile and that file again on the node, must run the config the run started with."""
    work = tmp_path / "edited"
    work.mkdir()
    cfg = yaml.safe_load((ROOT / "config" / "micro.yaml").read_text())
    cfg["mlflow"] = {"enabled": False}
    cfg["resources"] = {"default": {"cpus_per_task": 1, "mem_mb": 1500, "runtime": 30}}
    cfg_path = work / "micro_slurm.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    configs = work / R / "config"
    log = work / "snakemake.log"
    with log.open("w") as out:
        head = subprocess.Popen([*_slurm_cmd(work, cfg_path), "--until", "layer_inputs"], stdout=out,
                                stderr=subprocess.STDOUT, env=_env())
        try:
            deadline = time.monotonic() + 120
            while not (configs.is_dir() and any(configs.glob("*.json"))):  # written when the run starts
                assert head.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.1)
            started = [p.name for p in configs.glob("*.json")]
            cfg["model"]["dtype"] = "bfloat16"  # read by layer_inputs, a SLURM job that starts later
            cfg_path.write_text(yaml.safe_dump(cfg))
            assert head.wait(timeout=600) == 0, log.read_text()[-4000:]
        finally:
            if head.poll() is None:
                head.kill()
    assert "layer_inputs" in submitted(log.read_text()), log.read_text()[-3000:]
    assert [p.name for p in configs.glob("*.json")] == started, "a job wrote (and ran) the edited config"
    manifest = json.loads((work / R / "activations" / "input" / "manifest.json").read_text())
    assert manifest["dtype"] == "float32", "the layer_inputs job ran the edited config"
