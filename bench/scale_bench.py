"""Benchmark at real shapes: every stage on a random-weight model of a real architecture's shape.

    .venv/bin/python bench/scale_bench.py --shape opt-125m --nsamples 128 --seqlen 2048      # the issue's target
    .venv/bin/python bench/scale_bench.py --shape opt-125m --layers 2 --nsamples 8 --seqlen 512   # quick
    .venv/bin/python bench/scale_bench.py --curve          # small cost-curve table (nsamples, seqlen, hidden, depth)
    .venv/bin/python bench/scale_bench.py --depth-check --nsamples 8 --seqlen 2048   # peak RSS, 6 vs 12 layers
    .venv/bin/python bench/scale_bench.py --shape llama-7b-slice --nsamples 4 --seqlen 512 --solver-steps 2

Speed and memory do not depend on whether weights are pretrained, so a random model of the real shape
(OPTConfig of facebook/opt-125m; a 2-layer slice of a LLaMA-7B shape) measures them. Each stage runs as
its own process, exactly as Snakemake runs it; the table gives wall seconds, peak RSS and bytes written.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

SHAPES = {
    "opt-125m": dict(arch="opt", layers=12, hidden=768, ffn=3072, heads=12, vocab=50272, positions=2048),
    "llama-7b-slice": dict(arch="llama", layers=2, hidden=4096, ffn=11008, heads=32, vocab=32000, positions=4096),
    # SmolLM2-135M's LlamaConfig: grouped-query attention (9 query, 3 KV heads), tied embeddings
    "smollm2-135m": dict(arch="llama", layers=30, hidden=576, ffn=1536, heads=9, kv_heads=3, vocab=49152,
                         positions=8192, tied=True),
}

# Peak RSS from VmHWM, not ru_maxrss: ru_maxrss survives execve, so every stage would report at least this
# benchmark process's own peak (which holds a whole model after make_model).
RUNNER = ("import sys, torch; from sds.cli import main; from sds.core.runtime import peak_rss_mib; rc = main(sys.argv[1:]); "
          "print('PEAK_RSS_KB', int(peak_rss_mib() * 1024), file=sys.stderr); "
          "print('PEAK_GPU_MB', torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else -1, "
          "file=sys.stderr); sys.exit(rc)")


def make_model(folder: Path, shape: dict, seed: int = 0) -> None:
    import torch
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    if shape["arch"] == "opt":
        cfg = OPTConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"], num_hidden_layers=shape["layers"],
                        ffn_dim=shape["ffn"], num_attention_heads=shape["heads"],
                        max_position_embeddings=shape["positions"], word_embed_proj_dim=shape["hidden"])
        model = OPTForCausalLM(cfg)
    else:
        cfg = LlamaConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"], num_hidden_layers=shape["layers"],
                          intermediate_size=shape["ffn"], num_attention_heads=shape["heads"],
                          num_key_value_heads=shape.get("kv_heads", shape["heads"]),
                          max_position_embeddings=shape["positions"], tie_word_embeddings=shape.get("tied", False))
        model = LlamaForCausalLM(cfg)
    model.save_pretrained(folder)
    vocab = {f"t{i}": i for i in range(shape["vocab"])}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")), unk_token="t0",
                                  eos_token="t1", pad_token="t1")
    tok.save_pretrained(folder)


def make_text(path: Path, tokens: int, vocab: int, seed: int = 0) -> None:
    import random

    rng = random.Random(seed)
    path.write_text(" ".join(f"t{rng.randrange(2, vocab)}" for _ in range(tokens)))


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def stage_env() -> dict:
    """This checkout's src first, then whatever PYTHONPATH already holds (packages installed with --target)."""
    path = os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "MLFLOW_TRACKING_URI": ""}


def stage(config: Path, name: str, out: Path, **kw) -> dict:
    args = [sys.executable, "-c", RUNNER, name, "--config", str(config),
            *[f"{k}={v}" for k, v in kw.items()], f"out={out}"]
    start = time.monotonic()
    proc = subprocess.run(args, capture_output=True, text=True, env=stage_env())
    seconds = time.monotonic() - start
    (out.parent / f"{out.name}.log").write_text(proc.stderr)  # per-layer progress lines with peak RSS
    if proc.returncode:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
    rss = next(int(l.split()[1]) for l in proc.stderr.splitlines() if l.startswith("PEAK_RSS_KB"))
    gpu = next(float(l.split()[1]) for l in proc.stderr.splitlines() if l.startswith("PEAK_GPU_MB"))
    row = {"stage": name, "seconds": seconds, "peak_rss_mib": rss / 1024, "bytes_written": du(out),
           "peak_gpu_mib": gpu if gpu >= 0 else None}
    # one line per finished stage, so a long run shows its figures as it goes (and a log keeps them)
    print(f"  {name:14s} {seconds:9.1f} s {row['peak_rss_mib']:9.0f} MiB peak {row['bytes_written'] / 2**20:10.1f} MiB "
          f"written", flush=True)
    (out.parent / f"{out.name}.bench.json").write_text(json.dumps(row))
    return row


def run_pipeline(shape: dict, nsamples: int, seqlen: int, method: str, pattern: str, work: Path,
                 sds: bool = True, overrides: dict | None = None, dense_cache: bool = False,
                 threads: int = 2) -> list[dict]:
    from sds.core.config import validate_config

    work.mkdir(parents=True, exist_ok=True)
    model, text = work / "model", work / "calib.txt"
    if not model.exists():
        make_model(model, shape)
    make_text(text, max(nsamples * seqlen * 2, 50_000), shape["vocab"])
    cfg = validate_config({"run": "bench", "threads": threads, "model": {"source": str(model)},
                           "calibration": {"source": str(text), "nsamples": nsamples, "seqlen": seqlen},
                           "evaluate": {"datasets": {"calib": str(text)}, "seqlen": seqlen, "max_windows": 4},
                           "prune": {"methods": [method], "patterns": [pattern]}, "mlflow": {"enabled": False},
                           **(overrides or {})})
    cfg_path = work / "config.json"
    cfg_path.write_text(json.dumps(cfg))
    from sds.core.patterns import parse_pattern

    slug = parse_pattern(pattern).slug
    rows = [stage(cfg_path, "calibration", work / "calibration.parquet", model_dir=model)]
    calibration = dict(model_dir=model, calibration_file=work / "calibration.parquet")
    rows.append(stage(cfg_path, "layer_inputs", work / "input", **calibration))
    if dense_cache:  # only settings that fit to the dense model's own hidden states read it
        rows.append(stage(cfg_path, "activations", work / "dense", **calibration))
    common = dict(model_dir=model, inputs_dir=work / "input")
    p1 = work / method / slug / "prune1"
    rows.append(stage(cfg_path, "prune1", p1, method=method, pattern=slug, cache_stream="false", **common))
    if sds:
        rec = work / method / slug / "default" / "reconstruct"
        rows.append(stage(cfg_path, "reconstruct", rec, prune1_dir=p1, recon="default", **common))
        rows.append(stage(cfg_path, "prune2", work / method / slug / "default" / "sds", prune1_dir=p1,
                          reconstruct_dir=rec, method=method, pattern=slug, recon="default", **common))
    return rows


def solver_overrides(steps: int) -> dict:
    return {"reconstruct": {"default": {"steps": steps}}, "prune2": {"adjust": "fista", "adjust_steps": steps}}


def print_rows(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    print(f"{'stage':14s} {'seconds':>9s} {'peak RSS MiB':>13s} {'MiB written':>12s}")
    for r in rows:
        print(f"{r['stage']:14s} {r['seconds']:9.1f} {r['peak_rss_mib']:13.0f} {r['bytes_written'] / 2**20:12.1f}")
    print(f"{'total':14s} {sum(r['seconds'] for r in rows):9.1f} {max(r['peak_rss_mib'] for r in rows):13.0f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="opt-125m")
    ap.add_argument("--layers", type=int, help="override the depth (e.g. 6 vs 12 for the memory check)")
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--method", default="sparsegpt")
    ap.add_argument("--pattern", default="2:4")
    ap.add_argument("--curve", action="store_true", help="cost-curve table on small shapes")
    ap.add_argument("--curve-rows", nargs="+", metavar="HIDDEN:LAYERS:NSAMPLES:SEQLEN",
                    help="with --curve: run only these rows (e.g. 1536:1:4:1024) instead of the default five")
    ap.add_argument("--depth-check", action="store_true",
                    help="peak RSS per stage for 6 vs 12 layers (solver steps cut to 5: memory, not time)")
    ap.add_argument("--solver-steps", type=int,
                    help="cut FISTA and the adjustment to N FISTA steps (a wide slice's solvers take hours on "
                         "a CPU; the rest of each stage is then measured as is)")
    ap.add_argument("--workdir")
    args = ap.parse_args()
    base = Path(args.workdir or tempfile.mkdtemp(prefix="sds-scale-"))
    if args.curve_rows and not args.curve:
        ap.error("--curve-rows needs --curve")
    try:
        curve_rows = [tuple(int(x) for x in row.split(":")) for row in args.curve_rows] if args.curve_rows else \
            [(768, 1, 4, 1024), (768, 1, 8, 1024), (768, 1, 4, 2048), (1536, 1, 4, 1024), (768, 2, 4, 1024)]
    except ValueError:
        ap.error("--curve-rows takes HIDDEN:LAYERS:NSAMPLES:SEQLEN, four integers, e.g. 1536:1:4:1024")
    if any(len(row) != 4 or row[0] % 64 for row in curve_rows):
        ap.error("--curve-rows takes HIDDEN:LAYERS:NSAMPLES:SEQLEN with HIDDEN a multiple of 64 (64-wide heads)")
    if args.curve:
        # One factor doubled at a time from a 1-layer OPT-125M-width base, large enough that each stage's
        # own work (not the ~5 s of imports every stage process pays) dominates its time.
        print("cost curve (sparsegpt 2:4, default solvers; seconds per stage, peak RSS over the SDS stages)")
        print(f"{'hidden':>6s} {'layers':>6s} {'nsamples':>8s} {'seqlen':>6s} {'inputs s':>8s} {'prune1 s':>8s} "
              f"{'recon. s':>8s} {'prune2 s':>8s} {'peak MiB':>9s}", flush=True)
        for hidden, layers, n, s in curve_rows:
            shape = dict(SHAPES["opt-125m"], hidden=hidden, ffn=4 * hidden, heads=hidden // 64, layers=layers)
            rows = {r["stage"]: r for r in run_pipeline(shape, n, s, "sparsegpt", "2:4",
                                                        base / f"h{hidden}l{layers}n{n}s{s}")}
            print(f"{hidden:6d} {layers:6d} {n:8d} {s:6d} " + " ".join(
                f"{rows[k]['seconds']:8.1f}" for k in ("layer_inputs", "prune1", "reconstruct", "prune2")) +
                f" {max(rows[k]['peak_rss_mib'] for k in ('prune1', 'reconstruct', 'prune2')):9.0f}", flush=True)
        return 0
    if args.depth_check:
        # FISTA steps and the adjustment solver change time, not the per-layer working set, so they are cut
        # short; what is compared is the peak RSS of each stage at two depths.
        overrides = solver_overrides(5)
        peaks = {}
        for layers in (6, 12):
            shape = dict(SHAPES[args.shape], layers=layers)
            print(f"{args.shape} with {layers} layers, {args.nsamples} × {args.seqlen} tokens", flush=True)
            rows = run_pipeline(shape, args.nsamples, args.seqlen, args.method, args.pattern, base / f"l{layers}",
                                overrides=overrides)
            peaks[layers] = {r["stage"]: r["peak_rss_mib"] for r in rows}
        print(f"\n{'stage':14s} {'6 layers MiB':>13s} {'12 layers MiB':>14s} {'change':>8s}")
        for name in peaks[6]:
            a, b = peaks[6][name], peaks[12][name]
            print(f"{name:14s} {a:13.0f} {b:14.0f} {100 * (b - a) / a:+7.1f}%")
        return 0
    shape = dict(SHAPES[args.shape])
    if args.layers:
        shape["layers"] = args.layers
    rows = run_pipeline(shape, args.nsamples, args.seqlen, args.method, args.pattern, base,
                        overrides=solver_overrides(args.solver_steps) if args.solver_steps else None)
    print_rows(f"{args.shape} ({shape['layers']} layers), {args.method} {args.pattern}, "
               f"{args.nsamples} × {args.seqlen} calibration tokens"
               + (f", solvers cut to {args.solver_steps} steps" if args.solver_steps else ""), rows)
    one_shot = sum(r["seconds"] for r in rows if r["stage"] in ("calibration", "layer_inputs", "prune1"))
    total = sum(r["seconds"] for r in rows)
    print(f"\nSDS run {total:.1f} s vs one-shot run {one_shot:.1f} s: ratio {total / one_shot:.2f} (target ≤ 3)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
