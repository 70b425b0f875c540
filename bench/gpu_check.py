"""The CUDA path, measured: the OPT-125M-shaped random model at the paper's 128 × 2048 calibration tokens
through every stage on the GPU (each stage its own process, as Snakemake runs it), printing per-stage
seconds, peak GPU memory (torch.cuda.max_memory_allocated) and peak host RSS, and the SDS run against the
one-shot run (calibration + layer inputs + prune1: the same stages a SparseGPT-only run executes).

    .venv/bin/python bench/gpu_check.py                      # on a CUDA machine (targets: SDS ≤ 180 s,
                                                             #  peak GPU ≤ 12 GiB, SDS ≤ 3× one-shot)
    .venv/bin/python bench/gpu_check.py --device cpu --layers 1 --nsamples 4 --seqlen 256   # smoke test, no GPU

Every solve runs in float32 with TF32 off (sds.runtime.setup), so GPU numbers match the CPU's up to
summation order.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale_bench import SHAPES, run_pipeline  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--layers", type=int, help="override the depth (default: OPT-125M's 12)")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--method", default="sparsegpt")
    ap.add_argument("--pattern", default="2:4")
    ap.add_argument("--threads", type=int, default=8, help="CPU threads per stage (host-side work)")
    ap.add_argument("--workdir")
    args = ap.parse_args()
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False); nothing measured")
        return 2
    card = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU"
    shape = dict(SHAPES["opt-125m"])
    if args.layers:
        shape["layers"] = args.layers
    work = Path(args.workdir or tempfile.mkdtemp(prefix="sds-gpu-"))
    print(f"{card}: OPT-125M shape ({shape['layers']} layers), {args.method} {args.pattern}, "
          f"{args.nsamples} × {args.seqlen} calibration tokens, torch {torch.__version__}", flush=True)
    rows = run_pipeline(shape, args.nsamples, args.seqlen, args.method, args.pattern, work, threads=args.threads,
                        overrides={"device": args.device})
    print(f"\n{'stage':14s} {'seconds':>9s} {'peak GPU MiB':>13s} {'peak RSS MiB':>13s}")
    for r in rows:
        gpu = f"{r['peak_gpu_mib']:13.0f}" if r["peak_gpu_mib"] is not None else f"{'-':>13s}"
        print(f"{r['stage']:14s} {r['seconds']:9.1f} {gpu} {r['peak_rss_mib']:13.0f}")
    total = sum(r["seconds"] for r in rows)
    one_shot = sum(r["seconds"] for r in rows if r["stage"] in ("calibration", "layer_inputs", "prune1"))
    gpu_peak = max((r["peak_gpu_mib"] or 0) for r in rows)
    print(f"\nSDS {total:.1f} s (target ≤ 180 s on an H100-class GPU), one-shot {one_shot:.1f} s, "
          f"ratio {total / one_shot:.2f} (target ≤ 3); peak GPU {gpu_peak / 1024:.2f} GiB (target ≤ 12 GiB); "
          f"peak host RSS {max(r['peak_rss_mib'] for r in rows):.0f} MiB  [{card}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
