"""The CUDA path, measured: the OPT-125M-shaped random model at the paper's 128 × 2048 calibration tokens
through every stage on the GPU (each stage its own process, as Snakemake runs it), printing per-stage
seconds, peak GPU memory (torch.cuda.max_memory_allocated) and peak host RSS, and the SDS run against the
one-shot run (calibration + layer inputs + prune1: the same stages a SparseGPT-only run executes).

    .venv/bin/python bench/gpu_check.py                      # on a CUDA machine (targets: SDS ≤ 180 s,
                                                             #  peak GPU ≤ 12 GiB, SDS ≤ 3× one-shot)
    .venv/bin/python bench/gpu_check.py --device cpu --layers 1 --nsamples 4 --seqlen 256   # smoke test, no GPU
    .venv/bin/python bench/gpu_check.py --parity             # CPU against CUDA, CUDA against itself (2 layers, 16 × 512)

Every solve runs in float32 with TF32 off (sds.core.runtime.setup), so GPU numbers match the CPU's up to
summation order.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale_bench import SHAPES, run_pipeline  # noqa: E402


def parity(work: Path, args) -> int:
    """The same small SDS run on the CPU, on the GPU and on the GPU again (one model, one calibration text).
    The two GPU runs must be bit-identical (same config, same seed, same hardware). CPU against GPU: float32
    on both with TF32 off, so only summation order differs, but SparseGPT prunes column by column and a mask
    flipped by rounding changes every later update, so masks drift apart; what must agree is the quality,
    the per-linear relative output error."""
    import torch
    from safetensors.torch import load_file
    from sds.core.patterns import parse_pattern

    shape = dict(SHAPES["opt-125m"], layers=args.parity_layers)
    slug = parse_pattern(args.pattern).slug
    runs = {}
    for run, device in (("cpu", "cpu"), ("cuda", "cuda"), ("cuda-again", "cuda")):
        print(f"parity: {run}, {shape['layers']} layers, {args.parity_nsamples} × {args.parity_seqlen}", flush=True)
        folder = work / run
        if run != "cpu":  # one model for all runs (the calibration text is made from a seed)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "model").symlink_to(work / "cpu" / "model")
        run_pipeline(shape, args.parity_nsamples, args.parity_seqlen, args.method, args.pattern, folder,
                     threads=args.threads, overrides={"device": device})
        runs[run] = folder / args.method / slug
    final = {r: runs[r] / "default" / "sds" for r in runs}
    errors = {r: json.loads((final[r] / "layers.json").read_text())["linears"] for r in runs}
    from sds.model.checkpoints import MaskReader

    def read_masks(path):  # bit-packed on disk: compared per weight, not per byte
        reader = MaskReader(path, device="cpu")
        return {k: reader[k] for k in reader.keys()}

    masks1 = {r: read_masks(runs[r] / "prune1" / "masks.safetensors") for r in runs}
    masks = {r: read_masks(final[r] / "masks.safetensors") for r in runs}
    weights = {r: load_file(final[r] / "weights.safetensors") for r in runs}
    repeat_equal = (errors["cuda"] == errors["cuda-again"] and
                    all(torch.equal(weights["cuda"][k], weights["cuda-again"][k]) for k in weights["cuda"]) and
                    all(torch.equal(masks["cuda"][k], masks["cuda-again"][k]) for k in masks["cuda"]))
    print(f"\n{'linear':48s} {'prune1 rel err CPU/GPU':>22s} {'SDS rel err CPU/GPU':>20s} "
          f"{'prune1 masks =':>14s} {'SDS masks =':>12s} {'|dW|/|W|':>9s}")
    worst_err = 0.0
    for name in sorted(errors["cpu"]):
        cpu, gpu = errors["cpu"][name], errors["cuda"][name]
        same1 = (masks1["cpu"][name] == masks1["cuda"][name]).double().mean().item()
        same = (masks["cpu"][name] == masks["cuda"][name]).double().mean().item()
        w_cpu, w_gpu = weights["cpu"][name].double(), weights["cuda"][name].double()
        dw = ((w_cpu - w_gpu).norm() / w_cpu.norm()).item()
        worst_err = max(worst_err, *(abs(gpu[k] - cpu[k]) / cpu[k] for k in ("rel_error", "rel_error_prune1")))
        print(f"{name:48s} {cpu['rel_error_prune1']:10.6f} {gpu['rel_error_prune1']:10.6f}  {cpu['rel_error']:9.6f} "
              f"{gpu['rel_error']:9.6f}  {100 * same1:13.3f}% {100 * same:11.3f}% {dw:9.3f}")
    mean = {r: sum(e["rel_error"] for e in errors[r].values()) / len(errors[r]) for r in ("cpu", "cuda")}
    print(f"\nparity [{torch.cuda.get_device_name(0)} vs CPU]: mean SDS rel. error {mean['cpu']:.6f} (CPU) vs "
          f"{mean['cuda']:.6f} (GPU); per linear within {100 * worst_err:.1f} %; two GPU runs bit-identical: "
          f"{'yes' if repeat_equal else 'NO'}")
    return 0 if repeat_equal else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="opt-125m",
                    help="the model's shape (smollm2-135m: the LLaMA path with grouped-query attention)")
    ap.add_argument("--layers", type=int, help="override the depth (default: the shape's, OPT-125M's 12)")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--method", default="sparsegpt")
    ap.add_argument("--pattern", default="2:4")
    ap.add_argument("--threads", type=int, default=8, help="CPU threads per stage (host-side work)")
    ap.add_argument("--workdir")
    ap.add_argument("--parity", action="store_true", help="compare a small run on the CPU and on the GPU instead")
    ap.add_argument("--parity-layers", type=int, default=2)
    ap.add_argument("--parity-nsamples", type=int, default=16)
    ap.add_argument("--parity-seqlen", type=int, default=512)
    args = ap.parse_args()
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False); nothing measured")
        return 2
    work = Path(args.workdir or tempfile.mkdtemp(prefix="sds-gpu-"))
    if args.parity:
        if not torch.cuda.is_available():
            print("gpu_check --parity: no CUDA device here; nothing compared")
            return 2
        return parity(work, args)
    card = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU"
    shape = dict(SHAPES[args.shape])
    if args.layers:
        shape["layers"] = args.layers
    print(f"{card}: {args.shape} shape ({shape['layers']} layers), {args.method} {args.pattern}, "
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
