"""The per-linear statistics bench/solver_bench.py and bench/norm_floor_probe.py run the layer-wise solvers
on: H = E[x xᵀ] of every linear of chosen decoder layers of a DENSE pretrained model, captured by forward
hooks (calibration windows, and disjointly seeded held-out windows), kept in a `--stats-cache` file; or
synthetic OPT-like linears for a machine without a model."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


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