"""The report: a Markdown table and CSVs of every evaluated checkpoint, seconds per stage (from
Snakemake's benchmark files) and PNG plots (weight histograms per stage, perplexity bars)."""
from __future__ import annotations

import csv
import io as _io
import json
from pathlib import Path

from .io import atomic_path, read_json, write_text

SUMMARY_COLUMNS = ["run", "model", "method", "pattern", "stage", "recon", "dataset", "ppl", "sparsity"]
STAGE_ORDER = {"dense": 0, "prune1": 1, "prune1+adjust": 2, "sds": 3}


def _benchmark_seconds(paths: list[str]) -> dict[str, float]:
    """'stage/wildcards' → wall seconds, from results/<run>/benchmarks/<stage>/<name>.tsv files."""
    seconds = {}
    for path in paths:
        p = Path(path)
        if not p.is_file():
            continue
        rows = list(csv.DictReader(p.open(), delimiter="\t"))
        if rows:
            seconds[f"{p.parent.name}/{p.stem}"] = float(rows[0]["s"])
    return seconds


def _csv_text(rows: list[dict], columns: list[str]) -> str:
    buf = _io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: row.get(c, "") for c in columns})
    return buf.getvalue()


def _merge_summary(path: Path, run: str, rows: list[dict]) -> None:
    """results/summary.csv keeps one row per evaluated checkpoint of every run; this run's rows replace
    its previous ones."""
    kept = []
    if path.is_file():
        kept = [r for r in csv.DictReader(path.open()) if r.get("run") != run]
    with atomic_path(path) as tmp:
        tmp.write_text(_csv_text(kept + rows, SUMMARY_COLUMNS))


def build_report(config: dict, evals: list[str], benchmarks: list[str], out: Path, summary_csv: Path,
                 model_dir: str, checkpoints: list[str]) -> list[str]:
    results = [read_json(p) for p in evals]
    results.sort(key=lambda r: (r["method"], r["pattern"], STAGE_ORDER.get(r["stage"], 9), r["recon"]))
    datasets = list(config["evaluate"]["datasets"])
    model = config["model"]["source"]
    rows = []
    for r in results:
        for ds in datasets:
            rows.append({"run": config["run"], "model": model, "method": r["method"] or "-",
                         "pattern": r["pattern"] or "-", "stage": r["stage"], "recon": r["recon"] or "-",
                         "dataset": ds, "ppl": f"{r['ppl'][ds]:.4f}", "sparsity": f"{r['sparsity']:.4f}"})
    seconds = _benchmark_seconds(benchmarks)
    out.mkdir(parents=True, exist_ok=True)
    table_csv = out / "table.csv"
    with atomic_path(table_csv) as tmp:
        tmp.write_text(_csv_text(rows, SUMMARY_COLUMNS))
    _merge_summary(summary_csv, config["run"], rows)

    dense = {ds: next((r["ppl"][ds] for r in results if r["stage"] == "dense"), None) for ds in datasets}
    lines = [f"# SDS report: run `{config['run']}`", "", f"Model: `{model}`. Perplexity protocol: "
             f"non-overlapping windows of {config['evaluate']['seqlen']} tokens, mean NLL → exp. "
             f"Calibration: {config['calibration']['nsamples']} × {config['calibration']['seqlen']} tokens "
             f"from `{config['calibration']['source']}`.", ""]
    for ds in datasets:
        lines += [f"## Perplexity on `{ds}` (dense {dense[ds]:.3f})" if dense[ds] else f"## Perplexity on `{ds}`", "",
                  "| method | pattern | one-shot | one-shot + adjust | SDS | recon | SDS − one-shot | sparsity (SDS) |",
                  "|---|---|---|---|---|---|---|---|"]
        keys = sorted({(r["method"], r["pattern"]) for r in results if r["method"]})
        for method, pattern in keys:
            group = [r for r in results if (r["method"], r["pattern"]) == (method, pattern)]
            first = next((r for r in group if r["stage"] == "prune1"), None)
            adj = next((r for r in group if r["stage"] == "prune1+adjust"), None)
            for sds in [r for r in group if r["stage"] == "sds"] or [None]:
                f = lambda r: f"{r['ppl'][ds]:.3f}" if r else "–"
                delta = f"{sds['ppl'][ds] - first['ppl'][ds]:+.3f}" if sds and first else "–"
                lines.append(f"| {method} | {pattern} | {f(first)} | {f(adj)} | {f(sds)} | "
                             f"{sds['recon'] if sds else '–'} | {delta} | {sds['sparsity']:.4f} |" if sds else
                             f"| {method} | {pattern} | {f(first)} | {f(adj)} | – | – | – | – |")
        lines.append("")
    lines += ["## Seconds per stage (Snakemake benchmark wall time)", "", "| stage | job | seconds |", "|---|---|---|"]
    for key in sorted(seconds):
        stage, job = key.split("/", 1)
        lines.append(f"| {stage} | {job} | {seconds[key]:.1f} |")
    total = sum(seconds.values())
    lines += [f"| **total** | | **{total:.1f}** |", "", "Per-stage sparsity and pattern checks: see `table.csv` "
              "and the `evaluate` JSON files.", ""]
    plots = _plots(config, results, datasets, out, model_dir, checkpoints)
    lines += [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    write_text(out / "report.md", "\n".join(lines) + "\n")
    write_text(out / "seconds.json", json.dumps(seconds, indent=2, sort_keys=True) + "\n")
    return [str(out / "report.md"), str(table_csv), *plots]


def _plots(config, results, datasets, out: Path, model_dir: str, checkpoints: list[str]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    ds = datasets[0]
    labeled = [r for r in results]
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(labeled)), 4))
    names = ["dense" if r["stage"] == "dense" else f"{r['method']}\n{r['pattern']}\n{r['stage']}" for r in labeled]
    ax.bar(range(len(labeled)), [r["ppl"][ds] for r in labeled],
           color=[{"dense": "grey", "prune1": "tab:red", "prune1+adjust": "tab:orange", "sds": "tab:green"}
                  .get(r["stage"], "tab:blue") for r in labeled])
    ax.set_xticks(range(len(labeled)), names, fontsize=6)
    ax.set_ylabel(f"perplexity ({ds})")
    ax.set_title("Perplexity by method and stage")
    fig.tight_layout()
    path = out / "ppl.png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    made.append(str(path))

    if checkpoints:
        made.append(_histograms(config, out, model_dir, checkpoints, plt))
    return made


def _histograms(config, out, model_dir, checkpoints, plt) -> str:
    """Weight-magnitude histograms of one linear at each stage (dense, prune1, reconstruct, SDS)."""
    import torch
    from safetensors.torch import load_file

    layer = config["report"]["histogram_layer"]
    suffix = config["report"]["histogram_linear"]
    dense = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        dense.update(load_file(str(f)))
    key = next((k for k in dense if f".{layer}." in k and k.endswith(f"{suffix}.weight")), None)
    fig, ax = plt.subplots(figsize=(7, 4))
    series = [("dense", dense.get(key))]
    for ckpt in checkpoints:
        tensors = load_file(str(Path(ckpt) / "weights.safetensors"))
        series.append((Path(ckpt).name, tensors.get(key)))
    for name, W in series:
        if W is None:
            continue
        values = W.float().abs().flatten()
        ax.hist(torch.log10(values[values > 0]).numpy(), bins=80, histtype="step", label=name)
    ax.set_xlabel(f"log10 |w|  ({key})")
    ax.set_ylabel("count (non-zero weights)")
    ax.legend()
    ax.set_title("Weight magnitudes by stage")
    fig.tight_layout()
    path = out / "histograms.png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return str(path)
