"""The report's section on what each checkpoint's linears hold: their density (non-zero fraction; is the
dense phase dense?) and max|W| / max|W_dense| (did a solver blow a weight up?), with the check that no
linear passes BLOWUP times the dense layer's largest weight."""
from __future__ import annotations

from .inputs import WeightFigures
from .plots import STAGE_LABELS, STAGE_ORDER

# max|W| / max|W_dense| past which a linear is flagged: ADMM's scaled space once gave 77× on near-silent
# input channels (bench/norm_floor_probe.py); a refit that stays near the dense weights stays well below 2×.
BLOWUP = 2.0


def linear_label(name: str) -> str:
    """`model.decoder.layers.3.fc1.weight` → `layer 3 fc1`: the layer index and what follows it."""
    parts = name.removesuffix(".weight").split(".")
    at = next((i for i, p in enumerate(parts) if p.isdigit()), None)
    return name if at is None else f"layer {parts[at]} {'.'.join(parts[at + 1:])}"


def _order(f: WeightFigures):
    return f.method, f.pattern, STAGE_ORDER.get(f.stage, 9), f.recon


def _percent(x: float) -> str:
    return f"{100 * x:.1f} %"


def _row(f: WeightFigures) -> str:
    densities = f.density
    sparsest = min(densities, key=densities.get)
    peak = max(f.max_abs_ratio, key=f.max_abs_ratio.get)
    over = sum(r > BLOWUP for r in f.max_abs_ratio.values())
    return (f"| {f.method} | {f.pattern} | {f.recon or '–'} | {STAGE_LABELS.get(f.stage, f.stage)} | {len(densities)} "
            f"| {_percent(sum(densities.values()) / len(densities))} | {_percent(densities[sparsest])} "
            f"(`{linear_label(sparsest)}`) | {f.max_abs_ratio[peak]:.2f}× (`{linear_label(peak)}`) | {over} |")


def _check_line(found: list[WeightFigures]) -> str:
    """The check, stated whichever way it comes out: every linear within BLOWUP× or the ones that are not."""
    over = [(f, name, r) for f in found for name, r in f.max_abs_ratio.items() if r > BLOWUP]
    if not over:
        f, name = max(((f, n) for f in found for n in f.max_abs_ratio), key=lambda fn: fn[0].max_abs_ratio[fn[1]])
        return (f"**Check passed**: every linear of every checkpoint keeps `max|W|` within {BLOWUP:g}× the dense "
                f"layer's (largest {f.max_abs_ratio[name]:.2f}×, `{linear_label(name)}` of {f.method} {f.pattern} "
                f"{STAGE_LABELS.get(f.stage, f.stage)}).")
    over.sort(key=lambda item: -item[2])
    shown = "; ".join(f"{f.method} {f.pattern} {STAGE_LABELS.get(f.stage, f.stage)}{f' ({f.recon})' if f.recon else ''} "
                      f"`{linear_label(name)}` {r:.2f}×" for f, name, r in over[:10])
    more = f" and {len(over) - 10} more" if len(over) > 10 else ""
    count = "1 linear holds" if len(over) == 1 else f"{len(over)} linears hold"
    return f"**Check FAILED**: {count} a weight over {BLOWUP:g}× the dense layer's largest: {shown}{more}."


def _dense_phase_lines(found: list[WeightFigures]) -> list[str]:
    """For each dense reconstruction, its mean density against its first prune's: denser or not."""
    firsts = {(f.method, f.pattern): f for f in found if f.stage == "prune1"}
    lines = []
    for f in found:
        first = firsts.get((f.method, f.pattern))
        if f.stage != "reconstruct" or first is None:
            continue
        now, before = (sum(x.density.values()) / len(x.density) for x in (f, first))
        verdict = ("denser than the first prune: it re-activated weights the first prune removed" if now > before
                   else "sparser than the first prune: its L1 term zeroed more weights than it re-activated"
                   if now < before else "as dense as the first prune")
        lines.append(f"- {f.method} {f.pattern} (`{f.recon}`): the dense reconstruction's linears hold "
                     f"{_percent(now)} non-zero weights on average, the first prune's {_percent(before)}: "
                     f"{verdict}.")
    return lines + [""] if lines else []


def weight_section(found: list[WeightFigures]) -> list[str]:
    """The Markdown section: one row per checkpoint, the check line, the dense phase against the first prune."""
    if not found:
        return []
    found = sorted(found, key=_order)
    lines = ["## Density and weight range of the linears", "",
             "Per checkpoint (each linear's figures in its `layers.json`): the density (non-zero fraction) of "
             "its linears, their mean and the sparsest one; the peak ratio `max|W| / max|W_dense|` (a linear's "
             f"largest weight over the dense layer's) and the linear it belongs to; how many linears pass "
             f"{BLOWUP:g}×.", "",
             "| method | pattern | recon | checkpoint | linears | mean density | min density | peak ratio | "
             f"over {BLOWUP:g}× |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [_row(f) for f in found]
    return lines + ["", _check_line(found), ""] + _dense_phase_lines(found)
