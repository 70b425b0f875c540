"""Layer-wise solvers side by side on REAL input statistics of a pretrained model (SmolLM2-135M).

    git --git-dir=/work/.mirror/mazumder-lab+ALPS/repo archive HEAD | tar x -C /tmp/ref-alps
    git --git-dir=/work/.mirror/fmfi-compbio+admm-pruning/repo archive HEAD | tar x -C /tmp/ref-admm
    git --git-dir=/work/.mirror/IST-DASLab+sparsegpt/repo archive HEAD | tar x -C /tmp/ref-sparsegpt
    nice .venv/bin/python bench/solver_bench.py --model /work/main/models/smollm2-135m \
        --text ../shared/assets/wikitext-2-v1/valid.txt \
        --reference-sparsegpt /tmp/ref-sparsegpt --reference-admm /tmp/ref-admm --reference-alps /tmp/ref-alps
    # ours against reference ALPS / ADMM per linear (mkdir the /tmp folders before the tar x above)
    .venv/bin/python bench/solver_bench.py --sections pruners --methods alps ref-alps admm ref-admm \
        --reference-alps /tmp/ref-alps --reference-admm /tmp/ref-admm --layers 0 12 24 \
        --stats-cache /tmp/smollm-stats.safetensors
    # diagnosis: extra columns, our pruner with changed `prune` settings (KEY=VALUE, a/b/c for rho_growth)
    ... --variants "alps:alps_norm_floor=0" "alps:alps_damping=inputs,alps_norm_floor=0" "admm:admm_norm_floor=0"

Captures H = E[x xᵀ] of every linear of the chosen decoder layers (`--linears`: only these names within a
layer, e.g. q_proj down_proj) of the DENSE model by forward hooks (calibration: `--nsamples` windows ×
`--seqlen` tokens; a second, disjointly seeded set of windows gives held-out statistics; bench/layer_stats.py),
then per linear kind prints, side by side in one run:

1. one-shot pruners (sparsegpt / wanda / magnitude / admm / alps, plus the reference SparseGPT
   `fasterprune`, reference ADMM `AdmmPruner.fasterprune` and reference ALPS `ALPS_prune.ALPS_admm` when
   checkouts are given, bench/reference_solvers.py; then each `--variants` column) at 2:4 and 50 %: relative
   output error tr(D H Dᵀ)/tr(W H Wᵀ), D = W − Ŵ, on the calibration statistics and on the held-out ones,
   seconds, the fraction of zeros (INVALID where the N:M groups or the sparsity are not met); then per row
   ours ÷ reference on the calibration error (sparsegpt, alps, admm, where both columns are there), and in
   the mean row the ratio of the means and the geometric mean of the row ratios. Every pruner sees the same
   H (the errors are scale-free). `--variants` defaults to `alps:alps_damping=inputs` when alps is a column
   (alps with the reference's dampening, which reproduces its masks; formerly the fixed `alps-inputs`
   column); `--variants` with no value: none;
2. the dense phase: FISTA-200 vs ADMM-N on the same objective (objective value relative to FISTA-200's,
   seconds);
3. the weight adjustment with a fixed mask: exact masked least squares vs masked ADMM (error, seconds).

The reference code is only imported from the given checkouts (ALPS from a temporary copy with 'cuda:0'
pointed at the CPU when there is no GPU); nothing of it is part of the project. `--sections pruners
--methods ...` runs only the one-shot table for the named pruners (the variants come on top).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from layer_stats import add_capture_arguments, load_or_capture, synthetic_inputs, synthetic_stats  # noqa: E402
from reference_solvers import load_reference_admm, load_reference_alps, load_reference_sparsegpt  # noqa: E402

from sds.algorithms.objective import LinearStats, relative_error  # noqa: E402
from sds.core.config import defaults  # noqa: E402

_D = defaults()
PRUNE, PRUNE2, RECON = _D["prune"], _D["prune2"], _D["reconstruct"]["default"]  # the pipeline's settings


# --- tables --------------------------------------------------------------------------------------------------

def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    print(f"\n{title}")
    print("| " + " | ".join(str(h).ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |")
    sys.stdout.flush()


def _short(name: str) -> str:
    layer, rest = name.split(".", 1) if "." in name else (name, name)
    return f"{layer}.{rest.split('.')[-1]}"


def pattern_check(W_new: torch.Tensor, pattern) -> tuple[float, bool]:
    """(fraction of zeros, valid: every N:M group keeps at most N / the sparsity is reached)."""
    zeros = float((W_new == 0).float().mean())
    if pattern.kind == "nm":
        groups = (W_new != 0).reshape(W_new.shape[0], -1, pattern.m).sum(-1)
        return zeros, bool((groups <= pattern.n).all())
    return zeros, zeros >= pattern.sparsity - 1e-6


def parse_variant(text: str) -> tuple[str, str, dict]:
    """'alps:alps_norm_floor=0,alps_damping=inputs' → (column name, method, prune.* overrides)."""
    method, _, rest = text.partition(":")
    overrides = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        if key.endswith("rho_growth"):
            overrides[key] = [float(v) for v in value.split("/")]
        else:
            try:
                overrides[key] = int(value) if value.lstrip("-").isdigit() else float(value)
            except ValueError:
                overrides[key] = value
    short = ",".join(f"{k.split('_', 1)[1]}={v if not isinstance(v, list) else '/'.join(map(str, v))}"
                     for k, v in overrides.items())
    return f"{method}[{short}]", method, overrides


RATIOS = [("sparsegpt", "ref-sparsegpt"), ("alps", "ref-alps"), ("admm", "ref-admm")]  # ours ÷ reference


def pruner_tables(weights, calib, held, patterns, refs: dict, only=None, variants=None):
    """One table per pattern: a column per pruner (ours, the references in `refs` that are given, then each
    of `variants`), a cell per linear; then per row ours ÷ reference on the calibration error, and in the
    mean row the ratio of the means and the geometric mean of the row ratios."""
    import math

    from sds.core.patterns import parse_pattern
    from sds.algorithms.dispatch import prune

    def ours(method, overrides=None):
        return lambda W, H, p: prune(method, W, p, PRUNE | (overrides or {}), hessian=H)[0]

    methods = {m: ours(m) for m in ("sparsegpt", "wanda", "magnitude", "admm", "alps")}
    methods |= {name: fn for name, fn in refs.items() if fn is not None}
    if only:
        methods = {m: methods[m] for m in only if m in methods}  # in the order given
    if variants is None:  # the default: alps with the reference's dampening (its masks), beside alps
        variants = ["alps:alps_damping=inputs"] if "alps" in methods else []
    for text in variants:
        name, method, overrides = parse_variant(text)
        methods[name] = ours(method, overrides)
    pairs = [(o, r) for o, r in RATIOS if o in methods and r in methods]
    print("\nour defaults: " + ", ".join(f"{k}={v}" for k, v in PRUNE.items() if k.startswith(("alps_", "admm_"))))
    for text in patterns:
        pattern = parse_pattern(text)
        rows, totals, logs = [], {m: [0.0, 0.0, 0.0, 0] for m in methods}, {o: [] for o, _ in pairs}
        for name, W in weights.items():
            H, Hh = calib[name], held[name]
            row, errs = [_short(name)], {}
            for method, fn in methods.items():
                new_W, seconds = timed(fn, W, H, pattern)
                if new_W is None:
                    row.append("n/a")
                    continue
                new_W = new_W.float().cpu()
                err = errs[method] = relative_error(new_W, W, LinearStats(H, H, H))
                err_held = relative_error(new_W, W, LinearStats(Hh, Hh, Hh))
                zeros, valid = pattern_check(new_W, pattern)
                t = totals[method]
                t[0] += err
                t[1] += err_held
                t[2] += seconds
                t[3] += 1
                row.append(f"{err:.5f} / {err_held:.5f} / {seconds:.2f} ({zeros:.3f}{'' if valid else ' INVALID'})")
            for o, r in pairs:
                if o in errs and r in errs and min(errs[o], errs[r]) > 0:
                    logs[o].append((errs[o], errs[r]))
                    row.append(f"{errs[o] / errs[r]:.3f}")
                else:
                    row.append("n/a")
            rows.append(row)
        mean = ["**mean error, total s**"] + [f"{t[0] / t[3]:.5f} / {t[1] / t[3]:.5f} / {t[2]:.1f}"
                                              if t[3] else "n/a" for t in totals.values()]
        for o, _ in pairs:  # over the rows with both: ratio of the means (geometric mean of the row ratios)
            both = logs[o]
            geo = math.exp(sum(math.log(a / b) for a, b in both) / max(len(both), 1))
            mean.append(f"{sum(a for a, _ in both) / sum(b for _, b in both):.3f} (geo-mean of rows {geo:.3f})"
                        if both else "n/a")
        rows.append(mean)
        print_table(f"One-shot pruners, {pattern}: relative output error on calibration / held-out statistics / "
                    "seconds (zeros fraction; INVALID: pattern not met); ratio = ours ÷ reference, calibration error",
                    ["linear"] + list(methods) + [f"{o}÷{r}" for o, r in pairs], rows)


def dense_tables(weights, calib, held, iters_list, long_fista: bool):
    from sds.algorithms.admm import dense_admm
    from sds.core.patterns import parse_pattern
    from sds.algorithms.dispatch import prune
    from sds.algorithms.objective import dense_objective
    from sds.algorithms.fista import fista

    l1, pruned_weight = 0.01, 3.0  # the pipeline's defaults (reconstruct.<name>.l1, l1_pruned_weight)
    header = ["linear", "start", "FISTA-200 objective / s"] + [f"ADMM-{k} (÷FISTA-200) / s" for k in iters_list]
    if long_fista:
        header.append("FISTA-2000 (÷FISTA-200) / s")
    rows, total = [], {"fista": 0.0, **{k: 0.0 for k in iters_list}, "long": 0.0}
    ratios = {k: [] for k in iters_list}
    for name, W in weights.items():
        H = calib[name]
        stats = LinearStats(H, H, H)
        start, mask = prune("sparsegpt", W, parse_pattern("2:4"), PRUNE, hessian=H)
        kw = dict(l1=l1, l2=0.0, l1_weights=torch.where(mask, 1.0, pruned_weight))
        ref, seconds = timed(fista, start, W, stats, steps=200, **kw)
        f200 = dense_objective(ref, W, stats, **kw)
        total["fista"] += seconds
        row = [_short(name), f"{dense_objective(start, W, stats, **kw):.4g}", f"{f200:.4g} / {seconds:.2f}"]
        for k in iters_list:
            out, s = timed(dense_admm, start, W, stats, iters=k, rho=RECON["rho"], **kw)
            ratio = dense_objective(out, W, stats, **kw) / f200
            ratios[k].append(ratio)
            total[k] += s
            row.append(f"{ratio:.4f} / {s:.2f}")
        if long_fista:
            out, s = timed(fista, start, W, stats, steps=2000, **kw)
            total["long"] += s
            row.append(f"{dense_objective(out, W, stats, **kw) / f200:.4f} / {s:.1f}")
        rows.append(row)
    last = ["**total s (worst ratio)**", "", f"{total['fista']:.1f}"]
    last += [f"{max(ratios[k]):.4f} / {total[k]:.1f}" for k in iters_list]
    if long_fista:
        last.append(f"{total['long']:.1f}")
    rows.append(last)
    print_table(f"Dense phase (l1={l1}, l1_pruned_weight={pruned_weight}, from SparseGPT 2:4): objective of "
                "E(W) + s·l1·‖Ω⊙W‖₁, ADMM as a ratio to FISTA-200's (< 1 is better) / seconds", header, rows)


def adjust_tables(weights, calib, held, patterns, iters):
    from sds.algorithms.admm import masked_admm
    from sds.core.patterns import parse_pattern
    from sds.algorithms.dispatch import prune
    from sds.algorithms.least_squares import masked_least_squares

    for text in patterns:
        pattern = parse_pattern(text)
        rows, totals = [], {}
        for name, W in weights.items():
            H, Hh = calib[name], held[name]
            stats, held_stats = LinearStats(H, H, H), LinearStats(Hh, Hh, Hh)
            pruned, mask = prune("sparsegpt", W, pattern, PRUNE, hessian=H)
            runs = {"pruned": (pruned, 0.0),
                    "exact": timed(masked_least_squares, W, stats, mask, percdamp=0.01),
                    f"admm-{iters} (same objective)": timed(masked_admm, W, stats, mask, pruned, iters=iters,
                                                           percdamp=0.01, ridge_to="zero"),
                    f"admm-{iters} (default)": timed(masked_admm, W, stats, mask, pruned, iters=iters,
                                                           percdamp=PRUNE2["admm_percdamp"])}
            row = [_short(name)]
            for key, (out, seconds) in runs.items():
                err, err_held = relative_error(out, W, stats), relative_error(out, W, held_stats)
                t = totals.setdefault(key, [0.0, 0.0, 0.0])
                t[0] += err / len(weights)
                t[1] += err_held / len(weights)
                t[2] += seconds
                row.append(f"{err:.4f} / {err_held:.4f}" + (f" / {seconds:.2f}" if key != "pruned" else ""))
            rows.append(row)
        rows.append(["**mean error, total s**"] + [f"{a:.4f} / {b:.4f} / {c:.1f}" for a, b, c in totals.values()])
        print_table(f"Weight adjustment of SparseGPT {pattern} masks: relative error calibration / held-out / seconds",
                    ["linear"] + list(totals), rows)


def sds_tables(weights, calib, held, patterns):
    """Layer-level SDS variants on the same statistics (no propagation between layers): which second
    prune to use after the dense phase. Seconds are whole-variant totals (first prune included)."""
    from sds.core.patterns import parse_pattern
    from sds.algorithms.dispatch import prune
    from sds.algorithms.dispatch import adjust, dense_reconstruction

    l1, pruned_weight = 0.01, 3.0
    for text in patterns:
        pattern = parse_pattern(text)
        totals = {}
        for name, W in weights.items():
            H, Hh = calib[name], held[name]
            stats, held_stats = LinearStats(H, H, H), LinearStats(Hh, Hh, Hh)
            (first, mask1), t_first = timed(prune, "sparsegpt", W, pattern, hessian=H)
            adjusted, t_adjust = timed(adjust, W, stats, mask1, first, solver="admm")
            admm, t_admm = timed(prune, "admm", W, pattern, hessian=H)
            dense, t_dense = timed(dense_reconstruction, first, W, stats, solver="admm", iters=30, l1=l1,
                                   l1_weights=torch.where(mask1, 1.0, pruned_weight))
            (second, mask2), t_second = timed(prune, "sparsegpt", dense, pattern, hessian=H)
            second_adjusted, t_second_adjust = timed(adjust, W, stats, mask2, second, solver="admm")
            (gradual, _), t_gradual = timed(prune, "admm", W, pattern, hessian=H, W_start=dense)
            runs = {"sparsegpt": (first, t_first),
                    "sparsegpt + adjust admm": (adjusted, t_first + t_adjust),
                    "admm": (admm[0], t_admm),
                    "SDS: sparsegpt, dense ADMM-30, sparsegpt + adjust admm":
                        (second_adjusted, t_first + t_dense + t_second + t_second_adjust),
                    "SDS: sparsegpt, dense ADMM-30, admm from the dense-phase weights":
                        (gradual, t_first + t_dense + t_gradual)}
            for key, (out, seconds) in runs.items():
                t = totals.setdefault(key, [0.0, 0.0, 0.0])
                t[0] += relative_error(out, W, stats) / len(weights)
                t[1] += relative_error(out, W, held_stats) / len(weights)
                t[2] += seconds
        print_table(f"Layer-level SDS variants, {pattern} (dense phase l1={l1}, l1_pruned_weight={pruned_weight}): "
                    "mean relative error over the linears, total seconds",
                    ["variant", "calibration", "held-out", "seconds"],
                    [[k, f"{a:.5f}", f"{b:.5f}", f"{c:.1f}"] for k, (a, b, c) in totals.items()])


OPT_SHAPES = [(768, 768, False), (3072, 768, False), (768, 3072, True)]  # q/k/v/out, fc1, fc2


def speed_tables(ref_sparsegpt, repeats: int, exact_shapes: bool):
    from sds.algorithms.admm import masked_admm
    from sds.core.patterns import parse_pattern
    from sds.algorithms.dispatch import prune
    from sds.algorithms.least_squares import masked_least_squares

    rows = []
    for rows_, cols, relu in OPT_SHAPES:
        X = synthetic_inputs(4096, cols, cols, relu)
        H = X.T @ X / X.shape[0]
        W = torch.randn(rows_, cols, generator=torch.Generator().manual_seed(rows_)) * 0.02
        dead = int((torch.diagonal(H) == 0).sum())
        for text in ("2:4", "unstructured:0.5"):
            pattern = parse_pattern(text)
            ours = min(timed(prune, "sparsegpt", W, pattern, hessian=H)[1] for _ in range(repeats))
            new_W, mask = prune("sparsegpt", W, pattern, PRUNE, hessian=H)
            extra_zeros = int((new_W == 0).sum()) - int((~mask).sum())
            cells = [f"{rows_}×{cols}", text, str(dead), f"{ours:.3f}"]
            if ref_sparsegpt:
                ref = min(timed(ref_sparsegpt, W, H, pattern)[1] for _ in range(repeats))
                ref_W = ref_sparsegpt(W, H, pattern)
                ref_extra = int((ref_W == 0).sum()) - int(pattern.sparsity * W.numel())
                stats = LinearStats(H, H, H)
                cells += [f"{ref:.3f}", f"{ours / ref:.2f}",
                          f"{relative_error(new_W, W, stats):.4f} / {relative_error(ref_W, W, stats):.4f}",
                          f"{extra_zeros} / {ref_extra}"]
            else:
                cells += ["", "", "", str(extra_zeros)]
            rows.append(cells)
    print_table(f"SparseGPT speed at OPT-125M shapes (synthetic correlated inputs; fc2 after a ReLU), "
                f"best of {repeats}, {torch.get_num_threads()} thread(s)",
                ["W shape", "pattern", "dead inputs", "ours s", "reference s", "ours ÷ reference",
                 "rel. error ours / ref", "extra zeros ours / ref"], rows)
    if not exact_shapes:
        return
    rows = []
    for rows_, cols in ((576, 1536), (768, 3072)):
        X = synthetic_inputs(4096, cols, cols + 1)
        H = X.T @ X / X.shape[0]
        W = torch.randn(rows_, cols, generator=torch.Generator().manual_seed(1)) * 0.02
        stats = LinearStats(H, H, H)
        pruned, mask = prune("sparsegpt", W, parse_pattern("2:4"), PRUNE, hessian=H)
        exact, t_exact = timed(masked_least_squares, W, stats, mask, percdamp=0.01)
        admm, t_admm = timed(masked_admm, W, stats, mask, pruned, iters=20, percdamp=0.01, ridge_to="zero")
        rows.append([f"{rows_}×{cols}", f"{t_exact:.1f}", f"{t_admm:.2f}", f"{t_exact / t_admm:.1f}",
                     f"{relative_error(exact, W, stats):.5f}", f"{relative_error(admm, W, stats):.5f}"])
    print_table("Fixed-mask adjustment at wide shapes (2:4 SparseGPT masks, synthetic inputs)",
                ["W shape", "exact s", "admm-20 s", "speed-up", "exact rel. error", "admm-20 rel. error"], rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_capture_arguments(parser, layers=[2, 15], threads=1)
    parser.add_argument("--reference-sparsegpt", default=None, help="checkout of IST-DASLab/sparsegpt")
    parser.add_argument("--reference-admm", default=None, help="checkout of fmfi-compbio/admm-pruning")
    parser.add_argument("--reference-alps", default=None, help="checkout of mazumder-lab/ALPS")
    parser.add_argument("--synthetic", type=int, default=None, metavar="WIDTH",
                        help="synthetic OPT-like linears of this hidden size instead of a model's statistics")
    parser.add_argument("--methods", nargs="+", default=None,
                        help="only these columns of the one-shot table (e.g. sparsegpt admm alps ref-alps)")
    parser.add_argument("--variants", nargs="*", default=None, help="extra columns of the one-shot table: our "
                        "pruner with changed prune.* settings, e.g. alps:alps_norm_floor=0,alps_damping=inputs")
    parser.add_argument("--linears", nargs="+", default=None, help="only these linears of a layer (e.g. q_proj)")
    parser.add_argument("--patterns", nargs="+", default=["2:4", "unstructured:0.5"])
    parser.add_argument("--dense-iters", type=int, nargs="+", default=[10, 30])
    parser.add_argument("--adjust-iters", type=int, default=20)
    parser.add_argument("--long-fista", action="store_true", help="also FISTA-2000 (slow) as the optimum's proxy")
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats of the speed table (best of)")
    parser.add_argument("--sections", nargs="+", default=["speed", "pruners", "dense", "adjust"],
                        choices=["speed", "exact-shapes", "pruners", "dense", "adjust", "sds"])
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    refs = {"ref-sparsegpt": load_reference_sparsegpt(args.reference_sparsegpt),
            "ref-admm": load_reference_admm(args.reference_admm), "ref-alps": load_reference_alps(args.reference_alps)}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    if "speed" in args.sections or "exact-shapes" in args.sections:
        speed_tables(refs["ref-sparsegpt"], args.repeats, "exact-shapes" in args.sections)
    if {"pruners", "dense", "adjust", "sds"} & set(args.sections):
        start = time.perf_counter()
        if args.synthetic:
            weights, calib, held = synthetic_stats(args.synthetic, args.nsamples * args.seqlen)
            source = f"synthetic OPT-like linears, hidden size {args.synthetic}"
        else:
            weights, calib, held = load_or_capture(args)
            source = f"statistics of layers {args.layers}"
        if args.linears:
            weights = {k: W for k, W in weights.items() if k.split(".")[-1] in args.linears}
        print(f"\n{source} ({len(weights)} linears): {args.nsamples} × {args.seqlen} calibration tokens, as many "
              f"held-out ({time.perf_counter() - start:.0f} s)")
        if "pruners" in args.sections:
            pruner_tables(weights, calib, held, args.patterns, refs, args.methods, args.variants)
        if "dense" in args.sections:
            dense_tables(weights, calib, held, args.dense_iters, args.long_fista)
        if "adjust" in args.sections:
            adjust_tables(weights, calib, held, args.patterns, args.adjust_iters)
        if "sds" in args.sections:
            sds_tables(weights, calib, held, args.patterns)


if __name__ == "__main__":
    main()
