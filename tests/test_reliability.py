"""Faults: killed stages, corrupt caches, numerical trouble, determinism, security defaults."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, snakemake, tiny_opt


def _copy_run(micro_run, tmp_path) -> Path:
    """A private copy of the finished micro run (outputs + Snakemake metadata) to damage."""
    work, _, _ = micro_run
    copy = tmp_path / "w"
    shutil.copytree(work, copy, symlinks=True, ignore=shutil.ignore_patterns("mlflow.db"))
    return copy


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*.xxh3"))}


@pytest.mark.parametrize("rule,output", [("prune1", "sparsegpt/2of4/prune1"),
                                         ("reconstruct", "sparsegpt/2of4/default/reconstruct")])
def test_killed_stage_leaves_nothing_and_rerun_is_bit_identical(micro_run, tmp_path, rule, output):
    work = _copy_run(micro_run, tmp_path)
    cfg = work / "micro.yaml"
    target = work / "results" / "micro" / output
    before = _digests(target)
    assert before, "the finished run recorded checksums"
    env = {**os.environ, "MLFLOW_TRACKING_URI": "", "SDS_FAULT_KILL": f"{rule}:1"}
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "-d", str(work),
                           "--cores", "1", "--configfile", str(cfg), "--forcerun", rule, "--until", rule],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode != 0, "the stage was killed (SIGKILL after its first layer)"
    assert not target.exists(), "a killed stage leaves no output behind"
    snakemake(work, str(target.relative_to(work)), "--cores", "1", "--configfile", str(cfg))
    assert _digests(target) == before, "the re-run reproduces the uninterrupted run bit for bit"
    assert not list(target.parent.glob(f".{target.name}.*.tmp")), "stale temporaries were cleaned up"


def test_corrupt_cache_is_named_then_recreated(micro_run, tmp_path):
    work = _copy_run(micro_run, tmp_path)
    cfg = work / "micro.yaml"
    cache = work / "results" / "micro" / "activations" / "input" / "layer_000.parquet"
    before = _digests(cache.parent)
    cache.write_bytes(cache.read_bytes()[:-100])
    proc = snakemake(work, "--cores", "1", "--configfile", str(cfg), "--forcerun", "prune1", "--until", "prune1",
                     check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert re.search(r"layer_000\.parquet: checksum mismatch \(truncated or altered\)", text), text[-3000:]
    assert "so that the next `snakemake` run re-creates it" in text
    assert not cache.parent.exists()
    snakemake(work, "results/micro/sparsegpt/2of4/prune1", "--cores", "1", "--configfile", str(cfg))
    assert _digests(cache.parent) == before


def test_nan_activations_name_the_layer():
    from sds.layerwise import NumericalError, collect_stats
    from sds.model import decoder_layers, layer_kwargs

    model = tiny_opt()
    bad = torch.randn(16, 32)
    bad[3, 5] = float("nan")
    with pytest.raises(NumericalError, match="layer 7 inputs of"):
        collect_stats(decoder_layers(model)[0], [bad], layer_kwargs(model, 16), layer_name="layer 7")


def test_hessian_solve_falls_back_to_stronger_dampening():
    from sds.pruners import inverse_hessian_cholesky

    g = torch.Generator().manual_seed(0)
    A = torch.randn(16, 16, generator=g)
    H = A @ A.T
    H -= 1.5 * torch.linalg.eigvalsh(H).max() * 0.01 * torch.eye(16) * 10  # indefinite at 1% dampening
    assert torch.linalg.eigvalsh(H).min() < 0
    U, damp = inverse_hessian_cholesky(H, 0.01)
    assert damp > 0.01 and torch.isfinite(U).all()
    with pytest.raises(FloatingPointError, match="not positive definite"):
        inverse_hessian_cholesky(-torch.eye(4) * 1e6, 0.01, max_tries=2)


def test_too_short_calibration_text_is_named():
    from sds.data import DataError, sample_windows

    with pytest.raises(DataError, match="calibration text has 10 tokens, fewer than one window of seqlen=64"):
        sample_windows(torch.arange(10), 4, 64, 0)


def test_prune_stage_is_deterministic_on_cpu(tmp_path):
    """Two runs of the same stage on the same inputs give bit-identical checkpoints."""
    from sds.pruners import parse_pattern, prune
    from sds.reconstruct import LinearStats, fista

    g = torch.Generator().manual_seed(1)
    W, X = torch.randn(32, 64, generator=g), torch.randn(512, 64, generator=g)
    H = X.T @ X / 512
    runs = []
    for _ in range(2):
        pruned, mask = prune("sparsegpt", W, parse_pattern("2:4"), hessian=H)
        runs.append(fista(pruned, W, LinearStats(H, H, H), steps=50, l1=0.01))
    assert torch.equal(runs[0], runs[1])


def test_no_unsafe_deserialisation_in_source():
    for path in (ROOT / "src").rglob("*.py"):
        text = path.read_text()
        assert "pickle" not in text, path
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, (path, call)
        assert "trust_remote_code=True" not in text, path


def test_mlflow_server_binds_loopback_by_default():
    import inspect

    from sds import mlflow_server

    assert inspect.signature(mlflow_server.start).parameters["host"].default == "127.0.0.1"
    assert "--host" in inspect.getsource(mlflow_server.main) and 'default="127.0.0.1"' in \
        inspect.getsource(mlflow_server.main)


def test_layer_parallel_reconstruction_equals_single_job(micro_run, tmp_path):
    """One job per decoder layer + gather gives the very same checkpoint as the single-job mode."""
    import yaml

    work = _copy_run(micro_run, tmp_path)
    cfg = yaml.safe_load((work / "micro.yaml").read_text())
    cfg["layer_parallel"] = True
    parallel_cfg = work / "parallel.yaml"
    parallel_cfg.write_text(yaml.safe_dump(cfg))
    target = work / "results" / "micro" / "sparsegpt" / "2of4" / "default" / "reconstruct"
    single = load_weights(target)
    from conftest import planned_jobs

    plan = snakemake(work, str(target.relative_to(work)), "-n", "--forcerun", "reconstruct_gather", "--cores", "2",
                     "--configfile", str(parallel_cfg)).stdout
    assert {"reconstruct_layer", "reconstruct_gather"} <= planned_jobs(plan)
    snakemake(work, str(target.relative_to(work)), "--forcerun", "reconstruct_gather", "--cores", "2",
              "--configfile", str(parallel_cfg))
    assert (target.parent / "reconstruct_layers" / "1" / "weights.safetensors").is_file()
    parallel = load_weights(target)
    assert parallel.keys() == single.keys()
    for key in single:
        assert torch.equal(parallel[key], single[key]), key


def load_weights(folder):
    from sds.io import load_tensors

    return load_tensors(folder / "weights.safetensors")
