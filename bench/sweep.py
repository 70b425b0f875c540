"""One table per model: one-shot, one-shot + adjust, and SDS variants for every (method, pattern), with the
seconds each stage took — the tables the README's method section shows, made by the pipeline itself.

    .venv/bin/python bench/sweep.py --config config/smollm2.yaml                       # SmolLM2-135M (its patterns: see README)
    .venv/bin/python bench/sweep.py --config config/config.yaml --run sweep_default \\
        --patterns 2:4 4:8 unstructured:0.5 unstructured:0.7                           # the built-in model
    .venv/bin/python bench/sweep.py --config config/wikitext2.yaml --run sweep_wikitext2 \\
        --patterns 2:4 4:8 unstructured:0.5 unstructured:0.7                           # built-in, real English
    .venv/bin/python bench/sweep.py --config config/smollm2.yaml --run smollm2_cal128 \\
        --calibration-samples 128 --methods alps --patterns unstructured:0.7            # 4x the calibration

The base config's own keys apply; --methods, --patterns and the SDS variants (named `reconstruct` settings:
`default` grows the second-prune mask by ADMM from the reconstructed weights, `paper` runs the first
pruner again and then the adjustment) replace its sweep keys. Runs `snakemake` from the repository root
(relative paths in the config resolve there; every stage it already has is reused), then prints perplexity
per stage — the `admm` and `alps` methods are the strongest one-shot baselines — and says where SDS does
not win.
"""
from __future__ import annotations

import argparse
import csv
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"default": {}, "paper": {"prune2": {"selection": "pruner"}},
            "pruner_only": {"prune2": {"selection": "pruner", "adjust": "none"}}}  # no adjustment after it
STAGES = ("prune1", "prune1_adjust", "reconstruct", "prune2")


def bench_seconds(run_dir: Path, stage: str, job: str) -> float | None:
    path = run_dir / "benchmarks" / stage / f"{job}.tsv"
    if not path.is_file():
        return None
    rows = list(csv.DictReader(path.open(), delimiter="\t"))
    return float(rows[-1]["s"]) if rows else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="base config (YAML), e.g. config/smollm2.yaml")
    ap.add_argument("--run", help="run name (default: the config's own)")
    ap.add_argument("--methods", nargs="+", default=["magnitude", "wanda", "sparsegpt", "admm", "alps"])
    ap.add_argument("--patterns", nargs="+", default=["2:4", "unstructured:0.5"])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--sparsity-profile", choices=["uniform", "owl"],
                    help="set prune.sparsity_profile (default: the config's own); use a run name of its own for owl")
    ap.add_argument("--calibration-samples", type=int, metavar="N",
                    help="set calibration.nsamples (default: the config's own); use a run name of its own, so the "
                         "table's other rows are on the same calibration")
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--out", help="also write the table (Markdown) here")
    ap.add_argument("--no-run", action="store_true", help="only collect what an earlier run left")
    ap.add_argument("--snakemake-args", default="",
                    help="more arguments for snakemake, one string, e.g. '--scheduler greedy --keep-going'")
    args = ap.parse_args()

    from sds.core.patterns import parse_pattern

    config = yaml.safe_load((ROOT / args.config).read_text() if not Path(args.config).is_absolute()
                            else Path(args.config).read_text())
    config["run"] = args.run or config["run"]
    config.setdefault("prune", {}).update(methods=args.methods, patterns=args.patterns)
    if args.sparsity_profile:
        config["prune"]["sparsity_profile"] = args.sparsity_profile
    if args.calibration_samples:
        config.setdefault("calibration", {})["nsamples"] = args.calibration_samples
    base_recon = (config.get("reconstruct") or {}).get("default", {})
    config["reconstruct"] = {v: {**base_recon, **VARIANTS[v]} for v in args.variants}
    run_dir = ROOT / "results" / config["run"]
    cfg_path = ROOT / "results" / f".sweep-{config['run']}.yaml"
    cfg_path.parent.mkdir(exist_ok=True)
    cfg_path.write_text(yaml.safe_dump(config, sort_keys=False))
    if not args.no_run:
        proc = subprocess.run([sys.executable, "-m", "snakemake", "--cores", str(args.cores), "--configfile",
                               str(cfg_path), *shlex.split(args.snakemake_args)], cwd=ROOT)
        if proc.returncode:
            print(f"sweep: snakemake failed (exit {proc.returncode})", file=sys.stderr)
            return proc.returncode

    rows = list(csv.DictReader((run_dir / "report" / "table.csv").open()))
    dataset = rows[0]["dataset"]
    ppl = {(r["method"], r["pattern"], r["stage"], r["recon"]): float(r["ppl"]) for r in rows if r["dataset"] == dataset}
    dense = ppl[("-", "-", "dense", "-")]
    title = f"{config['run']}: perplexity on `{dataset}` (dense {dense:.3f}); seconds per stage"
    head = (["method", "pattern", "one-shot", "one-shot + adjust"] + [f"SDS ({v})" for v in args.variants]
            + ["prune1 s", "adjust s", "reconstruct s"] + [f"prune2 s ({v})" for v in args.variants])
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    losses, versus = [], []
    for text in args.patterns:
        pattern = parse_pattern(text)
        best_one_shot = min(ppl[(m, str(pattern), s, "-")] for m in args.methods for s in ("prune1", "prune1+adjust"))
        for method in args.methods:
            key = f"{method}_{pattern.slug}"
            cells = [method, str(pattern), f"{ppl[(method, str(pattern), 'prune1', '-')]:.3f}",
                     f"{ppl[(method, str(pattern), 'prune1+adjust', '-')]:.3f}"]
            cells += [f"{ppl[(method, str(pattern), 'sds', v)]:.3f}" for v in args.variants]
            # the variants differ only in their second prune, so they share one dense reconstruction
            cells += [f"{bench_seconds(run_dir, s, key) or float('nan'):.0f}" for s in ("prune1", "prune1_adjust")]
            cells.append(f"{bench_seconds(run_dir, 'reconstruct', f'{key}_{args.variants[0]}') or float('nan'):.0f}")
            cells += [f"{bench_seconds(run_dir, 'prune2', f'{key}_{v}') or float('nan'):.0f}" for v in args.variants]
            lines.append("| " + " | ".join(cells) + " |")
            sds = ppl[(method, str(pattern), "sds", args.variants[0])]
            own = min(ppl[(method, str(pattern), s, "-")] for s in ("prune1", "prune1+adjust"))
            if sds >= own:
                losses.append(f"{method} {pattern}: SDS ({args.variants[0]}) {sds:.3f} ≥ its own one-shot/adjust "
                              f"best {own:.3f} ({100 * (sds / own - 1):+.2f} %)")
            elif sds >= best_one_shot:
                losses.append(f"{method} {pattern}: SDS ({args.variants[0]}) {sds:.3f} beats its own one-shot but "
                              f"not the best one-shot row {best_one_shot:.3f} ({100 * (sds / best_one_shot - 1):+.2f} %)")
        if "alps" in args.methods:  # the strongest layer-wise baseline: does the best SDS checkpoint beat it?
            alps = min(ppl[("alps", str(pattern), s, "-")] for s in ("prune1", "prune1+adjust"))
            best_method = min(args.methods, key=lambda m: ppl[(m, str(pattern), "sds", args.variants[0])])
            best_sds = ppl[(best_method, str(pattern), "sds", args.variants[0])]
            versus.append(f"{pattern}: best SDS ({best_method} first prune) {best_sds:.3f} against alps "
                          f"{alps:.3f} ({100 * (best_sds / alps - 1):+.2f} %"
                          f"{', below' if best_sds < alps else ', NOT below'})")
    if versus:
        lines += ["", "Best SDS against the alps row (the better of alps one-shot and alps + adjust): "
                  + "; ".join(versus) + "."]
    lines += [""] + (["Where SDS does not win: " + "; ".join(losses) + "."] if losses else
                     [f"SDS ({args.variants[0]}) beats every one-shot and one-shot + adjust row of its pattern."])
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    sys.exit(main())
