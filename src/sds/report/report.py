"""The report: a Markdown table and CSVs of every evaluated checkpoint, seconds and bytes on disk per stage
(from Snakemake's benchmark files and the outputs the layout names), each checkpoint's linear densities and
weight range against the dense layers' (`weight_checks`) and the figures (`figures`): perplexity increase over
dense, per-linear relative errors by stage, zero-shot accuracy, seconds per stage, weight histograms."""
from __future__ import annotations

import csv
import io as _io
import json
from pathlib import Path

from ..core.layout import ZEROSHOT_SUMMARY_CSV
from ..core.patterns import pattern_from_slug
from ..storage.atomic import atomic_path, exclusive
from ..storage.documents import write_text
from .figures import figures
from .inputs import (benchmark_seconds, checkpoint_of, layer_errors, model_weights_bytes, output_bytes, read_evals,
                     sparsity_profiles, stage_outputs, weight_figures)
from .plots import STAGE_ORDER, LayerErrors, make_series, percent_text, save_png
from .stage_plots import job_order
from .webpage import report_html
from .weight_checks import weight_section

SUMMARY_COLUMNS = ["run", "model", "method", "pattern", "stage", "recon", "dataset", "ppl", "sparsity"]

# Zero-shot results go to their own CSVs (report/zeroshot.csv, results/zeroshot_summary.csv) so that the
# columns of table.csv / summary.csv stay as they are. task "mean" is the mean over the run's tasks.
ZEROSHOT_COLUMNS = ["run", "model", "method", "pattern", "stage", "recon", "task", "acc", "acc_stderr", "acc_norm",
                    "acc_norm_stderr", "n"]


def _csv_text(rows: list[dict], columns: list[str]) -> str:
    buf = _io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: row.get(c, "") for c in columns})
    return buf.getvalue()


def _merge_summary(path: Path, run: str, rows: list[dict], columns: list[str] = SUMMARY_COLUMNS) -> None:
    """results/summary.csv keeps one row per evaluated checkpoint of every run; this run's rows replace
    its previous ones. Reports of other runs may merge at the same time: each merge holds a lock from its
    read to its rename, so none loses another's rows or removes its temporary file."""
    with exclusive(path.with_name(f".{path.name}.lock")):
        kept = []
        if path.is_file():
            with path.open(newline="") as fh:
                kept = [r for r in csv.DictReader(fh) if r.get("run") != run]
        with atomic_path(path) as tmp:
            tmp.write_text(_csv_text(kept + rows, columns))


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
    seconds = benchmark_seconds(benchmarks)
    outputs = stage_outputs(benchmarks, checkpoints)
    sizes = output_bytes(outputs)
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
    zs = config["evaluate"]["zeroshot"]
    tasks = [zs["tasks"]] if isinstance(zs["tasks"], str) else zs["tasks"]
    lines = [f"# SDS report: run `{config['run']}`", "", f"Model: `{model}`. Perplexity protocol: "
             f"non-overlapping windows of {config['evaluate']['seqlen']} tokens, mean NLL → exp. "
             f"Calibration: {config['calibration']['nsamples']} × {config['calibration']['seqlen']} tokens "
             f"from `{config['calibration']['source']}`.", "",
             "zero-shot: " + (f"on ({', '.join(f'`{t}`' for t in tasks)})" if zs["enabled"] else
                              "off (`evaluate.zeroshot.enabled: false`): no zero-shot accuracy was measured"), "",
             "In MLflow's artifact view open `report.html`: the same report with its figures inlined (MLflow's "
             "Markdown preview shows no image that report.md links by a relative path).", ""]
    lines += figure_lines("ppl.png")
    for ds in datasets:
        lines += _perplexity_section(results, ds, dense[ds])
    lines += _profile_section(sparsity_profiles(ckpts), results)
    lines += _layer_error_section(errors)
    lines += figure_lines("layer_errors.png")
    lines += weight_section(weight_figures(ckpts))
    zs_rows = _zeroshot_rows(config, model, results)
    with atomic_path(out / "zeroshot.csv") as tmp:
        tmp.write_text(_csv_text(zs_rows, ZEROSHOT_COLUMNS))
    _merge_summary(summary_csv.with_name(Path(ZEROSHOT_SUMMARY_CSV).name), config["run"], zs_rows, ZEROSHOT_COLUMNS)
    lines += _zeroshot_section(results) if zs["enabled"] else []
    lines += figure_lines("zeroshot.png")
    lines += ["## Seconds per stage (each stage's measured time, as its MLflow run shows it) and bytes on disk", "",
              "Bytes: the sizes of the files of each job's output (folder, or file with its checksums) as they "
              "are now.", "",
              "| stage | job | seconds | bytes on disk |", "|---|---|---|---|"]
    for key in job_order(seconds):  # the order the pipeline runs them
        stage, job = key.split("/", 1)
        lines.append(f"| {stage} | {job} | {seconds[key]:.1f} | {_bytes_cell(sizes.get(key))} |")
    total = sum(seconds.values())
    written = sum(sizes[k] for k in seconds if k in sizes)
    lines += [f"| **total** | | **{total:.1f}** | **{_bytes_cell(written)}** |", ""]
    weights = model_weights_bytes(model_dir)
    lines += _bytes_section(outputs, sizes, weights)
    lines += figure_lines("seconds.png")
    lines += ["Per-stage sparsity and pattern checks: see `table.csv` and the `evaluate` JSON files.", ""]
    lines += figure_lines("histograms.png")
    text = "\n".join(lines).rstrip("\n") + "\n"
    write_text(out / "report.md", text)
    write_text(out / "report.html", report_html(text, out, f"SDS report: run {config['run']}"))
    write_text(out / "seconds.json", json.dumps(seconds, indent=2, sort_keys=True) + "\n")
    write_text(out / "bytes.json", json.dumps({"stages": sizes, "model_weights": weights}, indent=2, sort_keys=True)
               + "\n")
    return [str(out / "report.md"), str(out / "report.html"), str(table_csv), str(out / "zeroshot.csv"), *saved]


def _perplexity_section(results: list[dict], ds: str, dense: float | None) -> list[str]:
    """One row per (method, pattern, SDS setting): the increase over the dense perplexity in % (ppl.png's
    unit and its bar labels' text), SDS − one-shot in points of that %, then the absolute perplexities."""
    def pct(r):
        return percent_text(100 * (r["ppl"][ds] / dense - 1)) if r and dense else "–"

    def ppl(r):
        return f"{r['ppl'][ds]:.3f}" if r else "–"

    unit = "increase over the dense perplexity, %" if dense else "no dense evaluation: no increase in %"
    lines = [f"## Perplexity on `{ds}` (dense {dense:.3f})" if dense else f"## Perplexity on `{ds}`", "",
             f"One-shot, one-shot + adjust, SDS: {unit} (as in ppl.png); SDS − one-shot: the difference of "
             "those, in points; then the absolute perplexities.", "",
             "| method | pattern | recon | one-shot | one-shot + adjust | SDS | SDS − one-shot, points | PPL one-shot | "
             "PPL one-shot + adjust | PPL SDS | sparsity (SDS) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for method, pattern in sorted({(r["method"], r["pattern"]) for r in results if r["method"]}):
        group = [r for r in results if (r["method"], r["pattern"]) == (method, pattern)]
        first = next((r for r in group if r["stage"] == "prune1"), None)
        adj = next((r for r in group if r["stage"] == "prune1+adjust"), None)
        for sds in [r for r in group if r["stage"] == "sds"] or [None]:
            delta = f"{100 * (sds['ppl'][ds] - first['ppl'][ds]) / dense:+.2f}" if sds and first and dense else "–"
            sparsity = f"{sds['sparsity']:.4f}" if sds else "–"
            lines.append(f"| {method} | {pattern} | {sds['recon'] if sds else '–'} | {pct(first)} | {pct(adj)} | "
                         f"{pct(sds)} | {delta} | {ppl(first)} | {ppl(adj)} | {ppl(sds)} | {sparsity} |")
    return lines + [""]


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _bytes_cell(n: int | None) -> str:
    """Exact bytes and their size in binary units, or – for an output not on disk (or not known)."""
    return "–" if n is None else f"{n:,} ({_human(n)})"


def _pattern_name(slug: str) -> str:
    try:
        return str(pattern_from_slug(slug))
    except ValueError:
        return slug


def _bytes_section(outputs: dict, sizes: dict[str, int], weights: int | None) -> list[str]:
    """Bytes on disk per (method, pattern) (its checkpoints, statistics, reconstructions, evaluations) and
    of the stages every method shares, each also as a multiple of the source model's weights."""
    if not sizes:
        return []
    groups: dict[tuple[str, str], int] = {}
    for job, n in sizes.items():
        key = (outputs[job].method, outputs[job].pattern)
        groups[key] = groups.get(key, 0) + n

    def times(n: int) -> str:
        return f"{n / weights:.2f}×" if weights else "–"

    lines = ["## Bytes on disk per method and pattern", "",
             f"Source model weights (`*.safetensors`): {_bytes_cell(weights)}.", "",
             "| method | pattern | bytes on disk | × model weights |", "|---|---|---|---|"]
    for method, slug in sorted(k for k in groups if k[0]):
        n = groups[(method, slug)]
        lines.append(f"| {method} | {_pattern_name(slug)} | {_bytes_cell(n)} | {times(n)} |")
    if ("", "") in groups:
        lines.append(f"| (shared) | | {_bytes_cell(groups[('', '')])} | {times(groups[('', '')])} |")
    total = sum(groups.values())
    return lines + [f"| **total** | | **{_bytes_cell(total)}** | **{times(total)}** |", ""]


def _profile_section(profiles: dict[tuple[str, str], dict], results: list[dict]) -> list[str]:
    """Per-layer sparsity (OWL): each layer's outlier fraction, its ratio (prune1 and prune2 prune to it) and
    the exact-zero fractions the evaluations measured, per (method, pattern) with a non-uniform profile."""
    if not profiles:
        return []
    lines = ["## Per-layer sparsity (OWL)", "",
             "`prune.sparsity_profile: owl` (Yin et al., ICML 2024): each decoder layer's outlier fraction (the "
             "share of its Wanda scores |W|·‖X‖ above M × their mean, on the dense model's calibration inputs) "
             "sets its sparsity: more outliers, lower sparsity, within the pattern's ratio ± λ, their plain mean "
             "over the layers the pattern's ratio. Achieved: the exact-zero fraction of the layer's linears in "
             "the evaluated checkpoint.", ""]
    for (method, pattern), profile in sorted(profiles.items()):
        owl = profile.get("owl", {})
        ratios = profile["layer_sparsity"]
        achieved = {r["stage"]: r.get("sparsity_per_layer", {}) for r in results
                    if (r["method"], r["pattern"]) == (method, pattern) and r["stage"] in ("prune1", "sds")}
        lines += [f"per-layer sparsity (OWL) of {method} {pattern} (M = {owl.get('threshold', '–')}, "
                  f"λ = {owl.get('lambda', '–')}): " + ", ".join(f"{i}: {r:.4f}" for i, r in enumerate(ratios))
                  + f"; mean {sum(ratios) / len(ratios):.4f}", "",
                  "| layer | outlier fraction | OWL ratio | achieved, one-shot | achieved, SDS |", "|---|---|---|---|---|"]
        fractions = owl.get("outlier_fraction", [])

        def cell(stage, i):
            value = achieved.get(stage, {}).get(str(i), achieved.get(stage, {}).get(i))
            return "–" if value is None else f"{value:.4f}"

        for i, ratio in enumerate(ratios):
            fraction = f"{fractions[i]:.4f}" if i < len(fractions) else "–"
            lines.append(f"| {i} | {fraction} | {ratio:.4f} | {cell('prune1', i)} | {cell('sds', i)} |")
        lines.append("")
    return lines


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
