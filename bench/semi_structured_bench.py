"""What a 2:4 SDS checkpoint gains from a sparse kernel: every decoder linear of the checkpoint whose weight
holds the 2:4 pattern, multiplied by a batch of tokens as a dense matmul (what the exported dense-with-zeros
folder runs) and as PyTorch's semi-structured sparse matmul (`torch.sparse.to_sparse_semi_structured`),
timed with CUDA events; prints the speed-up per weight shape and over all of them. The outputs are compared
too (the same products up to fp16/bf16 rounding). Needs CUDA with compute capability 8.0 or newer; elsewhere
it prints why it skipped and exits 0.

    .venv/bin/python bench/semi_structured_bench.py results/<run>/<method>/2of4/<recon>/sds/model
    .venv/bin/python bench/semi_structured_bench.py <folder or .safetensors> --tokens 4096 --dtype bfloat16
    .venv/bin/python bench/semi_structured_bench.py <…> --backend cutlass       # instead of cuSPARSELt

Not measured in this repository (no GPU was available); docs/serving.md quotes the SDS paper's figures.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def linear_weights(path: Path):
    """(name, tensor) of every 2-D `.weight` of a decoder layer (names with `.layers.<i>.`) in a model folder's
    safetensors files or in one safetensors file (a stage checkpoint's weights.safetensors)."""
    import re

    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    if not files:
        raise SystemExit(f"{path}: no .safetensors file")
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for name in fh.keys():
                if re.search(r"\.layers\.\d+\.", name) and name.endswith(".weight"):
                    tensor = fh.get_tensor(name)
                    if tensor.dim() == 2:
                        yield name, tensor


def is_two_four(W) -> bool:
    """At most 2 non-zeros in every group of 4 consecutive inputs of every row."""
    rows, cols = W.shape
    return cols % 4 == 0 and bool(((W.reshape(rows, cols // 4, 4) != 0).sum(-1) <= 2).all())


def timed_ms(fn, repeat: int) -> float:
    import torch

    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeat):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeat


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", nargs="?", type=Path, help="a 2:4 checkpoint: model folder or .safetensors")
    parser.add_argument("--tokens", type=int, default=2048, help="rows of the input batch (batch × sequence)")
    parser.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16")
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--backend", choices=["cusparselt", "cutlass"], default="cusparselt",
                        help="semi-structured backend (cuSPARSELt falls back to CUTLASS where it is missing)")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("skipped: no CUDA device; 2:4 semi-structured kernels need a CUDA GPU of compute capability 8.0+")
        return 0
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        print(f"skipped: {torch.cuda.get_device_name()} is sm{major}{minor}; semi-structured sparsity needs sm80+")
        return 0
    if args.checkpoint is None:
        parser.error("give a 2:4 checkpoint (an SDS model folder or a weights.safetensors)")
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    SparseSemiStructuredTensor._FORCE_CUTLASS = args.backend == "cutlass"
    dtype = getattr(torch, args.dtype)
    per_shape: dict[tuple[int, int], list[tuple[float, float]]] = {}
    skipped = []
    worst = 0.0
    for name, W in linear_weights(args.checkpoint):
        if not is_two_four(W):
            skipped.append(f"{name}: not 2:4")
            continue
        W = W.to("cuda", dtype).contiguous()
        x = torch.randn(args.tokens, W.shape[1], device="cuda", dtype=dtype)
        try:
            sparse = to_sparse_semi_structured(W)
        except RuntimeError as exc:  # shape or dtype the kernels do not take
            skipped.append(f"{name}: {str(exc).splitlines()[0]}")
            continue
        dense_out, sparse_out = torch.nn.functional.linear(x, W), torch.nn.functional.linear(x, sparse)
        worst = max(worst, float((dense_out - sparse_out).abs().max() / dense_out.abs().max().clamp_min(1e-6)))
        times = (timed_ms(lambda: torch.nn.functional.linear(x, W), args.repeat),
                 timed_ms(lambda: torch.nn.functional.linear(x, sparse), args.repeat))
        per_shape.setdefault(tuple(W.shape), []).append(times)
    device = torch.cuda.get_device_name()
    print(f"{device} (sm{major}{minor}), torch {torch.__version__}, {args.dtype}, {args.tokens} tokens, "
          f"backend {args.backend}")
    if not per_shape:
        print("no 2:4 linear the kernels take:", *skipped[:5], sep="\n  ")
        return 1
    print(f"{'weight shape':>14} {'linears':>8} {'dense ms':>9} {'2:4 ms':>9} {'speed-up':>9}")
    for shape, runs in sorted(per_shape.items()):
        d, s = sum(t[0] for t in runs), sum(t[1] for t in runs)
        print(f"{shape[0]:>6} x {shape[1]:<6}{len(runs):>8} {d:>9.3f} {s:>9.3f} {d / s:>8.2f}x")
    dense = sum(t[0] for runs in per_shape.values() for t in runs)
    sparse = sum(t[1] for runs in per_shape.values() for t in runs)
    print(f"all {sum(map(len, per_shape.values()))} linears: dense {dense:.3f} ms, 2:4 {sparse:.3f} ms, "
          f"speed-up {dense / sparse:.2f}x; largest output difference {worst:.2e} of the output's range")
    if skipped:
        print(f"skipped {len(skipped)} linears, e.g. {skipped[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
