"""Benchmark: layer-parallel dense reconstruction (one job per decoder layer) with 1 vs N local jobs.

    .venv/bin/python bench/layer_parallel_bench.py [--workdir DIR] [--configfile config/config.yaml]
        [--method sparsegpt] [--pattern 2of4] [--jobs 1 2]

Uses (or first creates) the single-job pipeline run up to prune1 in DIR, then re-runs only the
reconstruction of one method/pattern in layer-parallel mode with each job count, printing wall seconds
and the largest difference to the single-job checkpoint (the documented tolerance: exactly 0).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def snakemake(workdir: Path, *args: str) -> float:
    start = time.monotonic()
    subprocess.run([sys.executable, "-m", "snakemake", *args, "-s", str(ROOT / "Snakefile"), "-d", str(workdir),
                    "--quiet", "all"], check=True)
    return time.monotonic() - start


def main() -> int:
    from sds.storage.safetensors import load_tensors

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir")
    ap.add_argument("--configfile", default=str(ROOT / "config" / "config.yaml"))
    ap.add_argument("--method", default="sparsegpt")
    ap.add_argument("--pattern", default="2of4")
    ap.add_argument("--jobs", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="sds-lp-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    cfg = yaml.safe_load(Path(args.configfile).read_text())
    single_cfg, parallel_cfg = work / "single.yaml", work / "parallel.yaml"
    single_cfg.write_text(yaml.safe_dump(cfg))
    parallel_cfg.write_text(yaml.safe_dump({**cfg, "layer_parallel": True}))
    recon = next(iter(cfg.get("reconstruct", {"default": {}})))
    target = f"results/{cfg['run']}/{args.method}/{args.pattern}/{recon}/reconstruct"
    t = snakemake(work, target, "--cores", "2", "--configfile", str(single_cfg))
    print(f"single-job pipeline up to {target}: {t:.1f} s (cached after the first call)")
    single = load_tensors(work / target / "weights.safetensors")

    layers = len({k.split(".layers.")[1].split(".")[0] for k in single})
    print(f"\n{layers} decoder layers; layer-parallel reconstruction re-run (reconstruct_layer × {layers} + gather)")
    print(f"{'jobs':>5s} {'wall s':>8s} {'max |Δw| vs single job':>24s}")
    for jobs in args.jobs:
        t = snakemake(work, target, "--cores", str(jobs), "--forcerun", "reconstruct_layer", "--configfile",
                      str(parallel_cfg))
        parallel = load_tensors(work / target / "weights.safetensors")
        diff = max(float((parallel[k] - single[k]).abs().max()) for k in single)
        print(f"{jobs:5d} {t:8.1f} {diff:24.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
