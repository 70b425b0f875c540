"""Is the dense phase dense? A grid of the reconstruction's L1 / L2 strengths (named `reconstruct` settings of
one pipeline run), printing per setting the density of the linears after the dense reconstruction (mean over
the linears, from each one's `density` in the reconstruct checkpoint's layers.json) and after SDS, and the
SDS perplexity beside the one-shot and one-shot + adjust rows of the same first prune.

    .venv/bin/python bench/dense_phase_sweep.py --workdir /tmp/dps                       # the micro model
    .venv/bin/python bench/dense_phase_sweep.py --config config/config.yaml --workdir /tmp/dps_default \\
        --l1 0 0.003 0.01 0.03 --l2 0 0.01

The base config's own keys apply (its `default` reconstruct setting is the base of every grid point), with
MLflow and zero-shot off; Snakemake runs in --workdir (results under it), reusing whatever it already has.
"""
from __future__ import annotations

import argparse
import csv
import itertools
import json
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def setting_name(l1: float, l2: float) -> str:
    # no '.' in the name: core.stage_keys addresses a setting's keys as dotted paths
    return f"l1_{l1:g}_l2_{l2:g}".replace(".", "p")


def mean_density(layers_json: Path) -> float:
    linears = json.loads(layers_json.read_text())["linears"]
    return sum(info["density"] for info in linears.values()) / len(linears)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="config/micro.yaml")
    ap.add_argument("--workdir", required=True, help="Snakemake's working directory (results go under it)")
    ap.add_argument("--l1", type=float, nargs="+", default=[0.0, 0.003, 0.01, 0.03])
    ap.add_argument("--l2", type=float, nargs="+", default=[0.0, 0.01])
    ap.add_argument("--cores", type=int, default=2)
    args = ap.parse_args()
    from sds.core.patterns import parse_pattern

    config = yaml.safe_load((ROOT / args.config).read_text())
    base = (config.get("reconstruct") or {}).get("default", {})
    grid = {setting_name(l1, l2): {**base, "l1": l1, "l2": l2} for l1, l2 in itertools.product(args.l1, args.l2)}
    config["reconstruct"] = grid
    config["mlflow"] = {"enabled": False}
    config.setdefault("evaluate", {}).setdefault("zeroshot", {})["enabled"] = False
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    cfg_path = work / "dense_phase_sweep.yaml"
    cfg_path.write_text(yaml.safe_dump(config, sort_keys=False))
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "-d", str(work),
                           "--cores", str(args.cores), "--configfile", str(cfg_path)])
    if proc.returncode:
        print(f"dense_phase_sweep: snakemake failed (exit {proc.returncode})", file=sys.stderr)
        return proc.returncode

    run_dir = work / "results" / config["run"]
    rows = list(csv.DictReader((run_dir / "report" / "table.csv").open()))
    dataset = rows[0]["dataset"]
    ppl = {(r["method"], r["pattern"], r["stage"], r["recon"]): float(r["ppl"]) for r in rows if r["dataset"] == dataset}
    print(f"{config['run']}: perplexity on `{dataset}` (dense {ppl[('-', '-', 'dense', '-')]:.3f}); density = mean "
          "non-zero fraction over the linears")
    print("| method | pattern | l1 | l2 | density prune1 | density reconstruct | density SDS | PPL one-shot | "
          "PPL one-shot + adjust | PPL SDS |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for method, text in itertools.product(config["prune"]["methods"], config["prune"]["patterns"]):
        pattern = parse_pattern(text)
        folder = run_dir / method / pattern.slug
        first = mean_density(folder / "prune1" / "layers.json")
        for name, setting in grid.items():
            cells = [method, str(pattern), f"{setting['l1']:g}", f"{setting['l2']:g}", f"{first:.3f}",
                     f"{mean_density(folder / name / 'reconstruct' / 'layers.json'):.3f}",
                     f"{mean_density(folder / name / 'sds' / 'layers.json'):.3f}",
                     f"{ppl[(method, str(pattern), 'prune1', '-')]:.3f}",
                     f"{ppl[(method, str(pattern), 'prune1+adjust', '-')]:.3f}",
                     f"{ppl[(method, str(pattern), 'sds', name)]:.3f}"]
            print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    sys.exit(main())
