"""Fixed cost of a stage process: every stage run on a tiny model (2 layers, hidden 32, 2 × 32 calibration
tokens), where the work itself takes milliseconds, so each stage's wall time is what it pays before (and
around) its work: interpreter start, imports, config validation, model loading, writing its record.

    .venv/bin/python bench/startup_bench.py [--repeat 3]

Prints per stage the median wall seconds over the repeats, beside a bare `python -c "import torch"` (the
floor every stage pays) — target: ≤ 3 s per stage process on this 2-core machine.
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
from scale_bench import run_pipeline  # noqa: E402

TINY = dict(arch="opt", layers=2, hidden=32, ffn=64, heads=2, vocab=300, positions=64)


def bare_seconds(code: str) -> float:
    start = time.monotonic()
    subprocess.run([sys.executable, "-c", code], check=True)
    return time.monotonic() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--arch", choices=["opt", "llama"], default="opt")
    args = ap.parse_args()
    shape = dict(TINY, arch=args.arch)
    seconds: dict[str, list[float]] = {}
    floor = []
    for r in range(args.repeat):
        floor.append(bare_seconds("import torch"))
        with tempfile.TemporaryDirectory(prefix="sds-startup-") as work:
            for row in run_pipeline(shape, 2, 32, "sparsegpt", "2:4", Path(work), threads=1,
                                    overrides={"reconstruct": {"default": {"steps": 2}}}):
                seconds.setdefault(row["stage"], []).append(row["seconds"])
    print(f"\nstage process wall time on a tiny {args.arch} model (median of {args.repeat}); target ≤ 3 s")
    print(f"{'python -c import torch':24s} {statistics.median(floor):6.2f} s")
    for stage, values in seconds.items():
        print(f"{stage:24s} {statistics.median(values):6.2f} s")
    worst = max(statistics.median(v) for v in seconds.values())
    print(f"worst stage {worst:.2f} s ({'meets' if worst <= 3 else 'misses'} the 3 s target)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
