"""Whole-model perplexity of our `alps` / `admm` first prune against the reference solvers (mazumder-lab/ALPS
`ALPS_prune.ALPS_admm`, fmfi-compbio/admm-pruning `AdmmPruner.fasterprune`) run through the SAME pipeline:
one model, one set of calibration windows, one sequential pass, one set of test windows, one scorer.

    git --git-dir=/work/.mirror/mazumder-lab+ALPS/repo archive HEAD | tar x -C /tmp/ref-alps
    git --git-dir=/work/.mirror/fmfi-compbio+admm-pruning/repo archive HEAD | tar x -C /tmp/ref-admm
    .venv/bin/python bench/reference_pipeline_bench.py --config config/smollm2.yaml \
        --reference-alps /tmp/ref-alps --reference-admm /tmp/ref-admm --patterns 2:4 unstructured:0.5 \
        --variant "alps[inputs]:alps_damping=inputs"

Snakemake makes the run's calibration windows, cached layer inputs and dense evaluation (cached like any run).
Then every row is the `prune1` stage (`python -m sds.cli prune1`, the process the rule runs: the sequential
pass — each decoder layer pruned on the inputs the already-pruned layers before it give, its statistics
H = E[x xᵀ] accumulated by the pipeline — then a safetensors checkpoint), followed by the `evaluate` stage on
that checkpoint. The reference rows run the same stage in a process where the per-linear pruner call
(`sds.algorithms.method.prune`) is replaced by the reference's, fed the same W and H (both references and ours
normalise by diag H, so the scale of H does not matter); nothing else changes. A `--variant NAME:KEY=VALUE,…`
row is our pruner with changed `prune.*` settings. Each row also gives its checkpoint's largest
max|W| / max|W_dense| over the linears (from the stage's layers.json, the report's weight-range check). Rows write under results/<run>_refbench/ (MLflow off);
the run's own results are only read. The reference code is imported from the given checkouts (ALPS from a
temporary copy with 'cuda:0' pointed at the CPU when there is no GPU); none of it is part of the project.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent

# Runs one sds stage with the per-linear pruner of `method` replaced by a reference implementation.
DRIVER = r"""
import sys
sys.path.insert(0, BENCH)
import reference_solvers
import sds.algorithms.method as method_module
from sds.cli import main

method, checkout = sys.argv[1:3]
load = {"alps": reference_solvers.load_reference_alps, "admm": reference_solvers.load_reference_admm}[method]
reference = load(checkout)
ours = method_module.prune

def prune(name, W, pattern, settings, *, hessian=None, W_start=None):
    if name != method:
        return ours(name, W, pattern, settings, hessian=hessian, W_start=W_start)
    new_W = reference(W.float().cpu(), hessian.float().cpu(), pattern)
    if new_W is None:
        raise SystemExit(f"reference {method} has no {pattern}")
    new_W = new_W.to(device=W.device, dtype=W.dtype)
    return new_W, new_W != 0

method_module.prune = prune
sys.exit(main(sys.argv[3:]))
"""


def parse_variant(text: str) -> tuple[str, str, dict]:
    """'alps[inputs]:alps_damping=inputs,alps_percdamp=0.05' → (row name, our method, prune.* overrides)."""
    name, _, rest = text.partition(":")
    overrides = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        overrides[key] = yaml.safe_load(value)
    return name, name.split("[")[0], overrides


def stage(command: list[str], log: Path, env: dict) -> float:
    """Runs one stage process, its output to `log`; returns its wall seconds (process start included)."""
    start = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.run(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
    if proc.returncode:
        sys.exit(f"reference_pipeline_bench: {' '.join(command[:6])} … failed (exit {proc.returncode}); see {log}")
    return time.monotonic() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="a run config (YAML), e.g. config/smollm2.yaml")
    ap.add_argument("--reference-alps", help="checkout of mazumder-lab/ALPS")
    ap.add_argument("--reference-admm", help="checkout of fmfi-compbio/admm-pruning")
    ap.add_argument("--methods", nargs="+", default=["alps", "admm"], choices=["alps", "admm"])
    ap.add_argument("--patterns", nargs="+", default=["2:4", "unstructured:0.5"])
    ap.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE,…",
                    help="one more row: our pruner NAME (its part before '[') with changed prune.* settings")
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--out", help="also write the table (Markdown) here")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from sds.core.layout import RunLayout, results_root
    from sds.core.patterns import parse_pattern

    config_path = Path(args.config) if Path(args.config).is_absolute() else ROOT / args.config
    config = yaml.safe_load(config_path.read_text())
    run = config["run"]
    layout = RunLayout(run, results_root(config))  # relative to the repository root, as Snakemake's targets
    bench_dir = ROOT / layout.results / f"{run}_refbench"
    bench_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])))

    # The run's shared inputs, by its own rules (cached: nothing re-runs when they are there).
    proc = subprocess.run([sys.executable, "-m", "snakemake", layout.layer_inputs, layout.evaluation(), "--cores",
                           str(args.cores), "--configfile", str(config_path)], cwd=ROOT)
    if proc.returncode:
        sys.exit(f"reference_pipeline_bench: snakemake failed (exit {proc.returncode})")
    resolved = json.loads(subprocess.run([sys.executable, "-m", "sds.cli", "validate", str(config_path), "--print"],
                                         cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout)
    resolved["run"] = f"{run}_refbench"  # stage timing files and the like land beside the bench, not in the run
    resolved.setdefault("mlflow", {})["enabled"] = False
    resolved["evaluate"]["zeroshot"]["enabled"] = False
    builtin = resolved["model"]["source"] == "builtin"
    model_dir = layout.model if builtin else str((ROOT / resolved["model"]["source"]).resolve())
    eval_extra = [f"corpus_dir={layout.corpus}"] if builtin else []
    dense = json.loads((ROOT / layout.evaluation()).read_text())
    dataset = next(iter(dense["ppl"]))

    rows = [(m, m, {}, None) for m in args.methods]
    refs = {"alps": args.reference_alps, "admm": args.reference_admm}
    rows += [(f"ref-{m}", m, {}, refs[m]) for m in args.methods if refs[m]]
    rows += [(name, m, overrides, None) for name, m, overrides in map(parse_variant, args.variant)]
    results = {}
    for text in args.patterns:
        pattern = parse_pattern(text)
        for name, method, overrides, checkout in rows:
            cell = bench_dir / name / pattern.slug
            done = cell / "eval.json"
            if not done.is_file():
                shutil.rmtree(cell, ignore_errors=True)
                cell.mkdir(parents=True)
                cfg = json.loads(json.dumps(resolved))
                cfg["prune"].update(overrides)
                cfg_file = cell / "config.json"
                cfg_file.write_text(json.dumps(cfg, indent=1))
                python = ([sys.executable, "-c", DRIVER.replace("BENCH", repr(str(BENCH))), method, checkout]
                          if checkout else [sys.executable, "-m", "sds.cli"])
                print(f"{name} {pattern}: prune1 …", flush=True)
                seconds = stage(python + ["prune1", "--config", str(cfg_file), f"model_dir={model_dir}",
                                          f"inputs_dir={layout.layer_inputs}", f"method={method}",
                                          f"pattern={pattern.slug}", "cache_stream=false", f"out={cell / 'prune1'}"],
                                cell / "prune1.log", env)
                stage([sys.executable, "-m", "sds.cli", "evaluate", "--config", str(cfg_file), f"model_dir={model_dir}",
                       *eval_extra, f"weights={cell / 'prune1' / 'weights.safetensors'}", "stage=prune1",
                       f"method={method}", f"pattern={pattern.slug}", f"out={cell / 'eval.tmp.json'}"],
                      cell / "evaluate.log", env)
                record = json.loads((cell / "eval.tmp.json").read_text()) | {"prune1_seconds": seconds}
                (cell / "eval.tmp.json").write_text(json.dumps(record, indent=1))
                os.replace(cell / "eval.tmp.json", done)
            record = json.loads(done.read_text())
            linears = json.loads((cell / "prune1" / "layers.json").read_text())["linears"]
            peak = max(linears, key=lambda k: linears[k]["max_abs_ratio"])  # the weight-range check of the report
            results[(name, text)] = (record["ppl"][dataset], record["prune1_seconds"],
                                     (linears[peak]["max_abs_ratio"], peak.removeprefix("model.").removesuffix(".weight")))
            print(f"{name} {pattern}: ppl {results[(name, text)][0]:.3f}, prune1 {results[(name, text)][1]:.0f} s",
                  flush=True)

    base = dense["ppl"][dataset]
    head = ["row", *(f"{p} ppl (×dense)" for p in args.patterns), *(f"{p} prune1 s" for p in args.patterns),
            *(f"{p} max max|W|/max|W_d|" for p in args.patterns)]
    lines = [f"### {run}: prune1 through one pipeline, ours against the reference solvers; perplexity on "
             f"`{dataset}` (dense {base:.3f}), seconds of the prune1 stage (process included), the largest "
             "max|W| / max|W_dense| of any linear (and which)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, *_ in rows:
        cells = [name] + [f"{results[(name, p)][0]:.3f} (×{results[(name, p)][0] / base:.3f})" for p in args.patterns]
        cells += [f"{results[(name, p)][1]:.0f}" for p in args.patterns]
        cells += [f"{results[(name, p)][2][0]:.2f}× ({results[(name, p)][2][1]})" for p in args.patterns]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for name, method, _, checkout in rows:
        if checkout or (f"ref-{method}", args.patterns[0]) not in results:
            continue
        gaps = [f"{p} {100 * (results[(name, p)][0] / results[(f'ref-{method}', p)][0] - 1):+.2f} %" for p in args.patterns]
        lines.append(f"- {name} against ref-{method} (perplexity): " + ", ".join(gaps) + "; prune1 time ×"
                     + ", ×".join(f"{results[(name, p)][1] / results[(f'ref-{method}', p)][1]:.2f}" for p in args.patterns))
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
