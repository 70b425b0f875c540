"""The one-shot path against the reference SparseGPT code, side by side on one machine: the OPT-125M-shaped
random model and the same calibration windows, SparseGPT 2:4, each pipeline from process start to pruned
model. Also the whole SDS run against our one-shot run.

    git clone /path/to/IST-DASLab/sparsegpt /tmp/ref-sparsegpt      # a local checkout; nothing is copied
    .venv/bin/python bench/reference_bench.py --reference-sparsegpt /tmp/ref-sparsegpt --nsamples 16 --seqlen 512 --repeat 3
    .venv/bin/python bench/reference_bench.py --reference-sparsegpt /tmp/ref-sparsegpt --nsamples 128 --seqlen 2048 --layers 2
    .venv/bin/python bench/reference_bench.py --reference-sparsegpt /tmp/ref-sparsegpt --nsamples 128 --seqlen 2048 --one-shot-only

Ours: `calibration`, `layer_inputs` and `prune1` as Snakemake runs them (three processes, each loading what
it needs; prune1 writes its checkpoint and the statistics reconstruction reuses), then `reconstruct` and
`prune2` for SDS. The reference: one process that imports its `opt.py`, loads the model folder, tokenizes
the same calibration text, and runs its `opt_sequential` (batch-1 forwards, every activation in memory) on
our calibration windows, with the same threads.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale_bench import SHAPES, run_pipeline  # noqa: E402

# Runs the reference's own sequential SparseGPT loop (its opt.py) on the given model folder and windows.
REFERENCE_DRIVER = r"""
import sys, time, types
start = time.monotonic()
ref, model_dir, calib, text, threads, n, m = sys.argv[1:8]
sys.path.insert(0, ref)
sys.modules.setdefault("wandb", None)
import torch
torch.set_num_threads(int(threads))
if not torch.cuda.is_available():  # its fasterprune calls torch.cuda.synchronize() for its own timing
    torch.cuda.synchronize = lambda *a, **k: None
import pyarrow.parquet as pq
import opt
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(model_dir)
tok(open(text).read(), return_tensors="pt")                      # the reference tokenizes its calibration text
windows = torch.tensor(pq.read_table(calib).column("input_ids").to_pylist(), dtype=torch.long)
model = opt.get_opt(model_dir)
model.eval()
model.seqlen = windows.shape[1]
opt.args = types.SimpleNamespace(nsamples=windows.shape[0], sparsity=0.5, prunen=int(n), prunem=int(m),
                                 blocksize=128, percdamp=0.01, minlayer=-1, maxlayer=1000, prune_only="",
                                 invert=False, wbits=16)
opt.opt_sequential(model, [(w.unsqueeze(0), None) for w in windows], "cpu")
print("REFERENCE_SECONDS", time.monotonic() - start)
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference-sparsegpt", required=True, help="a local checkout of IST-DASLab/sparsegpt")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--layers", type=int, help="override OPT-125M's 12 decoder layers")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1,
                    help="one-shot runs of ours and of the reference each, alternating; medians are compared")
    ap.add_argument("--one-shot-only", action="store_true", help="skip our reconstruct and prune2 (no SDS ratio)")
    ap.add_argument("--workdir")
    args = ap.parse_args()
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    shape = dict(SHAPES["opt-125m"], positions=max(2048, args.seqlen))
    if args.layers:
        shape["layers"] = args.layers
    work = Path(args.workdir or tempfile.mkdtemp(prefix="sds-ref-"))
    print(f"OPT-125M shape ({shape['layers']} layers), SparseGPT 2:4, {args.nsamples} × {args.seqlen} tokens, "
          f"{args.threads} threads", flush=True)
    rows = run_pipeline(shape, args.nsamples, args.seqlen, "sparsegpt", "2:4", work, sds=not args.one_shot_only,
                        threads=args.threads)
    seconds = {r["stage"]: r["seconds"] for r in rows}
    one_shot = seconds["calibration"] + seconds["layer_inputs"] + seconds["prune1"]
    sds = sum(seconds.values())

    # The one-shot comparison is repeated (--repeat), ours and the reference alternating, each in a fresh
    # process: single wall times on a shared machine vary by ±10 %, the median pair is the figure.
    one_shots, references = [one_shot], []
    for r in range(args.repeat):
        try:
            references.append(run_reference(args, work))
        except RuntimeError as exc:
            print(exc)
            return 1
        print(f"  reference SparseGPT, run {r + 1}: {references[-1]:.1f} s", flush=True)
        if r + 1 < args.repeat:
            again = work / f"repeat{r + 1}"
            again.mkdir()
            (again / "model").symlink_to(work / "model")
            rows = run_pipeline(shape, args.nsamples, args.seqlen, "sparsegpt", "2:4", again, sds=False,
                                threads=args.threads)
            one_shots.append(sum(row["seconds"] for row in rows))
            print(f"  ours, one-shot, run {r + 2}: {one_shots[-1]:.1f} s", flush=True)
    first_one_shot = one_shot  # the run the SDS stages continued
    one_shot, reference = statistics.median(one_shots), statistics.median(references)

    print(f"\n{'run':32s} {'seconds':>9s}")
    for stage in ("calibration", "layer_inputs", "prune1"):
        print(f"  ours: {stage:26s} {seconds[stage]:9.1f}")
    print(f"{'ours, one-shot (3 processes)':32s} {one_shot:9.1f}" + _spread(one_shots))
    print(f"{'reference SparseGPT (1 process)':32s} {reference:9.1f}" + _spread(references))
    sds_ratio = ""
    if not args.one_shot_only:
        for stage in ("reconstruct", "prune2"):
            print(f"  ours: {stage:26s} {seconds[stage]:9.1f}")
        print(f"{'ours, whole SDS':32s} {sds:9.1f}")
        sds_ratio = f"; SDS / one-shot {sds / first_one_shot:.2f} (target ≤ 3)"
    print(f"\none-shot / reference {one_shot / reference:.2f} (target ≤ 1.0){sds_ratio}"
          + (f"; medians of {args.repeat} runs each" if args.repeat > 1 else ""))
    return 0


def _spread(values: list[float]) -> str:
    return f"   (median of {', '.join(f'{v:.1f}' for v in values)})" if len(values) > 1 else ""


def run_reference(args, work: Path) -> float:
    """Wall seconds of the reference's one-shot run on the model and windows in `work`."""
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", REFERENCE_DRIVER, args.reference_sparsegpt, str(work / "model"),
                           str(work / "calibration.parquet"), str(work / "calib.txt"), str(args.threads), "2", "4"],
                          capture_output=True, text=True)
    seconds = time.monotonic() - start
    if proc.returncode:
        raise RuntimeError(f"the reference failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return seconds

if __name__ == "__main__":
    sys.exit(main())
