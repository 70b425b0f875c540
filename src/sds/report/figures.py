"""The report's figures, built from the run's results as matplotlib Figures (nothing written here; `plots`
draws them): perplexity increase over dense, per-linear errors, zero-shot accuracy, seconds per stage,
weight histograms (each histogram reads only the tensor it draws)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from ..core.layout import WEIGHTS
from ..storage.digests import sidecar
from ..storage.safetensors import SafetensorsFile, TensorReader
from .inputs import Checkpoint, layer_errors
from .plots import (STAGE_ORDER, Bar, LayerErrors, Panel, gid, grouped_bars_figure, layer_errors_figure, make_series,
                    order_groups, percent_text, wide_range)
from .stage_plots import histogram_figure, seconds_figure


@dataclass
class Plot:
    """One report figure: its file name, the Figure, and the sentence the Markdown says about it."""
    name: str
    figure: object
    caption: str


def figures(config: dict, results: list[dict], seconds: dict[str, float], checkpoints: list[Checkpoint],
            model_dir: str, errors: list[LayerErrors] | None = None) -> list[Plot]:
    """Every report figure the run has data for, as Figures (nothing written): the perplexity increase
    over dense, the per-linear errors, zero-shot accuracy, seconds per stage, weight histograms."""
    datasets = list(config["evaluate"]["datasets"])
    fig, linthresh = ppl_figure(results, datasets)
    has_dense = any(r["stage"] == "dense" for r in results)
    unit = ("in % of the dense perplexity (absolute perplexity in brackets), the unit of the tables below"
            if has_dense else "absolute perplexity (no dense evaluation to compare with)")
    axis = (f" The x axis is linear within ±{linthresh:g} % and logarithmic beyond: the increases span "
            f"{_span(results, datasets)}, and on a linear axis the widest bar would squeeze the rest."
            if linthresh is not None else "")
    plots = [Plot("ppl.png", fig,
                  f"**Perplexity increase over the dense model**, {unit}, one group per method and pattern: "
                  "compare the SDS bar with one-shot and one-shot + adjust in each group — the gap between those "
                  f"two bars and SDS is what the dense phase adds.{axis}")]
    errors = layer_errors(checkpoints) if errors is None else errors
    fig = layer_errors_figure(errors)
    log = fig is not None and fig.axes[0].get_yscale() == "log"  # linear where an error is exactly 0
    captions = {
        "layer_errors.png": (fig, "**Where SDS helps inside the model**: the relative output error of every linear "
                             f"after each stage ({'log' if log else 'linear'} scale; a grey line joins one linear's "
                             "stages): look for linears whose SDS marker sits clearly below one-shot + adjust — those "
                             "the dense phase improved."),
        "zeroshot.png": (zeroshot_figure(results),
                         "**Zero-shot mean accuracy minus dense**, in points, with ± 1 stderr bars (the grey band "
                         "is the dense model's ± 1 stderr): differences smaller than the error bars are noise."),
        "seconds.png": (seconds_figure(seconds),
                        "**Seconds per stage**, top to bottom in the order the pipeline runs them, the jobs of a "
                        "stage summed: the longest bars are where a run (and a re-run after a change to that "
                        "stage's settings) spends its time."),
    }
    plots += [Plot(name, fig, caption) for name, (fig, caption) in captions.items() if fig is not None]
    hist = _histograms(config, model_dir, checkpoints)
    if hist is not None:
        plots.append(hist)
    return plots


def _increases(results: list[dict], ds: str) -> dict[int, float]:
    """Index in `results` → the pruned checkpoint's perplexity increase over dense on `ds`, in %."""
    dense = next((r["ppl"][ds] for r in results if r["stage"] == "dense"), None)
    return {i: 100 * (r["ppl"][ds] / dense - 1) for i, r in enumerate(results) if r["method"] and dense}


def _span(results: list[dict], datasets: list[str]) -> str:
    values = [v for ds in datasets for v in _increases(results, ds).values() if math.isfinite(v)]
    return f"{percent_text(min(values))} to {percent_text(max(values))}" if values else "–"


def ppl_figure(results: list[dict], datasets: list[str]):
    """Perplexity increase over dense (%) per (method, pattern) and stage, one panel per dataset; a symmetric
    log x axis where the values span a wide range (plots.wide_range). Returns (Figure, its linear threshold
    or None for a linear axis)."""
    pruned = [r for r in results if r["method"]]
    groups = order_groups([(r["method"], r["pattern"]) for r in pruned])
    series = make_series([(r["stage"], r["recon"]) for r in pruned])
    panels, values = [], []
    for ds in datasets:
        dense = next((r["ppl"][ds] for r in results if r["stage"] == "dense"), None)
        increase = _increases(results, ds)
        panel = Panel(f"{ds}: dense PPL {dense:.3f}" if dense else f"{ds}: perplexity (no dense evaluation)")
        for i, r in enumerate(results):
            if not r["method"]:
                continue
            ppl = r["ppl"][ds]
            value = increase[i] if dense else ppl
            text = f"{percent_text(value)} ({ppl:.3f})" if dense else f"{ppl:.3f}"
            panel.cells[((r["method"], r["pattern"]), (r["stage"], r["recon"]))] = Bar(
                value, gid=gid(r["method"], r["pattern"], r["stage"], r["recon"]), text=text)
            values.append(value)
        panels.append(panel)
    has_dense = any(r["stage"] == "dense" for r in results)
    linthresh = wide_range(values) if has_dense else None
    xlabel = "perplexity increase over dense, %" if has_dense else "perplexity"
    if linthresh is not None:
        xlabel += f" (linear within ±{linthresh:g} %, logarithmic beyond)"
    return grouped_bars_figure(
        groups, series, panels,
        title="Perplexity increase over the dense model (lower is better)" if has_dense else "Perplexity",
        xlabel=xlabel, fmt=lambda v: f"{v:.1f}", symlog=linthresh), linthresh


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

    first = checkpoints[0]
    mine = [c for c in checkpoints if (c.method, c.pattern) == (first.method, first.pattern)
            and c.stage in ("prune1", "reconstruct", "sds")]
    recon = next((c.recon for c in mine if c.recon), "")
    mine = sorted((c for c in mine if c.recon in ("", recon)), key=lambda c: STAGE_ORDER.get(c.stage, 9))
    layer = config["report"]["histogram_layer"]
    suffix = config["report"]["histogram_linear"]
    key, dense = _dense_tensor(model_dir, lambda k: f".{layer}." in k and k.endswith(f"{suffix}.weight"))
    series = [("dense", dense)]
    for ckpt in mine:
        series.append((ckpt.path.name, _checkpoint_tensor(ckpt.path / WEIGHTS, key)))
    drawn = [(name, torch.log10(W.float().abs().flatten()[W.flatten() != 0]).numpy(), W.numel())
             for name, W in series if W is not None]
    return Plot("histograms.png", histogram_figure(drawn, str(key)),
                f"**Weight magnitudes** of `{key}` (decoder layer {layer}) at each stage of {first.method} "
                f"{first.pattern}, over each stage's non-zero weights. " + histogram_caption(dict(series)))


def histogram_caption(tensors: dict) -> str:
    """What the histograms show, counted from the tensors they draw (stage name → tensor or None): each
    curve's non-zero weights, and where the dense reconstruction and SDS put theirs against the first prune."""
    found = {name: W for name, W in tensors.items() if W is not None}
    if not found:
        return "No tensor of that name in the model."
    total = next(iter(found.values())).numel()
    nonzero = {name: int((W != 0).sum()) for name, W in found.items()}
    text = "Non-zero weights: " + "; ".join(f"{name} {n:,} of {total:,}" for name, n in nonzero.items()) + "."
    first = found.get("prune1")
    for name, verb in (("reconstruct", "The dense reconstruction"), ("sds", "SDS")):
        W = found.get(name)
        if first is None or W is None or W.shape != first.shape:
            continue
        kept, now = first != 0, W != 0
        filled, removed = int((now & ~kept).sum()), int((kept & ~now).sum())
        net = nonzero[name] - nonzero["prune1"]
        overall = (f"{net:,} more non-zeros than the first prune (denser)" if net > 0 else
                   f"{-net:,} fewer non-zeros than the first prune (sparser, not re-filled)" if net < 0 else
                   "as many non-zeros as the first prune")
        # the verdict first: a few re-filled positions must not read as "the dense phase re-fills"
        text += (f" {verb} holds {overall}, {100 * nonzero[name] / total:.1f} % non-zero against "
                 f"{100 * nonzero['prune1'] / total:.1f} %: it re-filled {filled:,} of the "
                 f"{total - nonzero['prune1']:,} positions the first prune removed and set {removed:,} of the "
                 f"{nonzero['prune1']:,} weights it kept to zero.")
    return text + (" Every linear's density per checkpoint: the section *Density and weight range of the linears*."
                   if "prune1" in found else "")


def _dense_tensor(model_dir, wanted) -> tuple[str | None, object]:
    """The first tensor (files in name order, names sorted) of the model folder whose name `wanted`
    accepts, read alone: (its name, the tensor), or (None, None). Files this project wrote are verified (the
    tensor read, where they record per-tensor digests)."""
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        reader = TensorReader(f, device="cpu", verify="per_tensor") if sidecar(f).is_file() else SafetensorsFile(f)
        try:
            key = next((k for k in sorted(reader.keys()) if wanted(k)), None)
            if key is not None:
                return key, reader[key]
        finally:
            reader.close()
    return None, None


def _checkpoint_tensor(weights_file: Path, key: str | None):
    """One tensor of a stage checkpoint (its bytes verified, not the whole file's), or None where it lacks it."""
    reader = TensorReader(weights_file, device="cpu", verify="per_tensor")
    try:
        return reader[key] if key is not None and key in reader else None
    finally:
        reader.close()
