"""Layer-wise solvers side by side on REAL input statistics of a pretrained model (SmolLM2-135M).

    nice .venv/bin/python bench/solver_bench.py --model /work/main/models/smollm2-135m \
        --text ../shared/assets/wikitext-2-v1/valid.txt \
        --reference-sparsegpt /tmp/ref-sparsegpt --reference-admm /tmp/ref-admm --reference-alps /tmp/ref-alps

Captures H = E[x xᵀ] of every linear of the chosen decoder layers of the DENSE model by forward hooks
(calibration: `--nsamples` windows × `--seqlen` tokens; a second, disjointly seeded set of windows gives
held-out statistics), then per linear kind prints, side by side in one run:

1. one-shot pruners (sparsegpt / wanda / magnitude / admm / alps, plus the reference SparseGPT
   `fasterprune`, reference ADMM `AdmmPruner.fasterprune` and reference ALPS `ALPS_prune.ALPS_admm` when
   checkouts are given) at 2:4 and 50 %: seconds, relative output error on the calibration statistics and
   on the held-out ones;
2. the dense phase: FISTA-200 vs ADMM-N on the same objective (objective value relative to FISTA-200's,
   seconds);
3. the weight adjustment with a fixed mask: exact masked least squares vs masked ADMM (error, seconds).

The reference checkouts are only imported here (e.g. `git clone /work/.mirror/IST-DASLab+sparsegpt/repo
/tmp/ref-sparsegpt`, `git clone /work/.mirror/mazumder-lab+ALPS/repo /tmp/ref-alps`); nothing of them is
part of the project. `--sections pruners --methods ...` runs only the one-shot table for the named pruners.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from sds.algorithms.objective import LinearStats, relative_error  # noqa: E402
from sds.core.config import defaults  # noqa: E402

_D = defaults()
PRUNE, PRUNE2, RECON = _D["prune"], _D["prune2"], _D["reconstruct"]["default"]  # the pipeline's settings


# --- statistics capture --------------------------------------------------------------------------------------


def capture_stats(model_dir: str, text_path: str, layers: list[int], nsamples: int, seqlen: int,
                  seed: int) -> tuple[dict, dict, dict]:
    """(dense weights, calibration H, held-out H) per linear 'layer.name' of the given decoder layers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sds.data.texts import read_text_source, tokenize
    from sds.data.windows import sample_windows

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenize(tok, read_text_source(text_path))
    decoder = model.model.layers
    last = max(layers)
    linears = {f"{i}.{n}": m for i in layers for n, m in decoder[i].named_modules()
               if isinstance(m, torch.nn.Linear)}
    weights = {k: m.weight.detach().float().clone() for k, m in linears.items()}

    class _Stop(Exception):
        pass

    def run(windows):
        sums = {k: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for k, m in linears.items()}
        count = [0]

        def hook(key):
            def fn(_module, inputs, _output):
                x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
                sums[key] += x.T @ x
                if key == next(iter(linears)):
                    count[0] += x.shape[0]
            return fn

        def stop(_module, _inputs, _output):
            raise _Stop  # nothing after the last captured layer is needed

        handles = [m.register_forward_hook(hook(k)) for k, m in linears.items()]
        handles.append(decoder[last].register_forward_hook(stop))
        with torch.no_grad():
            for w in windows:
                try:
                    model(w.unsqueeze(0))
                except _Stop:
                    pass
        for h in handles:
            h.remove()
        return {k: (v / count[0]).float() for k, v in sums.items()}

    calib = run(sample_windows(ids, nsamples, seqlen, seed))
    held = run(sample_windows(ids, nsamples, seqlen, seed + 1000))
    return weights, calib, held


def load_or_capture(args) -> tuple[dict, dict, dict]:
    """Captured statistics, kept in `--stats-cache` (re-captured when the capture arguments differ)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    key = {"model": str(Path(args.model).resolve()), "text": str(Path(args.text).resolve()),
           "layers": " ".join(map(str, args.layers)), "nsamples": str(args.nsamples), "seqlen": str(args.seqlen),
           "seed": str(args.seed)}
    cache = Path(args.stats_cache) if args.stats_cache else None
    if cache is not None and cache.is_file():
        with safe_open(str(cache), "pt") as f:
            same = f.metadata() == key
        if same:
            flat = load_file(str(cache))
            split = lambda prefix: {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}  # noqa: E731
            return split("W/"), split("H/"), split("Hheld/")
    weights, calib, held = capture_stats(args.model, args.text, args.layers, args.nsamples, args.seqlen, args.seed)
    if cache is not None:
        flat = {**{f"W/{k}": v for k, v in weights.items()}, **{f"H/{k}": v for k, v in calib.items()},
                **{f"Hheld/{k}": v for k, v in held.items()}}
        save_file({k: v.contiguous() for k, v in flat.items()}, str(cache), metadata=key)
    return weights, calib, held


# --- reference implementations (imported from a local checkout, never part of the project) -------------------

def _quiet(fn, *args, **kwargs):
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args, **kwargs)


def load_reference_sparsegpt(path: str | None):
    """fasterprune(W, H, pattern) -> W_new, from IST-DASLab/sparsegpt's sparsegpt.py."""
    if not path:
        return None
    sys.path.insert(0, str(Path(path).resolve()))
    if not torch.cuda.is_available():
        torch.cuda.synchronize = lambda *a, **k: None  # the reference calls it unconditionally
    from sparsegpt import SparseGPT  # noqa: E402  (the checkout's module)

    def run(W, H, pattern):
        layer = torch.nn.Linear(W.shape[1], W.shape[0], bias=False)
        layer.weight.data = W.clone()
        pruner = SparseGPT(layer)
        pruner.H = H.clone()
        n, m = (pattern.m - pattern.n, pattern.m) if pattern.kind == "nm" else (0, 0)
        _quiet(pruner.fasterprune, pattern.sparsity, prunen=n, prunem=m, percdamp=0.01, blocksize=128)
        return layer.weight.data
    return run


def load_reference_admm(path: str | None):
    """fasterprune of fmfi-compbio/admm-pruning's lib/admm.py (2:4 and unstructured only: its N:M branch
    is written for groups of 4 keeping 2)."""
    if not path:
        return None
    spec = importlib.util.spec_from_file_location("reference_admm", Path(path) / "lib" / "admm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def run(W, H, pattern):
        if pattern.kind == "nm" and (pattern.n, pattern.m) != (2, 4):
            return None
        layer = torch.nn.Linear(W.shape[1], W.shape[0], bias=False)
        layer.weight.data = W.clone()
        pruner = module.AdmmPruner(layer)
        pruner.XX = H.clone()
        n, m = (2, 4) if pattern.kind == "nm" else (0, 0)
        _quiet(pruner.fasterprune, pattern.sparsity, prune_n=n, prune_m=m, percdamp=0.1)
        return layer.weight.data
    return run


def load_reference_alps(path: str | None):
    """ALPS_prune.ALPS_admm of mazumder-lab/ALPS's alps.py, run from a copy whose hard-coded 'cuda:0' is
    pointed at the CPU when no GPU is there (its default rho 0.1, 300 steps, 10 CG steps)."""
    if not path:
        return None
    import tempfile

    source = (Path(path) / "alps.py").read_text()
    if not torch.cuda.is_available():
        source = source.replace("'cuda:0'", "'cpu'").replace('"cuda:0"', '"cpu"')
        torch.cuda.synchronize = lambda *a, **k: None  # the reference calls it unconditionally
    copy = Path(tempfile.mkdtemp(prefix="ref-alps-")) / "reference_alps.py"
    copy.write_text(source)
    spec = importlib.util.spec_from_file_location("reference_alps", copy)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    device = "cuda:0" if torch.cuda.is_available() else "cpu"

    def run(W, H, pattern):
        layer = torch.nn.Linear(W.shape[1], W.shape[0], bias=False).to(device)
        layer.weight.data = W.clone().to(device)
        pruner = module.ALPS_prune(layer, nsamples=1, seqlen=1)
        pruner.XtX = H.clone().float().to(device)
        n, m = (pattern.n, pattern.m) if pattern.kind == "nm" else (0, 0)  # its nm_n: the weights kept
        _quiet(pruner.ALPS_admm, pattern.sparsity, nm_n=n, nm_m=m, rho=0.1)
        return layer.weight.data.float().cpu()
    return run


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


def pruner_tables(weights, calib, held, patterns, ref_sparsegpt, ref_admm, ref_alps=None, only=None):
    from sds.core.patterns import parse_pattern
    from sds.algorithms.dispatch import prune

    methods = {"sparsegpt": lambda W, H, p: prune("sparsegpt", W, p, PRUNE, hessian=H)[0],
               "wanda": lambda W, H, p: prune("wanda", W, p, PRUNE, hessian=H)[0],
               "magnitude": lambda W, H, p: prune("magnitude", W, p, PRUNE, hessian=H)[0],
               "admm": lambda W, H, p: prune("admm", W, p, PRUNE, hessian=H)[0],
               "alps": lambda W, H, p: prune("alps", W, p, PRUNE, hessian=H)[0],
               # the reference's dampening (on H before the input-norm scaling): its masks, for the comparison
               "alps-inputs": lambda W, H, p: prune("alps", W, p, PRUNE | {"alps_damping": "inputs"}, hessian=H)[0]}
    if ref_sparsegpt:
        methods["ref-sparsegpt"] = ref_sparsegpt
    if ref_admm:
        methods["ref-admm"] = ref_admm
    if ref_alps:
        methods["ref-alps"] = ref_alps
    if only:
        methods = {m: fn for m, fn in methods.items() if m in only}
    for text in patterns:
        pattern = parse_pattern(text)
        rows, totals = [], {m: [0.0, 0.0, 0.0, 0] for m in methods}
        for name, W in weights.items():
            H, Hh = calib[name], held[name]
            row = [_short(name)]
            for method, fn in methods.items():
                new_W, seconds = timed(fn, W, H, pattern)
                if new_W is None:
                    row.append("n/a")
                    continue
                err = relative_error(new_W, W, LinearStats(H, H, H))
                err_held = relative_error(new_W, W, LinearStats(Hh, Hh, Hh))
                t = totals[method]
                t[0] += err
                t[1] += err_held
                t[2] += seconds
                t[3] += 1
                row.append(f"{err:.4f} / {err_held:.4f} / {seconds:.2f}")
            rows.append(row)
        rows.append(["**mean error, total s**"] + [f"{t[0] / t[3]:.4f} / {t[1] / t[3]:.4f} / {t[2]:.1f}"
                                                    if t[3] else "n/a" for t in totals.values()])
        print_table(f"One-shot pruners, {pattern}: relative output error on calibration / held-out statistics / "
                    "seconds", ["linear"] + list(methods), rows)


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


def synthetic_inputs(tokens: int, dim: int, seed: int, relu: bool = False) -> torch.Tensor:
    """Correlated features with scales over two decades (like LLM activations); `relu`: an fc2 input,
    with dead columns as after OPT's ReLU."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(dim, dim, generator=g) / dim ** 0.5
    X = (torch.randn(tokens, dim, generator=g) @ mixing + 0.3 * torch.randn(tokens, dim, generator=g))
    X = X * torch.logspace(-1, 1, dim)[torch.randperm(dim, generator=g)]
    if relu:  # mostly-off units, and 3 % that never fire on these tokens (dead, as in OPT's fc2 inputs)
        offset = torch.where(torch.rand(dim, generator=g) < 0.03, 100.0, 1.5)
        X = (X - offset * X.std(0)).clamp_min(0)
    return X


OPT_SHAPES = [(768, 768, False), (3072, 768, False), (768, 3072, True)]  # q/k/v/out, fc1, fc2


def synthetic_stats(width: int, tokens: int) -> tuple[dict, dict, dict]:
    """(weights, calibration H, held-out H) of three OPT-like linears of hidden size `width` (attention,
    fc1, fc2 with ReLU inputs), from `synthetic_inputs`: the statistics source of `--synthetic`, for
    comparisons on a machine without a pretrained model (held-out: other tokens of the same features)."""
    weights, calib, held = {}, {}, {}
    for name, (rows, cols, relu) in {"0.attn": (width, width, False), "0.fc1": (4 * width, width, False),
                                     "0.fc2": (width, 4 * width, True)}.items():
        X = synthetic_inputs(2 * tokens, cols, cols, relu)  # one feature draw, two disjoint token sets
        calib[name] = X[:tokens].T @ X[:tokens] / tokens
        held[name] = X[tokens:].T @ X[tokens:] / tokens
        weights[name] = torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows + cols)) * 0.02
    return weights, calib, held


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


def add_capture_arguments(parser: argparse.ArgumentParser, layers: list[int], threads: int) -> None:
    """The statistics-capture options `load_or_capture` reads (shared with bench/norm_floor_probe.py)."""
    parser.add_argument("--model", default=str(ROOT / "models" / "smollm2-135m"))
    parser.add_argument("--text", default=str(ROOT.parent / "shared" / "assets" / "wikitext-2-v1" / "valid.txt"))
    parser.add_argument("--layers", type=int, nargs="+", default=layers)
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=threads)
    parser.add_argument("--stats-cache", default=None, help="safetensors file to keep captured statistics in")


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
    parser.add_argument("--patterns", nargs="+", default=["2:4", "unstructured:0.5"])
    parser.add_argument("--dense-iters", type=int, nargs="+", default=[10, 30])
    parser.add_argument("--adjust-iters", type=int, default=20)
    parser.add_argument("--long-fista", action="store_true", help="also FISTA-2000 (slow) as the optimum's proxy")
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats of the speed table (best of)")
    parser.add_argument("--sections", nargs="+", default=["speed", "pruners", "dense", "adjust"],
                        choices=["speed", "exact-shapes", "pruners", "dense", "adjust", "sds"])
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    ref_sparsegpt = load_reference_sparsegpt(args.reference_sparsegpt)
    ref_admm = load_reference_admm(args.reference_admm)
    ref_alps = load_reference_alps(args.reference_alps)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    if "speed" in args.sections or "exact-shapes" in args.sections:
        speed_tables(ref_sparsegpt, args.repeats, "exact-shapes" in args.sections)
    if {"pruners", "dense", "adjust", "sds"} & set(args.sections):
        start = time.perf_counter()
        if args.synthetic:
            weights, calib, held = synthetic_stats(args.synthetic, args.nsamples * args.seqlen)
            print(f"\nsynthetic OPT-like linears, hidden size {args.synthetic}: {args.nsamples * args.seqlen} "
                  "calibration tokens, as many held-out")
        else:
            weights, calib, held = load_or_capture(args)
            print(f"\nstatistics of layers {args.layers} ({len(weights)} linears): {args.nsamples} × "
                  f"{args.seqlen} calibration tokens, as many held-out ({time.perf_counter() - start:.0f} s)")
        if "pruners" in args.sections:
            pruner_tables(weights, calib, held, args.patterns, ref_sparsegpt, ref_admm, ref_alps, args.methods)
        if "dense" in args.sections:
            dense_tables(weights, calib, held, args.dense_iters, args.long_fista)
        if "adjust" in args.sections:
            adjust_tables(weights, calib, held, args.patterns, args.adjust_iters)
        if "sds" in args.sections:
            sds_tables(weights, calib, held, args.patterns)


if __name__ == "__main__":
    main()
