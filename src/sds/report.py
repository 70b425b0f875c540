"""The report: a Markdown table and CSVs of every evaluated checkpoint, seconds per stage (from
Snakemake's benchmark files) and PNG plots (weight histograms per stage, perplexity bars)."""
from __future__ import annotations

import csv
import io as _io
import json
from pathlib import Path

from .io import atomic_path, read_json, write_text

SUMMARY_COLUMNS = ["run", "model", "method", "pattern", "stage", "recon", "dataset", "ppl", "sparsity"]
# Zero-shot results go to their own CSVs (report/zeroshot.csv, results/zeroshot_summary.csv) so that the
# columns of table.csv / summary.csv stay as they are. task "mean" is the mean over the run's tasks.
ZEROSHOT_COLUMNS = ["run", "model", "method", "pattern", "stage", "recon", "task", "acc", "acc_stderr", "acc_norm",
                    "acc_norm_stderr", "n"]
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


def _merge_summary(path: Path, run: str, rows: list[dict], columns: list[str] = SUMMARY_COLUMNS) -> None:
    """results/summary.csv keeps one row per evaluated checkpoint of every run; this run's rows replace
    its previous ones."""
    kept = []
    if path.is_file():
        kept = [r for r in csv.DictReader(path.open()) if r.get("run") != run]
    with atomic_path(path) as tmp:
        tmp.write_text(_csv_text(kept + rows, columns))


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
    zs_rows = _zeroshot_rows(config, model, results)
    with atomic_path(out / "zeroshot.csv") as tmp:
        tmp.write_text(_csv_text(zs_rows, ZEROSHOT_COLUMNS))
    _merge_summary(summary_csv.with_name("zeroshot_summary.csv"), config["run"], zs_rows, ZEROSHOT_COLUMNS)
    lines += _zeroshot_section(results)
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
    return [str(out / "report.md"), str(table_csv), str(out / "zeroshot.csv"), *plots]


def _zeroshot_metrics(r: dict, task: str) -> dict:
    zs = r.get("zeroshot") or {}
    return zs.get("mean", {}) if task == "mean" else zs.get("tasks", {}).get(task, {})


def _zeroshot_rows(config: dict, model: str, results: list[dict]) -> list[dict]:
    rows = []
    for r in results:
        if not r.get("zeroshot"):
            continue
        for task in [*r["zeroshot"]["tasks"], "mean"]:
            m = _zeroshot_metrics(r, task)
            rows.append({"run": config["run"], "model": model, "method": r["method"] or "-",
                         "pattern": r["pattern"] or "-", "stage": r["stage"], "recon": r["recon"] or "-",
                         "task": task, "n": m.get("n", ""),
                         **{k: "" if m.get(k) is None else f"{m[k]:.4f}"
                            for k in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr")}})
    return rows


def _zeroshot_section(results: list[dict]) -> list[str]:
    """Accuracy per task and the mean: dense, one-shot, one-shot + adjust and SDS side by side."""
    scored = [r for r in results if r.get("zeroshot")]
    if not scored:
        return []
    tasks = list(scored[0]["zeroshot"]["tasks"])
    dense = next((r for r in scored if r["stage"] == "dense"), None)

    def cell(r, task, metric="acc"):
        m = _zeroshot_metrics(r, task) if r else {}
        if m.get(metric) is None:
            return "–"
        return f"{m[metric]:.3f} ± {m[f'{metric}_stderr']:.3f}" if m.get(f"{metric}_stderr") is not None \
            else f"{m[metric]:.3f}"

    def delta(a, b, task, metric="acc"):
        x, y = (_zeroshot_metrics(r, task).get(metric) if r else None for r in (a, b))
        return f"{x - y:+.3f}" if x is not None and y is not None else "–"

    rows = [(task, "acc") for task in tasks] + [("**mean**", "acc"), ("**mean** (acc_norm)", "acc_norm")]
    lines = ["## Zero-shot accuracy (lm-eval-harness)", "",
             f"acc ± stderr per task ({', '.join(f'`{t}`' for t in tasks)}) and the mean over tasks; the mean "
             "(acc_norm) row takes acc_norm where a task defines it, else acc. All metrics: `zeroshot.csv`.", "",
             "| method | pattern | task | dense | one-shot | one-shot + adjust | SDS | recon | SDS − one-shot |",
             "|---|---|---|---|---|---|---|---|---|"]
    keys = sorted({(r["method"], r["pattern"]) for r in scored if r["method"]}) or [("-", "-")]
    for method, pattern in keys:
        group = [r for r in scored if (r["method"], r["pattern"]) == (method, pattern)]
        first = next((r for r in group if r["stage"] == "prune1"), None)
        adj = next((r for r in group if r["stage"] == "prune1+adjust"), None)
        for sds in [r for r in group if r["stage"] == "sds"] or [None]:
            for label, metric in rows:
                task = "mean" if label.startswith("**mean**") else label
                lines.append(f"| {method} | {pattern} | {label} | {cell(dense, task, metric)} | "
                             f"{cell(first, task, metric)} | {cell(adj, task, metric)} | {cell(sds, task, metric)} | "
                             f"{sds['recon'] if sds else '–'} | {delta(sds, first, task, metric)} |")
    return lines + [""]


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
