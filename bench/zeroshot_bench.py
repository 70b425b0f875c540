"""Benchmark: the seconds zero-shot evaluation adds to the evaluation of the default model's checkpoints.

    .venv/bin/python bench/zeroshot_bench.py [--configfile config/config.yaml] [--model results/default/model]
                                             [--repeats 2]

Runs the evaluate stage exactly as the pipeline does (`python -m sds.cli evaluate`, one process per
checkpoint, the config's threads) on the dense model and on a 50% magnitude-pruned checkpoint, with and
without zero-shot, and prints the difference per checkpoint (process start, lm_eval import and the tasks)
and for all checkpoints of the config, serially and as `snakemake --cores 2` runs them (two evaluations
at a time when threads = 1). Target (issue 3): ≤ 120 s for all checkpoints on 2 cores.

The model: --model (default results/default/model, left by `snakemake --cores 2`); when it is missing,
the default model is built first from the config (minutes).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def stage(config_json: Path, *pairs: str) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    start = time.monotonic()
    subprocess.run([sys.executable, "-m", "sds.cli", *pairs[:1], "--config", str(config_json), *pairs[1:]],
                   check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.monotonic() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configfile", default=str(ROOT / "config" / "config.yaml"))
    ap.add_argument("--model", default=str(ROOT / "results" / "default" / "model"))
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    raw = yaml.safe_load(Path(args.configfile).read_text())
    work = Path(tempfile.mkdtemp(prefix="sds-zeroshot-bench-"))
    try:
        return measure(args, raw, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def measure(args, raw: dict, work: Path) -> int:
    from sds.core.config import validate_config
    from sds.storage.safetensors import save_tensors
    from sds.model.decoder import decoder_layers, decoder_layers_prefix, find_linears
    from sds.model.loading import load_model
    from sds.core.patterns import parse_pattern
    from sds.algorithms.dispatch import prune

    cfg = validate_config({**raw, "mlflow": {"enabled": False}})
    cfg_off = json.loads(json.dumps(cfg))
    cfg_off["evaluate"]["zeroshot"]["enabled"] = False
    on, off = work / "on.json", work / "off.json"
    on.write_text(json.dumps(cfg))
    off.write_text(json.dumps(cfg_off))

    stage(on, "corpus", f"out={work / 'corpus'}")
    model = Path(args.model)
    if not (model / "config.json").is_file():
        print(f"{model} not found: building the default model (minutes)", flush=True)
        model = work / "model"
        stage(on, "build_model", f"corpus_dir={work / 'corpus'}", f"out={model}")
    stage(on, "zeroshot_tasks", f"out={work / 'tasks'}")

    dense, _ = load_model(model)
    pattern, prefix = parse_pattern("unstructured:0.5"), decoder_layers_prefix(dense)
    save_tensors(work / "pruned.safetensors",
                 {f"{prefix}.{i}.{n}.weight": prune("magnitude", lin.weight.detach(), pattern, {})[0]
                  for i, layer in enumerate(decoder_layers(dense)) for n, lin in find_linears(layer).items()})

    checkpoints = {"dense": [], "magnitude 50%": [f"weights={work / 'pruned.safetensors'}", "stage=prune1",
                                                  "method=magnitude", "pattern=unstructured50"]}
    added, inner = [], []
    zs = cfg["evaluate"]["zeroshot"]
    print(f"model {model}; tasks {zs['tasks']} × {zs['builtin_items']} items; threads {cfg['threads']}; "
          f"load average before: {os.getloadavg()[0]:.2f}")
    print(f"{'checkpoint':16s} {'eval s (no zero-shot)':>22s} {'eval s (zero-shot)':>19s} {'added s':>8s} "
          f"{'in-stage zero-shot s':>21s}  mean acc")
    for name, extra in checkpoints.items():
        for _ in range(args.repeats):
            common = ["evaluate", f"model_dir={model}", f"corpus_dir={work / 'corpus'}", *extra]
            t_off = stage(off, *common, f"out={work / 'off_eval.json'}")
            t_on = stage(on, *common, f"tasks_dir={work / 'tasks'}", f"out={work / 'on_eval.json'}")
            zs = json.loads((work / "on_eval.json").read_text())["zeroshot"]
            added.append(t_on - t_off)
            inner.append(zs["seconds"])
            print(f"{name:16s} {t_off:22.1f} {t_on:19.1f} {t_on - t_off:8.1f} {zs['seconds']:21.1f}  "
                  f"{zs['mean']['acc']:.3f}", flush=True)

    per = statistics.median(added)
    p = cfg["prune"]
    n = 1 + len(p["methods"]) * len(p["patterns"]) * (2 + len(cfg["reconstruct"]))
    parallel = max(1, 2 // cfg["threads"])
    print(f"\nzero-shot adds {per:.1f} s per checkpoint (median of {len(added)}; {statistics.median(inner):.1f} s "
          f"of it inside the stage)")
    print(f"all {n} checkpoints of {Path(args.configfile).name}: {n * per:.1f} s serially, "
          f"{n * per / parallel:.1f} s wall with --cores 2 ({parallel} evaluation(s) at a time); target ≤ 120 s")
    print(f"load average after: {os.getloadavg()[0]:.2f} (figures assume the 2 cores are otherwise idle)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
