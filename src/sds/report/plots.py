"""The report's figures, built from plain data (no file reading) as matplotlib Figures on the Agg canvas.

Every builder returns a Figure (or None when the run has nothing to draw) sized from what it draws:
one fixed height per bar and per small-multiple panel, so tick labels keep the same spacing whatever
the number of methods, patterns, stages or layers. `save_png` writes one deterministically (no
software/version or time in the PNG metadata). Bars and markers carry a gid "method|pattern|stage|recon"
so what a figure draws can be read back from the Figure itself."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FixedFormatter, FixedLocator, FuncFormatter, LogLocator, NullLocator

from ..storage.atomic import atomic_path

DPI = 120
STAGE_ORDER = {"dense": 0, "prune1": 1, "prune1+adjust": 2, "reconstruct": 3, "sds": 4}
STAGE_LABELS = {"prune1": "one-shot", "prune1+adjust": "one-shot + adjust", "reconstruct": "dense reconstruction",
                "sds": "SDS"}
STAGE_COLORS = {"prune1": "#d62728", "prune1+adjust": "#ff7f0e", "reconstruct": "#1f77b4", "sds": "#2ca02c"}
STAGE_MARKERS = {"prune1": "v", "prune1+adjust": "s", "reconstruct": "D", "sds": "o"}
# stages (or further recon settings) the palette above does not name, in order of appearance
EXTRA_COLORS = ["#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f", "#1f77b4"]
EXTRA_MARKERS = ["^", "P", "X", "*", "h", "<", ">"]
# the order of the pipeline's stages in the seconds chart (benchmark folder names); others follow by name
PIPELINE_ORDER = ["corpus", "build_model", "calibration", "activations", "prune1", "prune1_adjust", "reconstruct",
                  "reconstruct_layer", "reconstruct_gather", "prune2", "zeroshot_tasks", "evaluate", "report"]

BAR_IN = 0.22  # height of one bar, inches
GROUP_GAP_IN = 0.25  # space between two (method, pattern) groups, inches
FONT = 9


def new_figure(width_in: float, height_in: float) -> Figure:
    """A Figure on its own Agg canvas (no pyplot state: nothing to close, safe in any thread)."""
    fig = Figure(figsize=(width_in, height_in), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Figure, path: str | Path) -> str:
    """Writes `fig` atomically; the same figure gives the same bytes (no Software/date metadata)."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, metadata={"Software": None})
    return str(path)


@dataclass(frozen=True)
class Series:
    """One kind of bar in every group: a stage (with its reconstruction setting, for SDS)."""
    stage: str
    recon: str = ""
    label: str = ""
    color: str = "#7f7f7f"
    marker: str = "o"

    @property
    def key(self) -> tuple[str, str]:
        return self.stage, self.recon


@dataclass
class Bar:
    value: float
    err: float | None = None
    gid: str = ""
    text: str = ""


def gid(method: str, pattern: str, stage: str, recon: str = "") -> str:
    return f"{method}|{pattern}|{stage}|{recon}"


def make_series(keys: list[tuple[str, str]]) -> list[Series]:
    """Series for (stage, recon) keys in pipeline order. The recon setting is named in the label only
    when a stage has more than one (a sweep over reconstruction settings)."""
    keys = sorted(set(keys), key=lambda k: (STAGE_ORDER.get(k[0], len(STAGE_ORDER)), k[0], k[1]))
    per_stage = {}
    for stage, recon in keys:
        per_stage.setdefault(stage, []).append(recon)
    out, extra = [], 0
    for stage, recon in keys:
        label = STAGE_LABELS.get(stage, stage)
        if len(per_stage[stage]) > 1:
            label += f" ({recon})"
        first_of_stage = per_stage[stage][0] == recon
        if stage in STAGE_COLORS and first_of_stage:
            color, marker = STAGE_COLORS[stage], STAGE_MARKERS[stage]
        else:
            color, marker = EXTRA_COLORS[extra % len(EXTRA_COLORS)], EXTRA_MARKERS[extra % len(EXTRA_MARKERS)]
            extra += 1
        out.append(Series(stage, recon, label, color, marker))
    return out


def order_groups(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """(method, pattern) groups, pattern-major so every method at one pattern sits together; patterns and
    methods in the order they first appear (the config's order)."""
    patterns, methods = [], []
    for method, pattern in pairs:
        patterns += [pattern] if pattern not in patterns else []
        methods += [method] if method not in methods else []
    present = set(pairs)
    return [(m, p) for p in patterns for m in methods if (m, p) in present]


def group_label(method: str, pattern: str) -> str:
    return f"{method} · {pattern}"


# --- grouped horizontal bars (perplexity, zero-shot) -------------------------------------------------------


@dataclass
class Panel:
    """One axes of grouped bars: cells[(group, series key)] → Bar."""
    title: str
    cells: dict = field(default_factory=dict)
    band: tuple[float, float] | None = None  # a shaded reference band around 0 (dense ± stderr)


def _text_px(fig: Figure, text: str, size: float) -> float:
    """Rendered width of `text` in pixels (font metrics only, nothing drawn)."""
    from matplotlib.font_manager import FontProperties

    return fig.canvas.get_renderer().get_text_width_height_descent(text, FontProperties(size=size), ismath=False)[0]


def _label_room(fig: Figure, panels: list[Panel], fmt, axes_px: float) -> list[tuple[float, float]]:
    """Per panel, the x limits that keep every bar's value label (beside its bar or error bar) inside the
    axes: a label of L px at the end of a bar needs L/axes_px of the axes width beyond the bar's end."""
    pad = 2 * fig.dpi / 72 + 4  # bar_label's padding (2 pt) and a little air
    limits = []
    for panel in panels:
        cells = [c for c in panel.cells.values() if math.isfinite(c.value)]
        ends_hi = [c.value + (c.err or 0) for c in cells if c.value >= 0]
        ends_lo = [c.value - (c.err or 0) for c in cells if c.value < 0]
        right = max([0.0, *ends_hi, *(panel.band[1:] if panel.band else [])])
        left = min([0.0, *ends_lo, *(panel.band[:1] if panel.band else [])])
        r = max([(_text_px(fig, c.text or fmt(c.value), 7) + pad) / axes_px for c in cells if c.value >= 0], default=0)
        lo = max([(_text_px(fig, c.text or fmt(c.value), 7) + pad) / axes_px for c in cells if c.value < 0], default=0)
        r, lo = r + 0.02, lo + (0.02 if ends_lo else 0)
        span = (right - left) or 1.0
        total = span / max(1 - r - lo, 0.2)
        limits.append((left - lo * total, right + r * total))
    return limits


def grouped_bars_figure(groups: list[tuple[str, str]], series: list[Series], panels: list[Panel], *,
                        title: str, xlabel: str, fmt, width_in: float = 8.0) -> Figure:
    """Horizontal grouped bars, one group per (method, pattern), one bar per series, one axes per panel.
    Group labels are horizontal and every group gets len(series) × BAR_IN + GROUP_GAP_IN inches, more
    than a label's height, so labels cannot overlap however many groups there are; the figure is made
    wide enough, and the x limits wide enough, for every value label to sit inside its axes."""
    n = max(len(series), 1)
    group_in = n * BAR_IN + GROUP_GAP_IN
    axes_in = [len(groups) * group_in for _ in panels]
    height = sum(axes_in) + 0.75 * len(panels) + 0.9 + 0.22 * math.ceil(n / 4)
    fig = new_figure(width_in, height)
    # the axes' width: the figure less the group labels and the frame's padding (an underestimate)
    labels_px = max([_text_px(fig, group_label(*g), FONT) for g in groups], default=0)
    value_px = max([_text_px(fig, c.text or fmt(c.value), 7) for p in panels for c in p.cells.values()], default=0)
    width_in = max(width_in, (labels_px + 3 * value_px) / fig.dpi + 0.8)  # bars get at least a third
    fig.set_size_inches(width_in, height)
    axes_px = width_in * fig.dpi - labels_px - 0.8 * fig.dpi
    limits = _label_room(fig, panels, fmt, axes_px)
    gs = fig.add_gridspec(len(panels), 1, height_ratios=axes_in)
    pitch = 1.0 / (n + GROUP_GAP_IN / BAR_IN)  # one bar in y units (one group = 1)
    handles = {}
    for row, panel in enumerate(panels):
        ax = fig.add_subplot(gs[row, 0])
        ax.set_autoscale_on(False)
        ax.set_xlim(*limits[row])
        ax.set_ylim(len(groups) - 0.5, -0.5)
        for j, s in enumerate(series):
            ys, xs, errs, bars_meta = [], [], [], []
            for i, g in enumerate(groups):
                cell = panel.cells.get((g, s.key))
                if cell is None:
                    continue
                y = i + (j - (n - 1) / 2) * pitch
                if not math.isfinite(cell.value):  # a diverged checkpoint: say so instead of a bar
                    ax.annotate("not finite", (0, y), xytext=(3, 0), textcoords="offset points", va="center",
                                fontsize=7, gid=cell.gid, color=s.color)
                    continue
                ys.append(y), xs.append(cell.value), errs.append(cell.err), bars_meta.append(cell)
            if not xs:
                continue
            xerr = [e or 0.0 for e in errs] if any(e is not None for e in errs) else None
            bars = ax.barh(ys, xs, height=pitch * 0.92, xerr=xerr, color=s.color, label=s.label, zorder=2,
                           error_kw={"ecolor": "#333333", "elinewidth": 0.8, "capsize": 2, "zorder": 3})
            for patch, cell in zip(bars.patches, bars_meta):
                patch.set_gid(cell.gid)
            ax.bar_label(bars, labels=[c.text or fmt(c.value) for c in bars_meta], padding=2, fontsize=7)
            handles.setdefault(s.label, bars)
        if panel.band is not None:
            ax.axvspan(*panel.band, color="#000000", alpha=0.08, lw=0, zorder=1, gid="dense-band")
        ax.axvline(0, color="#000000", lw=0.8, zorder=3)
        for i in range(1, len(groups)):  # a faint rule where the pattern changes
            if groups[i][1] != groups[i - 1][1]:
                ax.axhline(i - 0.5, color="#bbbbbb", lw=0.8)
        ax.set_yticks(range(len(groups)), [group_label(*g) for g in groups], fontsize=FONT)
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(axis="x", color="#e5e5e5", lw=0.6, zorder=0)
        ax.set_axisbelow(True)
        ax.set_title(panel.title, fontsize=FONT + 1, loc="left")
        ax.set_xlabel(xlabel, fontsize=FONT)
    fig.suptitle(title, fontsize=FONT + 2)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncols=min(len(handles), 4),
                   fontsize=FONT, frameon=False)
    return fig


# --- per-layer, per-linear relative error ------------------------------------------------------------------

_LAYER = re.compile(r"(?:^|\.)(\d+)\.(.+?)(?:\.weight)?$")


def split_linear_name(name: str) -> tuple[int, str]:
    """'model.decoder.layers.3.self_attn.q_proj.weight' → (3, 'self_attn.q_proj')."""
    m = _LAYER.search(name)
    return (int(m.group(1)), m.group(2)) if m else (0, name)


@dataclass
class LayerErrors:
    """Relative output error of every linear of one checkpoint (its layers.json `rel_error`s)."""
    method: str
    pattern: str
    stage: str
    recon: str
    errors: dict[str, float]


def _short(names: list[str]) -> list[str]:
    """Last name component when that is unique (q_proj, fc1), else the whole name within the layer."""
    last = [n.rsplit(".", 1)[-1] for n in names]
    return last if len(set(last)) == len(last) else names


def layer_errors_figure(records: list[LayerErrors], *, panel_in: tuple[float, float] = (3.4, 2.3)) -> Figure | None:
    """Small multiples, one panel per (method, pattern) (rows: methods, columns: patterns): the relative
    output error of every linear (x: decoder layer, its linears side by side) after each stage, on one
    log y scale for all panels. A thin line joins one linear's stages, so its drop from one-shot to SDS
    reads as the line's length. Limits are set, not autoscaled: autoscaling shared axes costs seconds
    per figure once there are dozens of panels."""
    records = [r for r in records if r.errors]
    if not records:
        return None
    groups = order_groups([(r.method, r.pattern) for r in records])
    methods = list(dict.fromkeys(m for m, _ in groups))
    patterns = list(dict.fromkeys(p for _, p in groups))
    series = make_series([(r.stage, r.recon) for r in records])
    parsed = {name: split_linear_name(name) for r in records for name in r.errors}
    layers = sorted({layer for layer, _ in parsed.values()})
    within = sorted({short for _, short in parsed.values()})
    width = len(within) + 1  # slots per decoder layer: its linears and a gap
    slot = {name: layers.index(layer) * width + within.index(short) for name, (layer, short) in parsed.items()}
    centers = [k * width + (len(within) - 1) / 2 for k in range(len(layers))]
    n_slots = len(layers) * width
    pw = min(max(panel_in[0], 0.06 * n_slots + 1.0), 4.5)
    order = ", ".join(_short(within)[:12]) + (", …" if len(within) > 12 else "")
    xlabel = f"decoder layer (its linears left to right: {order})"
    title = "Relative output error of every linear, by stage (calibration data)"
    fig = new_figure(pw * len(patterns) + 0.9, panel_in[1] * len(methods) + 1.5)
    # wide enough for the title, the axis label and the legend in one row, whatever the panel count
    legend_px = sum(_text_px(fig, s.label, FONT) + 4 * FONT for s in series[:4])
    need_px = max(_text_px(fig, title, FONT + 2), _text_px(fig, xlabel, FONT), legend_px) + 0.4 * fig.dpi
    fig.set_size_inches(max(pw * len(patterns) + 0.9, need_px / fig.dpi), panel_in[1] * len(methods) + 1.5)
    axes = fig.subplots(len(methods), len(patterns), squeeze=False)
    values = [v for r in records for v in r.errors.values() if math.isfinite(v)] or [0.0, 1.0]
    lo, hi = min(values), max(values)
    log = lo > 0
    ylim = (lo / 1.4, hi * 1.4) if log else (lo - 0.05 * (hi - lo or 1), hi + 0.05 * (hi - lo or 1))
    offsets = {s.key: (j - (len(series) - 1) / 2) * min(0.8 / max(len(series), 1), 0.3) for j, s in enumerate(series)}
    # one label per decoder layer, thinned so labels stay at least 0.35 in apart whatever the depth
    step = max(1, math.ceil(len(layers) / max(1, int((pw - 0.6) / 0.35))))
    handles = {}
    drawn = set()
    for (method, pattern) in groups:
        row, col = methods.index(method), patterns.index(pattern)
        drawn.add((row, col))
        ax = axes[row][col]
        ax.set_autoscale_on(False)
        if log:
            ax.set_yscale("log")
        ax.set_xlim(-1, n_slots - 1)
        ax.set_ylim(*ylim)
        span = {}
        for s in series:
            for r in (r for r in records if (r.method, r.pattern, r.stage, r.recon) == (method, pattern, *s.key)):
                names = sorted(r.errors, key=lambda n: slot[n])
                ys = [r.errors[n] for n in names]
                for n, y in zip(names, ys):
                    a, b = span.get(n, (y, y))
                    span[n] = (min(a, y), max(b, y))
                pts = ax.scatter([slot[n] + offsets[s.key] for n in names], ys, s=16, marker=s.marker, color=s.color,
                                 label=s.label, zorder=3, linewidths=0.4, edgecolors="white",
                                 gid=gid(method, pattern, r.stage, r.recon))
                handles.setdefault(s.label, pts)
        ax.vlines([slot[n] for n in span], [v[0] for v in span.values()], [v[1] for v in span.values()],
                  color="#999999", lw=0.6, zorder=2)
        ax.vlines([k * width - 1 for k in range(1, len(layers))], 0, 1, transform=ax.get_xaxis_transform(),
                  color="#dddddd", lw=0.6, zorder=1)
        ax.set_title(group_label(method, pattern), fontsize=FONT, loc="left")
        ax.xaxis.set_major_locator(FixedLocator(centers[::step]))
        ax.xaxis.set_major_formatter(FixedFormatter([str(layer) for layer in layers[::step]]))
        if log:
            decades = math.log10(hi / lo) if hi > lo else 0
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0) if decades <= 2.5 else (1.0,)))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_locator(NullLocator())  # no minor ticks: the 1-2-5 majors and grid suffice
        ax.grid(axis="y", which="major", color="#e5e5e5", lw=0.6)
        ax.tick_params(labelsize=8)
    for row in range(len(methods)):
        for col in range(len(patterns)):
            ax = axes[row][col]
            if (row, col) not in drawn:
                ax.set_visible(False)
                continue
            # tick labels on the outer panels only (all panels share both scales)
            ax.tick_params(labelleft=not any((row, c) in drawn for c in range(col)),
                           labelbottom=not any((r, col) in drawn for r in range(row + 1, len(methods))))
    fig.supxlabel(xlabel, fontsize=FONT)
    fig.supylabel("relative output error (log)" if log else "relative output error", fontsize=FONT)
    # the title heads the legend: constrained layout would stack a suptitle onto an outside legend
    fig.legend(list(handles.values()), list(handles), loc="outside upper center", ncols=min(len(handles), 4),
               fontsize=FONT, frameon=False, title=title, title_fontsize=FONT + 2, markerscale=1.6)
    return fig


# --- seconds per stage ---------------------------------------------------------------------------------------


def seconds_figure(seconds: dict[str, float]) -> Figure | None:
    """One horizontal bar per pipeline stage: its jobs' benchmark wall seconds summed (stage-seconds,
    so jobs that ran side by side count in full)."""
    if not seconds:
        return None
    per_stage: dict[str, list[float]] = {}
    for key, s in seconds.items():
        per_stage.setdefault(key.split("/", 1)[0], []).append(s)
    rank = {name: i for i, name in enumerate(PIPELINE_ORDER)}
    stages = sorted(per_stage, key=lambda s: (rank.get(s, len(rank)), s))
    totals = [sum(per_stage[s]) for s in stages]
    fig = new_figure(6.5, 0.3 * len(stages) + 1.2)
    ax = fig.add_subplot()
    bars = ax.barh(range(len(stages)), totals, height=0.7, color="#4c72b0")
    for patch, stage in zip(bars.patches, stages):
        patch.set_gid(stage)
    ax.bar_label(bars, labels=[f"{t:.1f} s" + (f" · {len(per_stage[s])} jobs" if len(per_stage[s]) > 1 else "")
                               for s, t in zip(stages, totals)], padding=3, fontsize=7)
    ax.set_yticks(range(len(stages)), stages, fontsize=FONT)
    ax.set_ylim(len(stages) - 0.5, -0.5)
    ax.margins(x=0.25)
    ax.set_xlim(left=0)
    ax.tick_params(axis="x", labelsize=8)
    ax.grid(axis="x", color="#e5e5e5", lw=0.6)
    ax.set_axisbelow(True)
    ax.set_xlabel("seconds (each job's measured time, summed over the stage's jobs)", fontsize=FONT)
    ax.set_title(f"Seconds per stage (total {sum(totals):.1f} stage-seconds)", fontsize=FONT + 2)
    return fig


# --- weight histograms ---------------------------------------------------------------------------------------


def histogram_figure(series: list[tuple[str, object]], weight_name: str) -> Figure:
    """Step histograms of log10 |w| over the non-zero weights, one per (stage name, numpy values)."""
    import numpy as np

    fig = new_figure(7, 4)
    ax = fig.add_subplot()
    finite = [v for _, v in series if len(v)]
    # one set of bin edges for every stage, so the counts compare bar for bar
    edges = np.linspace(min(float(v.min()) for v in finite), max(float(v.max()) for v in finite), 81) \
        if finite else 80
    for name, log_values in series:
        ax.hist(log_values, bins=edges, histtype="step", label=name)
    ax.set_xlabel(f"log10 |w|  ({weight_name})", fontsize=FONT)
    ax.set_ylabel("count (non-zero weights)", fontsize=FONT)
    ax.tick_params(labelsize=8)
    ax.legend(fontsize=FONT)
    ax.set_title("Weight magnitudes by stage", fontsize=FONT + 2)
    return fig
