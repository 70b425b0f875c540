"""The benchmarks' shared driver still matches the stage functions: `bench/startup_bench.py` runs
calibration, layer_inputs, prune1, reconstruct and prune2 as processes through `scale_bench.run_pipeline`,
the same driver `gpu_check.py`, `reference_bench.py` and `scale_bench.py` use (a stage signature change
that the benchmarks miss fails here, not on a GPU node)."""
import subprocess
import sys

from conftest import ROOT


def test_startup_bench_runs_every_stage_and_prints_its_figures():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "startup_bench.py"), "--repeat", "1"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    for stage in ("calibration", "layer_inputs", "prune1", "reconstruct", "prune2"):
        row = next(l for l in lines if l.startswith(f"{stage} ") and l.rstrip().endswith(" s"))
        assert float(row.split()[-2]) > 0
    assert any(l.startswith("worst stage ") for l in lines)


def test_every_per_linear_prune_goes_through_the_hook_reference_pipeline_bench_replaces(monkeypatch):
    """bench/reference_pipeline_bench.py runs the reference solvers in the pipeline by replacing
    `sds.algorithms.method.prune`; a first or second prune that reached the pruners another way would score
    our own solver under the reference's name."""
    import torch

    import sds.algorithms.method as method_module
    from sds.algorithms.objective import LinearStats
    from sds.core.config import defaults
    from sds.core.patterns import parse_pattern

    calls = []

    def fake_prune(name, W, pattern, settings, *, hessian=None, W_start=None):
        calls.append((name, W_start is not None))
        mask = torch.ones_like(W, dtype=torch.bool)
        mask[:, ::2] = False
        return W * mask, mask

    monkeypatch.setattr(method_module, "prune", fake_prune)
    X = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    H = X.T @ X / 64
    stats = LinearStats(H, H, H)
    W = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    config = defaults()
    pattern = parse_pattern("2:4")
    first_W, first_mask, _ = method_module.first_prune("alps", W, W, stats, pattern, config["prune"])
    assert calls == [("alps", False)] and torch.equal(first_W, W * first_mask)
    for selection, expected in (("pruner", ("alps", False)), ("gradual", ("admm", True))):
        calls.clear()
        method_module.second_prune("alps", first_W, W, stats, pattern, config["prune"],
                                   dict(config["prune2"], selection=selection, fallback=False),
                                   (first_W, first_mask))
        assert calls == [expected]
