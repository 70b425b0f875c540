"""Resources for every rule that runs as a job (config `resources` over the profile's default-resources, seen
in dry runs with the repository's profiles), the card each GPU stage takes on a machine with several, and
`device: cuda` without a GPU stopping a stage with one line."""
import os
import re
import subprocess
import sys
import threading
import time

import pytest
import torch
import yaml

from conftest import ROOT, planned_jobs, snakemake

PROFILES = ROOT / "profiles"
# Rules the slurm-gpu profile keeps off the GPU (its set-resources)
CPU_ONLY = {"build_model", "layer_inputs", "reconstruct_gather", "export_checkpoint"}


def local_rules() -> set[str]:
    """The localrules, read from the workflow: the Snakefile's `localrules:` line and `localrule: True` rules."""
    listed = re.search(r"^localrules:(.*)$", (ROOT / "Snakefile").read_text(), re.M).group(1)
    names = set(listed.replace(",", " ").split())
    for smk in (ROOT / "workflow" / "rules").glob("*.smk"):
        for rule, body in re.findall(r"^\s*rule (\w+):\n(.*?)(?=^\s*rule \w+:|\Z)", smk.read_text(), re.M | re.S):
            if re.search(r"^\s*localrule:\s*True", body, re.M):
                names.add(rule)
    return names


def job_resources(output: str) -> dict[str, list[dict[str, str]]]:
    """Rule name -> the `resources:` of each of its jobs, from a dry run's job listing."""
    jobs: dict[str, list[dict[str, str]]] = {}
    for rule, block in re.findall(r"^(?:local)?rule (\w+):\n((?:    .*\n)+)", output, re.M):
        line = re.search(r"^    resources: (.*)$", block, re.M)
        pairs = [item.partition("=") for item in (line.group(1).split(", ") if line else [])]
        jobs.setdefault(rule, []).append({key: value for key, _, value in pairs})
    return jobs


def dry_run(tmp_path, profile: str, config: dict, *targets: str) -> dict[str, list[dict[str, str]]]:
    """The micro config with `config` on top, dry-run through profiles/<profile>: each job rule's resources."""
    cfg = {**yaml.safe_load((ROOT / "config" / "micro.yaml").read_text()), **config}
    cfg_path = tmp_path / f"{profile}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    proc = snakemake(tmp_path / "work", *targets, "-n", "--profile", str(PROFILES / profile),
                     "--configfile", str(cfg_path))
    jobs = job_resources(proc.stdout)
    assert set(jobs) == planned_jobs(proc.stdout), proc.stdout[-3000:]
    return {rule: runs for rule, runs in jobs.items() if rule not in local_rules()}


def test_local_rules_are_the_cheap_ones():
    assert local_rules() == {"all", "corpus", "calibration", "report", "export", "zeroshot_tasks"}


@pytest.mark.parametrize("layer_parallel", [False, True])
def test_every_job_rule_gets_the_configured_resources(tmp_path, layer_parallel):
    resources = {"default": {"mem_mb": 1234, "runtime": 77, "slurm_partition": "cfg", "cpus_per_task": 1},
                 "reconstruct": {"mem_mb": 2345}, "reconstruct_layer": {"runtime": 22},
                 "reconstruct_gather": {"runtime": 11}, "prune2": {"slurm_extra": "--qos=high"}}
    jobs = dry_run(tmp_path, "slurm", {"layer_parallel": layer_parallel, "resources": resources}, "all", "export")
    recon = {"reconstruct_layer", "reconstruct_gather"} if layer_parallel else {"reconstruct"}
    assert {"build_model", "layer_inputs", "prune1", "prune1_adjust", "prune2", "evaluate_dense",
            "evaluate_prune1", "evaluate_sds", "export_checkpoint"} | recon == set(jobs)
    # reconstruct_layer: default, then reconstruct's entry, then its own; reconstruct_gather: default, then its own
    own = {"reconstruct": {"mem_mb": "2345"}, "reconstruct_layer": {"mem_mb": "2345", "runtime": "22"},
           "reconstruct_gather": {"runtime": "11"}, "prune2": {"slurm_extra": "--qos=high"}}
    for rule, runs in jobs.items():
        expected = {"mem_mb": "1234", "runtime": "77", "slurm_partition": "cfg", "cpus_per_task": "1",
                    **own.get(rule, {})}
        for got in runs:
            assert {key: got.get(key) for key in expected} == expected, rule
            assert "gpu" not in got, rule


def test_unset_resources_come_from_the_profile(tmp_path):
    """No config resources: the profile's default-resources (8000 MB, 240 min, partition debug) reach every
    job rule, reconstruct_gather included; the config's `default` sets only what it names."""
    jobs = dry_run(tmp_path, "slurm", {"layer_parallel": True})
    assert "reconstruct_gather" in jobs
    for rule, runs in jobs.items():
        for got in runs:
            assert (got["mem_mb"], got["runtime"], got["slurm_partition"]) == ("8000", "240", "debug"), rule
            assert "cpus_per_task" not in got and "gpu" not in got, rule
    jobs = dry_run(tmp_path, "slurm", {"layer_parallel": True, "resources": {"default": {"mem_mb": 3000}}})
    assert {(got["mem_mb"], got["runtime"]) for runs in jobs.values() for got in runs} == {("3000", "240")}


def test_the_gpu_profile_gives_gpu_rules_one_card_and_the_config_overrides_it(tmp_path):
    jobs = dry_run(tmp_path, "slurm-gpu", {"layer_parallel": True}, "all", "export")
    for rule, runs in jobs.items():
        for got in runs:
            gpus = "0" if rule in CPU_ONLY else "1"
            assert (got["gpu"], got["mem_mb"], got["slurm_partition"]) == (gpus, "32000", "gpu"), rule
    # gpu 0 in the config beats the profile's gpu 1, and takes no gpu_model with it (--gpus=h100:0)
    resources = {"default": {"gpu": 2, "gpu_model": "h100"}, "evaluate_dense": {"gpu": 0}}
    jobs = dry_run(tmp_path, "slurm-gpu", {"resources": resources})
    assert jobs["evaluate_dense"][0]["gpu"] == "0" and "gpu_model" not in jobs["evaluate_dense"][0]
    assert (jobs["prune2"][0]["gpu"], jobs["prune2"][0]["gpu_model"]) == ("2", "h100")


# --- a card of its own per GPU stage --------------------------------------------------------------------

def test_two_holders_get_different_cards_and_a_third_waits_for_one(tmp_path, caplog):
    from sds.core.runtime import claim_card

    caplog.set_level("INFO", logger="sds")
    first, second = claim_card(["0", "1"], tmp_path), claim_card(["0", "1"], tmp_path)
    assert (first[0], second[0]) == (0, 1)
    third: list = []
    waiter = threading.Thread(target=lambda: third.append(claim_card(["0", "1"], tmp_path, poll_s=0.02)))
    waiter.start()
    time.sleep(0.3)
    assert waiter.is_alive() and not third, "a third holder shared a card instead of waiting"
    assert "all 2 GPUs (0, 1) are held by other sds stages" in caplog.text
    os.close(first[1])  # the first stage ends: its card is free
    waiter.join(timeout=10)
    assert third and third[0][0] == 0
    for _, fd in (second, third[0]):
        os.close(fd)


def test_a_card_held_by_another_process_is_skipped_until_that_process_ends(tmp_path):
    from sds.core.runtime import claim_card

    hold = ("import sys; from pathlib import Path; from sds.core.runtime import claim_card; "
            f"print(claim_card(['0', '1'], Path({str(tmp_path)!r}))[0], flush=True); sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", hold], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    try:
        assert holder.stdout.readline().strip() == "0"
        index, fd = claim_card(["0", "1"], tmp_path)
        assert index == 1
        os.close(fd)
    finally:
        holder.communicate("", timeout=30)  # the process ends, however it ends: the kernel drops its lock
    index, fd = claim_card(["0", "1"], tmp_path)
    assert index == 0
    os.close(fd)


def test_cards_are_named_machine_wide_and_locks_are_per_user_and_slurm_job():
    from sds.core.runtime import card_names, gpu_lock_dir

    assert card_names(2, None) == ["0", "1"]
    assert card_names(2, "2,3") == ["2", "3"]  # physical indices: runs shown other cards never collide
    assert card_names(2, "GPU-aa,GPU-bb,GPU-cc") == ["GPU-aa", "GPU-bb"]
    assert card_names(2, "5") == ["0", "1"]  # CUDA stops at an invalid entry: trust the count
    assert gpu_lock_dir({}).parts[-2:] == (f"sds-gpu-locks-{os.getuid()}", "machine")
    assert gpu_lock_dir({"SLURM_JOB_ID": "42"}).name == "slurm-job-42"


@pytest.fixture
def fake_cuda(monkeypatch, tmp_path):
    """CUDA with a given number of cards, on this CPU machine: the cards made current, recorded."""
    from sds.core import runtime

    current: list[int] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    monkeypatch.setattr(runtime, "gpu_lock_dir", lambda: tmp_path / "locks")
    monkeypatch.setattr(runtime, "_HELD_CARD", [])
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)

    def cards(count: int) -> list[int]:
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        return current

    yield cards
    for _, fd in runtime._HELD_CARD:
        os.close(fd)


def test_setup_puts_each_stage_process_on_a_card_of_its_own(fake_cuda, tmp_path):
    from sds.core import runtime
    from sds.core.runtime import claim_card, setup

    current = fake_cuda(3)
    other_stage = claim_card(["0", "1", "2"], tmp_path / "locks")  # card 0: another stage process's
    config = {"threads": torch.get_num_threads(), "device": "cuda", "seed": 0}
    assert setup(config) == torch.device("cuda", 1)
    # a process running several stages keeps its card (it would otherwise lock another, or wait for itself)
    assert setup({**config, "device": "auto"}) == torch.device("cuda", 1)
    assert current == [1, 1] and len(runtime._HELD_CARD) == 1
    os.close(other_stage[1])


def test_setup_on_one_card_takes_no_lock(fake_cuda, tmp_path):
    from sds.core.runtime import setup

    current = fake_cuda(1)
    assert setup({"threads": torch.get_num_threads(), "device": "cuda", "seed": 0}) == torch.device("cuda")
    assert current == [] and not (tmp_path / "locks").exists()


# --- device: cuda without a GPU -------------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a usable GPU")
def test_a_stage_with_device_cuda_on_a_machine_without_gpu_stops_with_one_line(tmp_path):
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"run": "t", "device": "cuda", "mlflow": {"enabled": False}}))
    proc = subprocess.run([sys.executable, "-m", "sds.cli", "prune1", "--config", "c.yaml", "model_dir=model",
                           "inputs_dir=inputs", "method=sparsegpt", "pattern=2of4", "out=out"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src"), "MLFLOW_TRACKING_URI": ""})
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "sds prune1: error: config key 'device' = 'cuda' but CUDA is not available on this machine (no GPU "
        "visible, or a CPU-only build of torch): set device to 'auto' or 'cpu'"]
    assert not (tmp_path / "out").exists()
