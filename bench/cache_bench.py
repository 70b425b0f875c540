"""Activation-cache format benchmark: the Parquet settings behind `activations.*`, chosen by measurement.

    .venv/bin/python bench/cache_bench.py                       # 128 × 2048 × 768 (OPT-125M layer), ~3 min
    .venv/bin/python bench/cache_bench.py --nsamples 16         # quicker
    .venv/bin/python bench/cache_bench.py --cache-file results/default/activations/dense/layer_001.parquet

For each setting (dtype, compression, row-group size) it writes one layer's cache with ParquetTensorWriter,
then reads it back with iter_parquet_tensors (XXH3 verification on, as the stages read) and compares
with a plain sequential read of the same file (8 MiB reads into one buffer). Both reads are timed cold
(the file's pages dropped from the page cache with posix_fadvise first) and warm. The rate column is
tensor bytes delivered per second; "vs plain" is the Parquet read rate over the plain read rate.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from sds.io import ParquetTensorWriter, iter_parquet_tensors  # noqa: E402


def drop_from_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def plain_read(path: Path) -> float:
    buf = bytearray(8 << 20)
    view = memoryview(buf)
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as fh:
        while fh.readinto(view):
            pass
    return time.perf_counter() - start


def parquet_read(path: Path) -> tuple[float, int]:
    start = time.perf_counter()
    total = 0
    for t in iter_parquet_tensors(path):
        total += t.numel() * t.element_size()
    return time.perf_counter() - start, total


def synthetic_hidden(nsamples: int, seqlen: int, hidden: int, seed: int = 0):
    """Hidden states shaped like a decoder's: Gaussian tokens with log-normal channel scales and a few
    outlier channels (real LLM activations have them); the fp16 mantissas are what dominate size."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.exp(torch.randn(hidden, generator=g) * 0.5)
    scale[torch.randperm(hidden, generator=g)[:4]] *= 30
    for _ in range(nsamples):
        yield torch.randn(seqlen, hidden, generator=g) * scale


def measure(path: Path, rows, dtype, compression, row_group) -> dict:
    start = time.perf_counter()
    with ParquetTensorWriter(path, dtype=dtype, row_group_size=row_group, compression=compression) as w:
        for r in rows:
            w.append(r)
    write_s = time.perf_counter() - start
    size = path.stat().st_size
    out = {"write_s": write_s, "mib": size / 2**20}
    for mode in ("cold", "warm"):
        if mode == "cold":
            drop_from_page_cache(path)
        plain = plain_read(path)
        if mode == "cold":
            drop_from_page_cache(path)
        pq_s, tensor_bytes = parquet_read(path)
        out[f"{mode}_plain_gbs"] = size / plain / 1e9
        out[f"{mode}_pq_gbs"] = tensor_bytes / pq_s / 1e9
        out[f"{mode}_ratio"] = (tensor_bytes / pq_s) / (size / plain)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--cache-file", help="re-encode this existing activation cache instead of synthetic data")
    ap.add_argument("--quick", action="store_true", help="only the chosen default setting")
    args = ap.parse_args()
    torch.set_num_threads(2)
    if args.cache_file:
        rows = list(iter_parquet_tensors(args.cache_file))
    else:
        rows = list(synthetic_hidden(args.nsamples, args.seqlen, args.hidden))
    shape = tuple(rows[0].shape)
    settings = [("float16", "none", 8)] if args.quick else [
        ("float16", "none", 1), ("float16", "none", 8), ("float16", "none", 32),
        ("float16", "lz4", 8), ("float16", "snappy", 8), ("float16", "zstd", 8),
        ("bfloat16", "none", 8), ("float32", "none", 8)]
    print(f"{len(rows)} tensors of {shape}; {torch.get_num_threads()} threads")
    print(f"{'dtype':9s} {'compr.':7s} {'rows/rg':>7s} {'MiB':>7s} {'write s':>8s} "
          f"{'cold GB/s':>9s} {'plain':>6s} {'vs plain':>8s} {'warm GB/s':>9s} {'plain':>6s} {'vs plain':>8s}")
    with tempfile.TemporaryDirectory(prefix="sds-cache-bench-", dir=ROOT / "bench") as tmp:
        for dtype, compression, rg in settings:
            path = Path(tmp) / f"{dtype}_{compression}_{rg}.parquet"
            r = measure(path, rows, getattr(torch, dtype), compression, rg)
            print(f"{dtype:9s} {compression:7s} {rg:7d} {r['mib']:7.0f} {r['write_s']:8.2f} "
                  f"{r['cold_pq_gbs']:9.2f} {r['cold_plain_gbs']:6.2f} {r['cold_ratio']:8.2f} "
                  f"{r['warm_pq_gbs']:9.2f} {r['warm_plain_gbs']:6.2f} {r['warm_ratio']:8.2f}", flush=True)
            path.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
