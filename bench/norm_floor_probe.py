"""Probe behind the floor on ADMM's input norms (`prune.admm_norm_floor`, default 0.3; the pipeline applies it
in every ADMM path): how large ADMM pruning makes weights on input channels that are nearly dead in the
calibration data, and how a floor on the input norms removes that growth without costing error, on REAL
statistics of SmolLM2-135M (captured by bench/layer_stats.py, as in bench/solver_bench.py).

    .venv/bin/python bench/norm_floor_probe.py [--layers 21 24] [--stats-cache /tmp/wg/stats.safetensors]

ADMM pruning works in the input-norm-scaled space, W' = W·diag(d), d_j = √H_jj (admm.py); a channel with
H_jj = 0 gets d_j = 1, but one with H_jj just above 0 (SmolLM2 has RMSNorm channels with d ≈ 1e-4, the
median is ≈ 0.14) gets its weights divided by d_j on the way back, so a moderate scaled-space value becomes a
weight tens of times the dense layer's largest. The probe prunes each linear at 2:4 with `admm_prune`
without the floor (c = 0) and with d floored at c × median(d) (c = 0.1, 0.3) and prints the relative
output error on the calibration statistics and on held-out ones (disjoint windows), max|W|/max|W_dense| and
‖W‖/‖W_dense‖.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from layer_stats import add_capture_arguments, load_or_capture  # noqa: E402
from sds.algorithms import admm  # noqa: E402
from sds.core.config import defaults  # noqa: E402
from sds.core.patterns import parse_pattern  # noqa: E402
from sds.algorithms.objective import LinearStats, relative_error  # noqa: E402



_PRUNE = defaults()["prune"]
ADMM_PRUNER = {"iters": _PRUNE["admm_iters"], "gradual_iters": _PRUNE["admm_gradual_iters"],
               "percdamp": _PRUNE["admm_percdamp"]}  # the pipeline's ADMM pruner settings, the floor aside
FLOORS = [("no floor", 0.0), ("floor 0.1 med", 0.1), ("floor 0.3 med", 0.3)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_capture_arguments(ap, layers=[21, 24], threads=2)
    ap.add_argument("--pattern", default="2:4")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    weights, calib, held = load_or_capture(args)
    pattern = parse_pattern(args.pattern)
    print(f"ADMM pruning at {args.pattern}, {args.nsamples} × {args.seqlen} tokens; errors relative to the dense output")
    for key in sorted(weights):
        Wd = weights[key]
        d = torch.diagonal(calib[key]).clamp_min(0).sqrt()
        print(f"{key}: d min {float(d.min()):.2e}, median {float(d.median()):.2e}, max {float(d.max()):.2e}")
        for label, floor in FLOORS:
            W, _ = admm.admm_prune(Wd, calib[key], pattern, **ADMM_PRUNER, norm_floor=floor)
            cal = relative_error(W, Wd, LinearStats(calib[key], calib[key], calib[key]))
            out = relative_error(W, Wd, LinearStats(held[key], held[key], held[key]))
            print(f"  {label:14s} calib {cal:.5f}  held-out {out:.5f}  max|W|/max|Wd| {float(W.abs().max() / Wd.abs().max()):7.2f}"
                  f"  ‖W‖/‖Wd‖ {float(W.norm() / Wd.norm()):.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
