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
max|W| / max|W_dense| over the linears (from the stage's layers.json, the report's weight-range check).
`--shadow` runs, in each reference row's process, our pruner too (defaults and each `--variant` of the
method) on every (W, H) the reference prunes, a line per linear in the cell's shadow.jsonl, and prints per
setting the error ratio ours ÷ reference and the mask overlap: the solvers compared on the reference's own
sequential pass (that row's seconds then include ours: marked, no time ratio).
`--perturb-seeds 1 2` runs every row again per seed with its pruner fed a rounding-level perturbation of H
(perturbed_hessian: the same method on the same data), rows NAME~SEED, then per row the spread of its runs
and the gap of its mean to the reference's: a gap inside the spread is the sequential pass's sensitivity to
mask flips, not a weaker solver. Rows write under results/<run>_refbench/ (MLflow off); the run's own
results are only read. The reference code is imported from the given checkouts (ALPS from a
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

# Runs one sds stage with the per-linear pruner of `method` replaced by a reference implementation (a
# checkout given) and/or fed a perturbed H (seed > 0; see perturbed_hessian); with shadows (JSON
# [[tag, prune overrides], …]) our pruner also runs on each (W, H) the reference gets, a line per linear
# into the shadow file (see shadow_record).
DRIVER = r"""
import json, sys, time
sys.path.insert(0, BENCH)
import reference_solvers
import sds.algorithms.method as method_module
from reference_pipeline_bench import perturbed_hessian, shadow_record
from sds.cli import main

method, checkout, seed, shadows, shadow_file = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
ours = method_module.prune
reference = None
if checkout:
    load = {"alps": reference_solvers.load_reference_alps, "admm": reference_solvers.load_reference_admm}[method]
    reference = load(checkout)
shadows = json.loads(shadows) if shadows else []
shadow_log = open(shadow_file, "w") if shadows else None
calls = [0]

def prune(name, W, pattern, settings, *, hessian=None, W_start=None):
    if name != method:
        return ours(name, W, pattern, settings, hessian=hessian, W_start=W_start)
    calls[0] += 1
    if seed:
        hessian = perturbed_hessian(hessian, seed, calls[0])
    if reference is None:
        return ours(name, W, pattern, settings, hessian=hessian, W_start=W_start)
    start = time.perf_counter()
    new_W = reference(W.float().cpu(), hessian.float().cpu(), pattern)
    seconds = time.perf_counter() - start
    if new_W is None:
        raise SystemExit(f"reference {method} has no {pattern}")
    if shadow_log:
        ran = lambda overrides: ours(name, W, pattern, dict(settings, **overrides), hessian=hessian, W_start=W_start)
        record = shadow_record(calls[0], W, hessian, new_W, seconds, shadows, ran)
        shadow_log.write(json.dumps(record) + "\n")
        shadow_log.flush()
    new_W = new_W.to(device=W.device, dtype=W.dtype)
    return new_W, new_W != 0

method_module.prune = prune
sys.exit(main(sys.argv[6:]))
"""


PERTURBATION = 1e-6


def perturbed_hessian(H, seed: int, call: int):
    """H → S H S with S = diag(1 + 1e-6·g), g ~ N(0, 1) seeded by (seed, the pruner call's index): every
    calibration input rescaled by about a millionth, float32 rounding's order of size (H stays positive
    semi-definite). The same pruner on such an H is the same method on the same data; how far its
    perplexity moves measures the spread that the sequential pass's mask flips give, against which an
    ours-to-reference gap is read."""
    import torch

    g = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(seed * 100_003 + call), dtype=torch.float64)
    scale = (1 + PERTURBATION * g).to(device=H.device, dtype=H.dtype)
    return H * scale[:, None] * scale[None, :]


def shadow_record(call: int, W, H, reference_W, reference_seconds: float, shadows, run_ours) -> dict:
    """One linear of a `--shadow` reference row: the reference's relative calibration error
    tr(Δ H Δᵀ)/tr(W H Wᵀ) and seconds, then for each (tag, overrides) our pruner's on the same W, H
    (`run_ours(overrides)` → (W_new, keep)) with the share of the reference's kept weights it also keeps."""
    from sds.algorithms.objective import LinearStats, relative_error

    W, H = W.float().cpu(), H.float().cpu()
    stats = LinearStats(H, H, H)
    kept = reference_W != 0
    record = {"linear": call, "ref": relative_error(reference_W, W, stats), "ref_s": reference_seconds}
    for tag, overrides in shadows:
        start = time.perf_counter()
        ours_W, keep = run_ours(overrides)
        record[f"{tag}_s"] = time.perf_counter() - start
        record[tag] = relative_error(ours_W.float().cpu(), W, stats)
        record[f"{tag}_overlap"] = float((keep.cpu() & kept).sum()) / max(int(kept.sum()), 1)
    return record


def shadow_summary(records: list[dict], tags: list[str] | None = None) -> list[str]:
    """Per tag (default: every tag the records hold, by their `TAG_overlap` keys): geometric mean and range of ours ÷ reference calibration error over the linears, the mean
    and lowest mask overlap, summed seconds ours ÷ reference."""
    import math

    if tags is None:
        tags = [key.removesuffix("_overlap") for key in records[0] if key.endswith("_overlap")]
    lines = []
    for tag in tags:
        ratios = [r[tag] / r["ref"] for r in records if r["ref"] > 0]
        if not ratios:
            continue
        geo = math.exp(sum(map(math.log, ratios)) / len(ratios))
        overlaps = [r[f"{tag}_overlap"] for r in records]
        seconds = sum(r[f"{tag}_s"] for r in records) / max(sum(r["ref_s"] for r in records), 1e-9)
        lines.append(f"  - {tag}: error ours ÷ reference geometric mean {geo:.5f} (range {min(ratios):.4f}–"
                     f"{max(ratios):.4f}) over {len(ratios)} linears; kept weights shared with the reference "
                     f"{100 * sum(overlaps) / len(overlaps):.2f} % on average (lowest {100 * min(overlaps):.2f} %); "
                     f"solver seconds ×{seconds:.2f}")
    return lines


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
    ap.add_argument("--perturb-seeds", type=int, nargs="+", default=[], metavar="SEED",
                    help="every row again per seed (> 0) with H perturbed at rounding level (perturbed_hessian): "
                         "rows NAME~SEED, and per row the spread of its runs and the gap of the means")
    ap.add_argument("--shadow", action="store_true",
                    help="in each reference row, also run our pruner (defaults and each --variant of the method) "
                         "on every (W, H) the reference prunes: per-linear errors and mask overlap, same inputs")
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

    base_rows = [(m, m, {}, None) for m in args.methods]
    refs = {"alps": args.reference_alps, "admm": args.reference_admm}
    base_rows += [(f"ref-{m}", m, {}, refs[m]) for m in args.methods if refs[m]]
    base_rows += [(name, m, overrides, None) for name, m, overrides in map(parse_variant, args.variant)]
    rows = [(name, method, overrides, checkout, 0) for name, method, overrides, checkout in base_rows]
    rows += [(f"{name}~{seed}", method, overrides, checkout, seed)
             for name, method, overrides, checkout in base_rows for seed in args.perturb_seeds]
    results = {}
    for text in args.patterns:
        pattern = parse_pattern(text)
        for name, method, overrides, checkout, seed in rows:
            cell = bench_dir / name / pattern.slug
            done = cell / "eval.json"
            shadows = ([[method, {}]] + [[n, o] for n, m, o, c in base_rows if m == method and not c and o]
                       if args.shadow and checkout and not seed else [])
            if not done.is_file() or (shadows and not (cell / "shadow.jsonl").is_file()):
                shutil.rmtree(cell, ignore_errors=True)
                cell.mkdir(parents=True)
                cfg = json.loads(json.dumps(resolved))
                cfg["prune"].update(overrides)
                cfg_file = cell / "config.json"
                cfg_file.write_text(json.dumps(cfg, indent=1))
                python = ([sys.executable, "-c", DRIVER.replace("BENCH", repr(str(BENCH))), method, checkout or "",
                           str(seed), json.dumps(shadows) if shadows else "", str(cell / "shadow.jsonl")]
                          if checkout or seed else [sys.executable, "-m", "sds.cli"])
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
    # A shadowed row's prune1 seconds include our shadow solves: no time ratio against it.
    shadowed = lambda name, p: (bench_dir / name / parse_pattern(p).slug / "shadow.jsonl").is_file()
    head = ["row", *(f"{p} ppl (×dense)" for p in args.patterns), *(f"{p} prune1 s" for p in args.patterns),
            *(f"{p} max max|W|/max|W_d|" for p in args.patterns)]
    lines = [f"### {run}: prune1 through one pipeline, ours against the reference solvers; perplexity on "
             f"`{dataset}` (dense {base:.3f}), seconds of the prune1 stage (process included), the largest "
             "max|W| / max|W_dense| of any linear (and which)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, *_ in rows:
        cells = [name] + [f"{results[(name, p)][0]:.3f} (×{results[(name, p)][0] / base:.3f})" for p in args.patterns]
        cells += [f"{results[(name, p)][1]:.0f}" + (" (shadowed)" if shadowed(name, p) else "") for p in args.patterns]
        cells += [f"{results[(name, p)][2][0]:.2f}× ({results[(name, p)][2][1]})" for p in args.patterns]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for name, method, _, checkout, seed in rows:
        if checkout or seed or (f"ref-{method}", args.patterns[0]) not in results:
            continue
        gaps = [f"{p} {100 * (results[(name, p)][0] / results[(f'ref-{method}', p)][0] - 1):+.2f} %" for p in args.patterns]
        times = [f"×{results[(name, p)][1] / results[(f'ref-{method}', p)][1]:.2f}" if not shadowed(f"ref-{method}", p)
                 else "— (reference shadowed)" for p in args.patterns]
        lines.append(f"- {name} against ref-{method} (perplexity): " + ", ".join(gaps) + "; prune1 time "
                     + ", ".join(times))
    for name, _, _, checkout in base_rows:
        for p in args.patterns:
            if args.shadow and checkout and shadowed(name, p):
                path = bench_dir / name / parse_pattern(p).slug / "shadow.jsonl"
                records = [json.loads(line) for line in path.read_text().splitlines()]
                lines += ["", f"- Shadow of {name} at {p}: our pruner on each (W, H) of its sequential pass"]
                lines += shadow_summary(records)
    if args.perturb_seeds:
        lines += ["", f"Perturbed H (seeds {', '.join(map(str, args.perturb_seeds))}): per row, the range of its "
                      "runs (unperturbed included), their spread (max ÷ min − 1) and mean; against the reference, "
                      "the gap of the means:"]
        runs = lambda name, p: [results[(n, p)][0] for n in [name] + [f"{name}~{s}" for s in args.perturb_seeds]]
        for name, method, _, checkout in base_rows:
            cells = []
            for p in args.patterns:
                ppl = runs(name, p)
                cell = (f"{p} {min(ppl):.3f}–{max(ppl):.3f} ({100 * (max(ppl) / min(ppl) - 1):.2f} %), "
                        f"mean {sum(ppl) / len(ppl):.3f}")
                if not checkout and (f"ref-{method}", p) in results:
                    ref = runs(f"ref-{method}", p)
                    cell += f" ({100 * (sum(ppl) / len(ppl) / (sum(ref) / len(ref)) - 1):+.2f} % vs ref-{method})"
                cells.append(cell)
            lines.append(f"- {name}: " + "; ".join(cells))
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
