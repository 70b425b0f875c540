"""Activation-cache benchmark: the Parquet settings behind `activations.*`, and what cache I/O costs a stage.

    .venv/bin/python bench/cache_bench.py                       # read/write rates, 128 × 2048 × 768, ~3 min
    .venv/bin/python bench/cache_bench.py --nsamples 16 --quick # the default setting only
    .venv/bin/python bench/cache_bench.py --cache-file results/default/activations/dense/layer_001.parquet
    .venv/bin/python bench/cache_bench.py --stage-share --nsamples 128 --seqlen 2048 --layers 2   # ~40 min

Rates: for each setting (dtype, compression, row-group size) it writes one layer's cache with
ParquetTensorWriter, then reads it back with iter_parquet_tensors (through pyarrow, XXH3 verification on,
as the stages read) and, for scale, with a plain sequential read of the same file (8 MiB reads into one
buffer), cold (the file's pages dropped from the page cache first) and warm; the write rate (checksum
included) is shown beside a plain write of the same tensor bytes. Rates are tensor bytes per second;
"vs plain" is the cache read rate over the plain read rate.

Stage share (--stage-share): runs calibration, layer_inputs, prune1, reconstruct and prune2 (and, with
--dense-cache, activations) on a random model of the OPT-125M shape (bench/scale_bench.py's), each stage
its own process as Snakemake runs it, with the Parquet cache I/O timed inside the process: reading
(iter_parquet_tensors: file reads, Arrow decoding, the checksum wait) on the stream's reading thread, the
time the stage waits for its next batch, writing (ParquetTensorWriter: copying rows in, encoding, writing,
the checksum) and the checksum thread's CPU time. The share is (wait + write) over the stage's own time.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

from sds.storage.parquet import ParquetTensorWriter, iter_parquet_tensors  # noqa: E402


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


def plain_write(path: Path, rows, dtype) -> float:
    """The same tensor bytes written with plain file writes (converted to the cache dtype, as the writer does)."""
    start = time.perf_counter()
    with open(path, "wb") as fh:
        for r in rows:
            fh.write(memoryview(r.to(dtype).view(torch.uint8).numpy()))
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


def write_earlier_layout(path: Path, rows, dtype, row_group: int) -> None:
    """A cache as versions before this one wrote it (large_binary column), for the read comparison."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sds.storage.checksums import write_checksum

    meta = {b"sds.shape": json.dumps(list(rows[0].shape)).encode(), b"sds.dtype": str(dtype).encode()}
    schema = pa.schema([("hidden", pa.large_binary())], metadata=meta)
    with pq.ParquetWriter(str(path), schema, compression="none", use_dictionary=False,
                          write_statistics=False) as writer:
        for i in range(0, len(rows), row_group):
            values = [r.to(dtype).view(torch.uint8).numpy().tobytes() for r in rows[i:i + row_group]]
            writer.write_table(pa.table({"hidden": pa.array(values, type=pa.large_binary())}, schema=schema),
                               row_group_size=row_group)
    write_checksum(path)


def measure(path: Path, rows, dtype, compression, row_group, layout="fixed") -> dict:
    start = time.perf_counter()
    if layout == "fixed":
        with ParquetTensorWriter(path, dtype=dtype, row_group_size=row_group, compression=compression) as w:
            for r in rows:
                w.append(r)
    else:
        write_earlier_layout(path, rows, dtype, row_group)
    write_s = time.perf_counter() - start
    size = path.stat().st_size
    tensor_bytes = sum(r.numel() for r in rows) * torch.empty((), dtype=dtype).element_size()
    plain = path.with_name(path.name + ".plain")
    plain_s = plain_write(plain, rows, dtype)
    plain.unlink()
    out = {"write_s": write_s, "mib": size / 2**20, "write_gbs": tensor_bytes / write_s / 1e9,
           "plain_write_gbs": tensor_bytes / plain_s / 1e9}
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


def rates(args) -> int:
    if args.cache_file:
        rows = [t.clone() for t in iter_parquet_tensors(args.cache_file)]
    else:
        rows = list(synthetic_hidden(args.nsamples, args.seqlen, args.hidden))
    shape = tuple(rows[0].shape)
    settings = [("float16", "none", 8, "fixed")] if args.quick else [
        ("float16", "none", 1, "fixed"), ("float16", "none", 8, "fixed"), ("float16", "none", 32, "fixed"),
        ("float16", "none", 8, "large_binary"),
        ("float16", "lz4", 8, "fixed"), ("float16", "snappy", 8, "fixed"), ("float16", "zstd", 8, "fixed"),
        ("bfloat16", "none", 8, "fixed"), ("float32", "none", 8, "fixed")]
    print(f"{len(rows)} tensors of {shape}; {torch.get_num_threads()} threads; read through pyarrow with "
          "XXH3 verification; rates in GB/s of tensor bytes")
    print(f"{'dtype':9s} {'compr.':7s} {'rows/rg':>7s} {'column':12s} {'MiB':>7s} {'write':>6s} {'plain':>6s} "
          f"{'cold':>6s} {'plain':>6s} {'vs plain':>8s} {'warm':>6s} {'plain':>6s} {'vs plain':>8s}")
    with tempfile.TemporaryDirectory(prefix="sds-cache-bench-", dir=ROOT / "bench") as tmp:
        for dtype, compression, rg, layout in settings:
            path = Path(tmp) / f"{dtype}_{compression}_{rg}_{layout}.parquet"
            r = measure(path, rows, getattr(torch, dtype), compression, rg, layout)
            column = "fixed_size" if layout == "fixed" else "large_binary"
            print(f"{dtype:9s} {compression:7s} {rg:7d} {column:12s} {r['mib']:7.0f} {r['write_gbs']:6.2f} "
                  f"{r['plain_write_gbs']:6.2f} "
                  f"{r['cold_pq_gbs']:6.2f} {r['cold_plain_gbs']:6.2f} {r['cold_ratio']:8.2f} "
                  f"{r['warm_pq_gbs']:6.2f} {r['warm_plain_gbs']:6.2f} {r['warm_ratio']:8.2f}", flush=True)
            path.unlink()
            path.with_name(path.name + ".xxh3").unlink()
    return 0


# --- cache-I/O share of each stage -------------------------------------------------------------------------

# Runs one stage through the CLI with the cache I/O of sds.storage and sds.model.streams wrapped in timers (this
# process only). Stages read their streams on a background thread (sds.model.streams.read_batches prefetches), so
# reading is timed twice: in the reading thread ("read s", overlapped with compute) and as the time the
# stage waits for the next batch ("wait s", on its critical path). Writes happen on the stage's thread.
RUNNER = r"""
import json, sys, time
import sds.storage.checksums as checksums
import sds.storage.parquet as parquet
import sds.model.passes as passes
import sds.model.streams as streams
acc = {"read_s": 0.0, "read_bytes": 0, "wait_s": 0.0, "write_s": 0.0, "write_bytes": 0, "hash_cpu_s": 0.0}
def timed(generator, key, count=None):
    while True:
        start = time.perf_counter()
        try:
            item = next(generator)
        except StopIteration:
            acc[key] += time.perf_counter() - start
            return
        acc[key] += time.perf_counter() - start
        if count:
            acc[count] += item.numel() * item.element_size()
        yield item
read, batches = streams.iter_parquet_tensors, streams.read_batches
streams.iter_parquet_tensors = lambda *a, **k: timed(read(*a, **k), "read_s", "read_bytes")
streams.read_batches = passes.read_batches = lambda *a, **k: timed(batches(*a, **k), "wait_s")
append, close = parquet.ParquetTensorWriter.append, parquet.ParquetTensorWriter.close
def timed_append(self, tensor):
    start = time.perf_counter()
    append(self, tensor)
    acc["write_s"] += time.perf_counter() - start
    acc["write_bytes"] += tensor.numel() * self.dtype.itemsize
def timed_close(self):
    start = time.perf_counter()
    close(self)
    acc["write_s"] += time.perf_counter() - start
parquet.ParquetTensorWriter.append, parquet.ParquetTensorWriter.close = timed_append, timed_close
digest = checksums.BackgroundChecksum._run
def timed_digest(self):
    start = time.thread_time()
    digest(self)
    acc["hash_cpu_s"] += time.thread_time() - start
checksums.BackgroundChecksum._run = timed_digest
from sds.cli import main
start = time.perf_counter()
rc = main(sys.argv[1:])
acc["stage_s"] = time.perf_counter() - start
print("CACHE_IO " + json.dumps(acc), file=sys.stderr)
sys.exit(rc)
"""

HEADER = (f"{'stage':12s} {'wall s':>8s} {'stage s':>8s} {'read s':>7s} {'read GB':>7s} {'wait s':>7s} "
          f"{'write s':>7s} {'wr. GB':>7s} {'hash s':>7s} {'share':>7s}")


def _row_line(name: str, wall: float, acc: dict) -> str:
    """share = (waiting for reads + writing) / the stage's time: the cache I/O on the stage's critical path."""
    blocking = acc["wait_s"] + acc["write_s"]
    return (f"{name:12s} {wall:8.1f} {acc['stage_s']:8.1f} {acc['read_s']:7.1f} {acc['read_bytes'] / 1e9:7.2f} "
            f"{acc['wait_s']:7.1f} {acc['write_s']:7.1f} {acc['write_bytes'] / 1e9:7.2f} {acc['hash_cpu_s']:7.1f} "
            f"{100 * blocking / acc['stage_s']:6.1f}%")


def run_stage(config: Path, name: str, out: Path, **kw) -> dict:
    args = [sys.executable, "-c", RUNNER, name, "--config", str(config), *[f"{k}={v}" for k, v in kw.items()],
            f"out={out}"]
    start = time.monotonic()
    proc = subprocess.run(args, capture_output=True, text=True, cwd=out.parent,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src"), "MLFLOW_TRACKING_URI": ""})
    wall = time.monotonic() - start
    (out.parent / f"{out.name}.log").write_text(proc.stderr)
    if proc.returncode:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
    acc = json.loads(next(l for l in proc.stderr.splitlines() if l.startswith("CACHE_IO "))[len("CACHE_IO "):])
    print(_row_line(name, wall, acc), flush=True)
    return {"stage": name, "wall_s": wall, **acc}


def stage_share(args) -> int:
    from scale_bench import SHAPES, make_model, make_text

    from sds.core.config import validate_config

    shape = dict(SHAPES["opt-125m"], layers=args.layers)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="sds-cache-share-"))
    work.mkdir(parents=True, exist_ok=True)
    model, text = work / "model", work / "calib.txt"
    if not model.exists():
        make_model(model, shape)
    make_text(text, max(args.nsamples * args.seqlen * 2, 50_000), shape["vocab"])
    cfg = validate_config({"run": "bench", "threads": 2, "model": {"source": str(model)},
                           "calibration": {"source": str(text), "nsamples": args.nsamples, "seqlen": args.seqlen},
                           "evaluate": {"datasets": {"calib": str(text)}, "seqlen": args.seqlen, "max_windows": 4,
                                        "zeroshot": {"enabled": False}},
                           "prune": {"methods": ["sparsegpt"], "patterns": ["2:4"]}, "mlflow": {"enabled": False}})
    cfg_path = work / "config.json"
    cfg_path.write_text(json.dumps(cfg))
    print(f"OPT-125M shape, {shape['layers']} layers, {args.nsamples} × {args.seqlen} tokens, SparseGPT 2:4, default "
          f"settings (row groups of {cfg['activations']['row_group_size']}, forward batches "
          f"{cfg['forward_batch']}); 2 threads; {work}")
    print(HEADER, flush=True)
    calib, inputs = work / "calibration.parquet", work / "input"
    p1, rec, sds = work / "prune1", work / "reconstruct", work / "sds"
    rows = [run_stage(cfg_path, "calibration", calib, model_dir=model),
            run_stage(cfg_path, "layer_inputs", inputs, model_dir=model, calibration_file=calib)]
    if args.dense_cache:  # only the settings that fit to the dense model's own hidden states run it
        rows.append(run_stage(cfg_path, "activations", work / "dense", model_dir=model, calibration_file=calib))
    common = dict(model_dir=model, inputs_dir=inputs)
    rows += [run_stage(cfg_path, "prune1", p1, method="sparsegpt", pattern="2of4", cache_stream="false", **common),
             run_stage(cfg_path, "reconstruct", rec, prune1_dir=p1, recon="default", **common),
             run_stage(cfg_path, "prune2", sds, prune1_dir=p1, reconstruct_dir=rec, method="sparsegpt",
                       pattern="2of4", recon="default", **common)]
    total = {k: sum(r[k] for r in rows) for k in ("stage_s", "read_s", "read_bytes", "wait_s", "write_s",
                                                  "write_bytes", "hash_cpu_s")}
    print(_row_line("all stages", sum(r["wall_s"] for r in rows), total))
    print(f"cache read rate (reading thread) {total['read_bytes'] / max(total['read_s'], 1e-9) / 1e9:.2f} GB/s, "
          f"write rate {total['write_bytes'] / max(total['write_s'], 1e-9) / 1e9:.2f} GB/s (tensor bytes; reads "
          "include decoding and checksum waits, writes the checksum)")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--cache-file", help="re-encode this existing activation cache instead of synthetic data")
    ap.add_argument("--quick", action="store_true", help="only the chosen default setting")
    ap.add_argument("--stage-share", action="store_true", help="cache-I/O share of each stage (OPT-125M shape)")
    ap.add_argument("--layers", type=int, default=2, help="with --stage-share: decoder layers of the model")
    ap.add_argument("--workdir", help="with --stage-share: where the stages write (default: a new temp folder)")
    ap.add_argument("--dense-cache", action="store_true",
                    help="with --stage-share: also the dense activation cache (settings that fit to the dense stream)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    return stage_share(args) if args.stage_share else rates(args)


if __name__ == "__main__":
    sys.exit(main())
