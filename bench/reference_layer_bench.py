"""Per-linear comparison of our layer-wise pruners `alps` and `admm` against their reference implementations
(mazumder-lab/ALPS `ALPS_prune.ALPS_admm`, fmfi-compbio/admm-pruning `AdmmPruner.fasterprune`), on the same
dense weights and the same calibration statistics of a real model (SmolLM2-135M by default).

    git --git-dir=/work/.mirror/mazumder-lab+ALPS/repo archive HEAD | tar x -C /tmp/ref-alps
    git --git-dir=/work/.mirror/fmfi-compbio+admm-pruning/repo archive HEAD | tar x -C /tmp/ref-admm
    .venv/bin/python bench/reference_layer_bench.py --reference-alps /tmp/ref-alps --reference-admm /tmp/ref-admm \
        --layers 0 12 24 --stats-cache /tmp/smollm-stats.safetensors
    # diagnosis: extra columns, our call with changed arguments (KEY=VALUE of the `prune` section)
    .venv/bin/python bench/reference_layer_bench.py ... --variants \
        "alps:alps_norm_floor=0" "alps:alps_damping=inputs,alps_norm_floor=0" "admm:admm_norm_floor=0"

H = E[x xᵀ] of each linear's input is captured on the DENSE model by forward hooks (solver_bench's capture:
`--nsamples` windows × `--seqlen` tokens of the calibration text, plus as many held-out windows from another
seed). Per linear and pattern each column reports the relative output error tr(D H Dᵀ)/tr(W H Wᵀ),
D = W − Ŵ, on the calibration H (and on the held-out H), the achieved sparsity / N:M validity, and seconds;
then per row the ratio ours ÷ reference. Every pruner sees the same H (the errors are scale-free; both
references and ours normalise by diag H). The reference code is only imported from the given checkouts
(ALPS from a temporary copy with 'cuda:0' pointed at the CPU); nothing of it is part of the project.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from solver_bench import (PRUNE, add_capture_arguments, load_or_capture, load_reference_admm,  # noqa: E402
                          load_reference_alps, print_table)

from sds.algorithms.dispatch import prune  # noqa: E402
from sds.core.patterns import parse_pattern  # noqa: E402

LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def rel_error(W_new: torch.Tensor, W: torch.Tensor, H: torch.Tensor) -> float:
    """tr(D H Dᵀ) / tr(W H Wᵀ), D = W − W_new, in float64."""
    H = H.double()
    D = (W.double() - W_new.double())
    return float(((D @ H) * D).sum()) / float(((W.double() @ H) * W.double()).sum())


def pattern_check(W_new: torch.Tensor, pattern) -> tuple[float, bool]:
    """(fraction of zeros, valid: every N:M group keeps at most N / the sparsity reached)."""
    zeros = float((W_new == 0).float().mean())
    if pattern.kind == "nm":
        groups = (W_new != 0).reshape(W_new.shape[0], -1, pattern.m).sum(-1)
        return zeros, bool((groups <= pattern.n).all())
    return zeros, zeros >= pattern.sparsity - 1e-6


def parse_variant(text: str) -> tuple[str, str, dict]:
    """'alps:alps_norm_floor=0,alps_damping=inputs' → (column name, method, settings overrides)."""
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


def ours(method: str, overrides: dict):
    settings = dict(PRUNE) | overrides
    return lambda W, H, p: prune(method, W, p, settings, hessian=H)[0]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_capture_arguments(parser, layers=[0, 12, 24], threads=1)
    parser.add_argument("--reference-alps", default=None, help="checkout of mazumder-lab/ALPS")
    parser.add_argument("--reference-admm", default=None, help="checkout of fmfi-compbio/admm-pruning")
    parser.add_argument("--linears", nargs="+", default=LINEARS, help="linear names within a decoder layer")
    parser.add_argument("--patterns", nargs="+", default=["2:4", "unstructured:0.5"])
    parser.add_argument("--methods", nargs="+", default=["alps", "ref-alps", "admm", "ref-admm"],
                        choices=["alps", "ref-alps", "admm", "ref-admm"])
    parser.add_argument("--variants", nargs="*", default=[],
                        help="extra columns: our pruner with changed prune.* settings, e.g. alps:alps_norm_floor=0")
    parser.add_argument("--no-held-out", action="store_true", help="omit the held-out error")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    refs = {"ref-alps": load_reference_alps(args.reference_alps), "ref-admm": load_reference_admm(args.reference_admm)}
    columns = {}
    for m in args.methods:
        if m.startswith("ref-"):
            if refs[m] is not None:
                columns[m] = refs[m]
        else:
            columns[m] = ours(m, {})
    for v in args.variants:
        name, method, overrides = parse_variant(v)
        columns[name] = ours(method, overrides)
    start = time.perf_counter()
    weights, calib, held = load_or_capture(args)
    names = [k for k in weights if k.split(".")[-1] in args.linears]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); statistics of layers {args.layers}: "
          f"{args.nsamples} × {args.seqlen} tokens ({time.perf_counter() - start:.0f} s)")
    print("our defaults: " + ", ".join(f"{k}={v}" for k, v in PRUNE.items() if k.startswith(("alps_", "admm_"))))
    for text in args.patterns:
        pattern = parse_pattern(text)
        rows, sums, logs = [], {c: [0.0, 0.0, 0.0, 0] for c in columns}, {}
        for name in names:
            W, H, Hh = weights[name], calib[name], held[name]
            row, errs = [f"{name.split('.')[0]}.{name.split('.')[-1]}"], {}
            for col, fn in columns.items():
                t0 = time.perf_counter()
                new_W = fn(W.clone(), H.clone(), pattern)
                seconds = time.perf_counter() - t0
                new_W = new_W.float().cpu()
                err, zeros, valid = rel_error(new_W, W, H), *pattern_check(new_W, pattern)
                err_h = None if args.no_held_out else rel_error(new_W, W, Hh)
                errs[col] = (err, err_h)
                s = sums[col]
                s[0] += err
                s[1] += err_h or 0.0
                s[2] += seconds
                s[3] += 1
                held_txt = "" if err_h is None else f" / {err_h:.5f}"
                row.append(f"{err:.5f}{held_txt} ({zeros:.3f}{'' if valid else ' INVALID'}, {seconds:.1f}s)")
            for ours_col, ref_col in (("alps", "ref-alps"), ("admm", "ref-admm")):
                if ours_col in errs and ref_col in errs:
                    ratio = errs[ours_col][0] / errs[ref_col][0]
                    logs.setdefault(ours_col, []).append(math.log(ratio))
                    row.append(f"{ratio:.3f}")
            rows.append(row)
        mean = ["**mean**"]
        for col, s in sums.items():
            mean.append(f"{s[0] / s[3]:.5f}" + ("" if args.no_held_out else f" / {s[1] / s[3]:.5f}")
                        + f" ({s[2]:.0f}s total)")
        for ours_col, ref_col in (("alps", "ref-alps"), ("admm", "ref-admm")):
            if ours_col in sums and ref_col in sums:
                mean.append(f"{sums[ours_col][0] / sums[ref_col][0]:.3f} (geo-mean of rows "
                            f"{math.exp(sum(logs[ours_col]) / len(logs[ours_col])):.3f})")
        rows.append(mean)
        header = ["linear"] + list(columns)
        header += [f"{o}÷{r}" for o, r in (("alps", "ref-alps"), ("admm", "ref-admm")) if o in columns and r in columns]
        print_table(f"{pattern}: relative output error calibration" + ("" if args.no_held_out else " / held-out")
                    + " (zeros fraction, seconds); ratio = ours ÷ reference, calibration error", header, rows)


if __name__ == "__main__":
    main()
