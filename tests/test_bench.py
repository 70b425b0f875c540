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


def test_reference_pipeline_bench_perturbation_is_rounding_sized_seeded_and_keeps_h_positive():
    """The bench's spread rows feed each pruner call S H S, S = diag(1 + 1e-6·g): the same data to float32's
    rounding, the same per call and seed (rows rerun alike), different across seeds and calls, H still PSD."""
    sys.path.insert(0, str(ROOT / "bench"))
    import torch
    from reference_pipeline_bench import perturbed_hessian

    X = torch.randn(256, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    H = X.T @ X / 256
    once, again = perturbed_hessian(H, 1, 7), perturbed_hessian(H, 1, 7)
    assert torch.equal(once, again)
    assert not torch.equal(once, perturbed_hessian(H, 2, 7)) and not torch.equal(once, perturbed_hessian(H, 1, 8))
    relative = ((once - H).abs() / H.abs()).max().item()
    assert 1e-8 < relative < 1e-5
    assert torch.linalg.eigvalsh(once).min() > 0 and torch.allclose(once, once.T)


def test_reference_pipeline_bench_shadow_record_scores_each_pruner_on_the_references_w_and_h():
    """A `--shadow` line holds, for one linear, the reference's error and ours on the same (W, H) with the share
    of the reference's kept weights ours keeps; the summary's ratios come from those numbers."""
    sys.path.insert(0, str(ROOT / "bench"))
    import torch
    from reference_pipeline_bench import shadow_record, shadow_summary

    from sds.algorithms.objective import LinearStats, relative_error

    X = torch.randn(512, 16, generator=torch.Generator().manual_seed(0))
    H = X.T @ X / 512
    W = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    big = W.abs() >= W.abs().median()
    reference_W = W * big                                  # magnitude: keeps the larger half
    mixed = big.clone()
    mixed[0] = ~mixed[0]                                   # one row keeps the other half
    runs = {"same": (reference_W, big), "mixed": (W * mixed, mixed)}
    record = shadow_record(3, W, H, reference_W, 2.0, [["same", {}], ["mixed", {"x": 1}]],
                           lambda overrides: runs["mixed" if overrides else "same"])
    stats = LinearStats(H, H, H)
    assert record["linear"] == 3 and record["ref_s"] == 2.0
    assert record["ref"] == record["same"] == relative_error(reference_W, W, stats)
    assert record["mixed"] == relative_error(W * mixed, W, stats) != record["ref"]
    assert record["same_overlap"] == 1.0
    assert record["mixed_overlap"] == float((mixed & big).sum()) / float(big.sum()) < 1.0
    lines = shadow_summary([record])                       # the tags the record holds, in its order
    assert lines == shadow_summary([record], ["same", "mixed"])
    assert "geometric mean 1.00000" in lines[0] and "100.00 %" in lines[0]
    assert f"{record['mixed'] / record['ref']:.5f}" in lines[1]
