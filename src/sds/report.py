"""The report: a Markdown table and CSVs of every evaluated checkpoint, seconds per stage (from
Snakemake's benchmark files) and PNG figures (plots.py): perplexity increase over dense, per-linear
relative errors by stage, zero-shot accuracy, seconds per stage, weight histograms."""
from __future__ import annotations

import csv
import io as _io
import json
from dataclasses import dataclass
from pathlib import Path

from .io import atomic_path, read_json, write_text
from .patterns import pattern_from_slug
from .plots import (STAGE_ORDER, Bar, LayerErrors, Panel, gid, grouped_bars_figure, histogram_figure,
                    layer_errors_figure, make_series, order_groups, save_png, seconds_figure)

SUMMARY_COLUMNS = ["run", "model", "method", "pattern", "stage", "recon", "dataset", "ppl", "sparsity"]
# Zero-shot results go to their own CSVs (report/zeroshot.csv, results/zeroshot_summary.csv) so that the
# columns of table.csv / summary.csv stay as they are. task "mean" is the mean over the run's tasks.
ZEROSHOT_COLUMNS = ["run", "model", "method", "pattern", "stage", "recon", "task", "acc", "acc_stderr", "acc_norm",
                    "acc_norm_stderr", "n"]


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


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint folder of the run and what it holds, from the pipeline's output layout:
    <method>/<pattern slug>/{prune1,prune1_adjust} and <method>/<pattern slug>/<recon>/{reconstruct,sds}."""
    path: Path
    method: str
    pattern: str
    stage: str
    recon: str


def checkpoint_of(path: str | Path) -> Checkpoint:
    p = Path(path)
    parts = ("", "", "", *p.parts)
    folder = p.name
    if folder in ("prune1", "prune1_adjust"):
        method, slug, recon = parts[-3], parts[-2], ""
    else:
        method, slug, recon = parts[-4], parts[-3], parts[-2]
    try:
        pattern = str(pattern_from_slug(slug))
    except ValueError:
        pattern = slug
    return Checkpoint(p, method, pattern, {"prune1_adjust": "prune1+adjust"}.get(folder, folder), recon)


@dataclass
class Plot:
    """One report figure: its file name, the Figure, and the sentence the Markdown says about it."""
    name: str
    figure: object
    caption: str


def read_evals(evals: list[str]) -> list[dict]:
    """The eval JSONs in the order given (the config's order: the figures keep it)."""
    return [read_json(p) for p in evals]


def layer_errors(checkpoints: list[Checkpoint]) -> list[LayerErrors]:
    """Every sparse checkpoint's per-linear relative output error (its layers.json `rel_error`): after the
    first prune, after the adjustment, after SDS (the dense reconstruction is not a sparse model)."""
    out = []
    for ckpt in checkpoints:
        path = ckpt.path / "layers.json"
        if ckpt.stage == "reconstruct" or not path.is_file():
            continue
        linears = read_json(path).get("linears", {})
        out.append(LayerErrors(ckpt.method, ckpt.pattern, ckpt.stage, ckpt.recon,
                               {name: float(info["rel_error"]) for name, info in linears.items()
                                if "rel_error" in info}))
    return out


def build_report(config: dict, evals: list[str], benchmarks: list[str], out: Path, summary_csv: Path,
                 model_dir: str, checkpoints: list[str]) -> list[str]:
    """Writes report.md, table.csv, zeroshot.csv, seconds.json and the figures into `out`, merges this
    run's rows into `summary_csv`; returns the paths to log as the report's artifacts. `checkpoints`:
    the run's checkpoint folders (each one's layers.json feeds the per-linear errors; those of the first
    one's method and pattern also the weight histograms)."""
    given = read_evals(evals)
    results = sorted(given, key=lambda r: (r["method"], r["pattern"], STAGE_ORDER.get(r["stage"], 9), r["recon"]))
    datasets = list(config["evaluate"]["datasets"])
    model = config["model"]["source"]
    rows = []
    for r in results:
        for ds in datasets:
            rows.append({"run": config["run"], "model": model, "method": r["method"] or "-",
                         "pattern": r["pattern"] or "-", "stage": r["stage"], "recon": r["recon"] or "-",
                         "dataset": ds, "ppl": f"{r['ppl'][ds]:.4f}", "sparsity": f"{r['sparsity']:.4f}"})
    seconds = _benchmark_seconds(benchmarks)
    ckpts = [checkpoint_of(c) for c in checkpoints]
    errors = layer_errors(ckpts)
    out.mkdir(parents=True, exist_ok=True)
    table_csv = out / "table.csv"
    with atomic_path(table_csv) as tmp:
        tmp.write_text(_csv_text(rows, SUMMARY_COLUMNS))
    _merge_summary(summary_csv, config["run"], rows)
    plots = {p.name: p for p in figures(config, given, seconds, ckpts, model_dir, errors)}
    saved = []

    def figure_lines(name: str) -> list[str]:
        plot = plots.get(name)
        if plot is None:
            return []
        saved.append(save_png(plot.figure, out / name))
        return [f"![{Path(name).stem}]({name})", "", plot.caption, ""]

    dense = {ds: next((r["ppl"][ds] for r in results if r["stage"] == "dense"), None) for ds in datasets}
    lines = [f"# SDS report: run `{config['run']}`", "", f"Model: `{model}`. Perplexity protocol: "
             f"non-overlapping windows of {config['evaluate']['seqlen']} tokens, mean NLL → exp. "
             f"Calibration: {config['calibration']['nsamples']} × {config['calibration']['seqlen']} tokens "
             f"from `{config['calibration']['source']}`.", ""]
    lines += figure_lines("ppl.png")
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
    lines += _layer_error_section(errors)
    lines += figure_lines("layer_errors.png")
    zs_rows = _zeroshot_rows(config, model, results)
    with atomic_path(out / "zeroshot.csv") as tmp:
        tmp.write_text(_csv_text(zs_rows, ZEROSHOT_COLUMNS))
    _merge_summary(summary_csv.with_name("zeroshot_summary.csv"), config["run"], zs_rows, ZEROSHOT_COLUMNS)
    lines += _zeroshot_section(results)
    lines += figure_lines("zeroshot.png")
    lines += ["## Seconds per stage (Snakemake benchmark wall time)", "", "| stage | job | seconds |", "|---|---|---|"]
    for key in sorted(seconds):
        stage, job = key.split("/", 1)
        lines.append(f"| {stage} | {job} | {seconds[key]:.1f} |")
    total = sum(seconds.values())
    lines += [f"| **total** | | **{total:.1f}** |", ""]
    lines += figure_lines("seconds.png")
    lines += ["Per-stage sparsity and pattern checks: see `table.csv` and the `evaluate` JSON files.", ""]
    lines += figure_lines("histograms.png")
    write_text(out / "report.md", "\n".join(lines).rstrip("\n") + "\n")
    write_text(out / "seconds.json", json.dumps(seconds, indent=2, sort_keys=True) + "\n")
    return [str(out / "report.md"), str(table_csv), str(out / "zeroshot.csv"), *saved]


def _layer_error_section(errors: list[LayerErrors]) -> list[str]:
    """Mean relative output error over the linears, per (method, pattern) and stage."""
    if not errors:
        return []
    series = make_series([(e.stage, e.recon) for e in errors])
    lines = ["## Relative output error of the linears (calibration data)", "",
             "Mean over the linears of each one's relative output error on the calibration inputs, "
             "Σ‖W_dense x − W x‖² / Σ‖W_dense x‖² (0: exact; 1: as bad as zero output; per linear in each "
             "checkpoint's `layers.json`).", "",
             "| method | pattern | " + " | ".join(s.label for s in series) + " |",
             "|---|---|" + "---|" * len(series)]
    for method, pattern in sorted({(e.method, e.pattern) for e in errors}):  # the perplexity tables' order
        cells = []
        for s in series:
            found = [e for e in errors if (e.method, e.pattern, e.stage, e.recon) == (method, pattern, *s.key)]
            vals = list(found[0].errors.values()) if found else []
            cells.append(f"{sum(vals) / len(vals):.4f}" if vals else "–")
        lines.append(f"| {method} | {pattern} | " + " | ".join(cells) + " |")
    return lines + [""]


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


# --- figures -----------------------------------------------------------------------------------------------

def figures(config: dict, results: list[dict], seconds: dict[str, float], checkpoints: list[Checkpoint],
            model_dir: str, errors: list[LayerErrors] | None = None) -> list[Plot]:
    """Every report figure the run has data for, as Figures (nothing written): the perplexity increase
    over dense, the per-linear errors, zero-shot accuracy, seconds per stage, weight histograms."""
    plots = [Plot("ppl.png", ppl_figure(results, list(config["evaluate"]["datasets"])),
                  "**Perplexity increase over the dense model**, in % of the dense perplexity (absolute perplexity "
                  "in brackets), one group per method and pattern: compare the SDS bar with one-shot and one-shot "
                  "+ adjust in each group — the gap between those two bars and SDS is what the dense phase adds.")]
    errors = layer_errors(checkpoints) if errors is None else errors
    fig = layer_errors_figure(errors)
    if fig is not None:
        plots.append(Plot("layer_errors.png", fig,
                          "**Where SDS helps inside the model**: the relative output error of every linear after "
                          "each stage (log scale; a grey line joins one linear's stages): look for linears whose "
                          "SDS marker sits clearly below one-shot + adjust — those the dense phase improved."))
    fig = zeroshot_figure(results)
    if fig is not None:
        plots.append(Plot("zeroshot.png", fig,
                          "**Zero-shot mean accuracy minus dense**, in points, with ± 1 stderr bars (the grey band "
                          "is the dense model's ± 1 stderr): differences smaller than the error bars are noise."))
    fig = seconds_figure(seconds)
    if fig is not None:
        plots.append(Plot("seconds.png", fig,
                          "**Seconds per stage**, the jobs of a stage summed: the longest bars are where a run (and "
                          "a re-run after a change to that stage's settings) spends its time."))
    hist = _histograms(config, model_dir, checkpoints)
    if hist is not None:
        plots.append(hist)
    return plots


def ppl_figure(results: list[dict], datasets: list[str]):
    """Perplexity increase over dense (%) per (method, pattern) and stage, one panel per dataset."""
    pruned = [r for r in results if r["method"]]
    groups = order_groups([(r["method"], r["pattern"]) for r in pruned])
    series = make_series([(r["stage"], r["recon"]) for r in pruned])
    panels = []
    for ds in datasets:
        dense = next((r["ppl"][ds] for r in results if r["stage"] == "dense"), None)
        panel = Panel(f"{ds}: dense PPL {dense:.3f}" if dense else f"{ds}: perplexity (no dense evaluation)")
        for r in pruned:
            ppl = r["ppl"][ds]
            value = 100 * (ppl / dense - 1) if dense else ppl
            text = (f"{value:+.2f}% ({ppl:.3f})" if abs(value) < 1 else f"{value:+.1f}% ({ppl:.3f})") if dense \
                else f"{ppl:.3f}"
            panel.cells[((r["method"], r["pattern"]), (r["stage"], r["recon"]))] = Bar(
                value, gid=gid(r["method"], r["pattern"], r["stage"], r["recon"]), text=text)
        panels.append(panel)
    has_dense = any(r["stage"] == "dense" for r in results)
    return grouped_bars_figure(
        groups, series, panels,
        title="Perplexity increase over the dense model (lower is better)" if has_dense else "Perplexity",
        xlabel="perplexity increase over dense, %" if has_dense else "perplexity", fmt=lambda v: f"{v:.1f}")


def zeroshot_figure(results: list[dict]):
    """Mean zero-shot accuracy minus dense (points) per (method, pattern) and stage, ± stderr."""
    scored = [r for r in results if (r.get("zeroshot") or {}).get("mean", {}).get("acc") is not None]
    pruned = [r for r in scored if r["method"]]
    if not pruned:
        return None
    dense = next((r["zeroshot"]["mean"] for r in scored if r["stage"] == "dense"), None)
    tasks = list(pruned[0]["zeroshot"].get("tasks", {}))
    base = dense["acc"] if dense else 0.0
    scale = 100 if dense else 1
    se0 = dense.get("acc_stderr") if dense else None
    title = (f"mean acc over {len(tasks)} tasks — dense {base:.3f}" + (f" ± {se0:.3f}" if se0 is not None else "")
             if dense else f"mean acc over {len(tasks)} tasks (no dense evaluation)")
    panel = Panel(title, band=(-scale * se0, scale * se0) if se0 else None)
    for r in pruned:
        mean = r["zeroshot"]["mean"]
        value = scale * (mean["acc"] - base)
        err = scale * mean["acc_stderr"] if mean.get("acc_stderr") is not None else None
        panel.cells[((r["method"], r["pattern"]), (r["stage"], r["recon"]))] = Bar(
            value, err, gid(r["method"], r["pattern"], r["stage"], r["recon"]),
            text=f"{value:+.1f} ({mean['acc']:.3f})" if dense else f"{mean['acc']:.3f}")
    return grouped_bars_figure(
        order_groups([(r["method"], r["pattern"]) for r in pruned]),
        make_series([(r["stage"], r["recon"]) for r in pruned]), [panel],
        title="Zero-shot mean accuracy minus dense, ± 1 stderr (higher is better)" if dense
        else "Zero-shot mean accuracy, ± 1 stderr",
        xlabel="accuracy − dense accuracy, points" if dense else "accuracy", fmt=lambda v: f"{v:.1f}")


def _histograms(config, model_dir, checkpoints: list[Checkpoint]) -> Plot | None:
    """Weight-magnitude histograms of one linear: dense, then the first prune, the dense reconstruction
    and SDS of the first checkpoint's method and pattern (and its first reconstruction setting)."""
    if not checkpoints:
        return None
    import torch
    from safetensors.torch import load_file

    first = checkpoints[0]
    mine = [c for c in checkpoints if (c.method, c.pattern) == (first.method, first.pattern)
            and c.stage in ("prune1", "reconstruct", "sds")]
    recon = next((c.recon for c in mine if c.recon), "")
    mine = sorted((c for c in mine if c.recon in ("", recon)), key=lambda c: STAGE_ORDER.get(c.stage, 9))
    layer = config["report"]["histogram_layer"]
    suffix = config["report"]["histogram_linear"]
    dense = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        dense.update(load_file(str(f)))
    key = next((k for k in dense if f".{layer}." in k and k.endswith(f"{suffix}.weight")), None)
    series = [("dense", dense.get(key))]
    for ckpt in mine:
        series.append((ckpt.path.name, load_file(str(ckpt.path / "weights.safetensors")).get(key)))
    drawn = []
    for name, W in series:
        if W is None:
            continue
        values = W.float().abs().flatten()
        drawn.append((name, torch.log10(values[values > 0]).numpy()))
    return Plot("histograms.png", histogram_figure(drawn, str(key)),
                f"**Weight magnitudes** of `{key}` (decoder layer {layer}) at each stage of "
                f"{first.method} {first.pattern}: the dense reconstruction re-fills the positions the first "
                "prune removed; SDS shows which magnitudes the second prune keeps.")
