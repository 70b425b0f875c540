"""Benchmark at real shapes: every stage on a random-weight model of a real architecture's shape.

    .venv/bin/python bench/scale_bench.py --shape opt-125m --nsamples 128 --seqlen 2048      # the issue's target
    .venv/bin/python bench/scale_bench.py --shape opt-125m --layers 2 --nsamples 8 --seqlen 512   # quick
    .venv/bin/python bench/scale_bench.py --curve          # small cost-curve table (nsamples, seqlen, hidden, depth)
    .venv/bin/python bench/scale_bench.py --depth-check --nsamples 8 --seqlen 2048   # peak RSS, 6 vs 12 layers
    .venv/bin/python bench/scale_bench.py --shape llama-7b-slice --nsamples 4 --seqlen 512 --solver-steps 2
    .venv/bin/python bench/scale_bench.py --full-pipeline --shape llama-3.1-8b --layers 2 4   # docs/scale.md

Speed and memory do not depend on whether weights are pretrained, so a random model of the real shape
(OPTConfig of facebook/opt-125m; a 2-layer slice of a LLaMA-7B shape) measures them. Each stage runs as
its own process, exactly as Snakemake runs it; the table gives wall seconds, peak RSS and bytes written.

--full-pipeline runs the real Snakemake workflow (`-- all export`) on an external model folder of the shape
(llama-3.1-8b: meta-llama/Llama-3.1-8B's LlamaConfig, random bf16 weights in 1 GB safetensors shards with an
index, a word-level tokenizer over its 128256 ids) once per depth given to --layers, and prints per rule its
seconds and peak RSS (Snakemake's benchmark files) and bytes written, the depths side by side, the disk use
as a multiple of the source checkpoint, and a memory formula's prediction for the full depth.
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
    # meta-llama/Llama-3.1-8B's LlamaConfig (32 layers at full depth); --full-pipeline builds it layer by layer
    "llama-3.1-8b": dict(arch="llama", layers=32, hidden=4096, ffn=14336, heads=32, kv_heads=8, vocab=128256,
                         positions=131072, rope_theta=500000.0, rms_norm_eps=1e-5, dtype="bfloat16",
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
}

# Peak RSS from VmHWM, not ru_maxrss: ru_maxrss survives execve, so every stage would report at least this
# benchmark process's own peak (which holds a whole model after make_model).
RUNNER = ("import sys, torch; from sds.cli import main; from sds.core.runtime import peak_rss_mib; rc = main(sys.argv[1:]); "
          "print('PEAK_RSS_KB', int(peak_rss_mib() * 1024), file=sys.stderr); "
          "print('PEAK_GPU_MB', torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else -1, "
          "file=sys.stderr); sys.exit(rc)")


def word_tokenizer(folder: Path, vocab: int, eos: str = "t1") -> None:
    """A word-level tokenizer over ids t0 … t<vocab-1>, split on whitespace (t0 is the unknown word)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", eos_token=eos, pad_token=eos).save_pretrained(folder)


def llama_config(shape: dict):
    from transformers import LlamaConfig

    extra = {k: shape[k] for k in ("rope_theta", "rope_scaling", "rms_norm_eps") if k in shape}
    if "dtype" in shape:
        extra["torch_dtype"] = shape["dtype"]
    if shape["vocab"] == 128256:  # Llama 3's special ids
        extra.update(bos_token_id=128000, eos_token_id=128001)
    return LlamaConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"], num_hidden_layers=shape["layers"],
                       intermediate_size=shape["ffn"], num_attention_heads=shape["heads"],
                       num_key_value_heads=shape.get("kv_heads", shape["heads"]), head_dim=shape["hidden"] // shape["heads"],
                       max_position_embeddings=shape["positions"], tie_word_embeddings=shape.get("tied", False),
                       hidden_act="silu", attention_bias=False, mlp_bias=False, initializer_range=0.02, **extra)


def make_sharded_model(folder: Path, shape: dict, seed: int = 0, max_shard_bytes: int = 10**9) -> None:
    """A random-weight LLaMA-architecture checkpoint written tensor by tensor, in the shape's dtype, as
    safetensors shards of at most `max_shard_bytes` with a model.safetensors.index.json (what
    save_pretrained(max_shard_size="1GB") writes): the builder holds one shard at a time (~1 GB), never the
    model. Linear weights and embeddings ~ N(0, 0.02²), norms ones, as LlamaForCausalLM initialises them."""
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    cfg = llama_config(shape)
    dtype = getattr(torch, shape.get("dtype", "float32"))
    with init_empty_weights():
        meta = LlamaForCausalLM(cfg)
    names = [(n, tuple(p.shape)) for n, p in meta.state_dict().items()]
    gen = torch.Generator().manual_seed(seed)
    shards, shard, size = [], {}, 0
    for name, dims in names:
        numel = 1
        for d in dims:
            numel *= d
        nbytes = numel * dtype.itemsize
        if shard and size + nbytes > max_shard_bytes:
            shards.append(shard)
            _flush_shard(folder, shards, save_file)
            shard, size = {}, 0
        if name.endswith("norm.weight"):
            shard[name] = torch.ones(dims, dtype=dtype)
        else:  # drawn in float32 a few rows at a time, so the embeddings never exist in float32 whole
            t = shard[name] = torch.empty(dims, dtype=dtype)
            for r in range(0, dims[0], 4096):
                t[r:r + 4096] = torch.randn((min(4096, dims[0] - r), *dims[1:]), generator=gen) * 0.02
        size += nbytes
    shards.append(shard)
    _flush_shard(folder, shards, save_file)
    total = len(shards)
    weight_map = {}
    for i in range(1, total + 1):  # rename model-0000i.safetensors to model-0000i-of-0000N.safetensors
        tmp, final = folder / f"shard-{i:05d}.safetensors", folder / f"model-{i:05d}-of-{total:05d}.safetensors"
        tmp.rename(final)
        for name in _shard_names.pop(i):
            weight_map[name] = final.name
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": sum(_numel(d) * dtype.itemsize for _, d in names)},
         "weight_map": weight_map}, indent=2))
    cfg.save_pretrained(folder)
    word_tokenizer(folder, shape["vocab"], eos="t128001" if shape["vocab"] == 128256 else "t1")


_shard_names: dict[int, list[str]] = {}


def _numel(dims) -> int:
    n = 1
    for d in dims:
        n *= d
    return n


def _flush_shard(folder: Path, shards: list, save_file) -> None:
    i = len(shards)
    _shard_names[i] = list(shards[-1])
    save_file(shards[-1], str(folder / f"shard-{i:05d}.safetensors"), metadata={"format": "pt"})
    shards[-1] = None  # written: free the tensors


def make_model(folder: Path, shape: dict, seed: int = 0) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

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
    word_tokenizer(folder, shape["vocab"])


def make_text(path: Path, tokens: int, vocab: int, seed: int = 0) -> None:
    import random

    rng = random.Random(seed)
    path.write_text(" ".join(f"t{rng.randrange(2, vocab)}" for _ in range(tokens)))


def du(path: Path) -> int:
    if not path.exists():
        return 0
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
                           "evaluate": {"datasets": {"calib": str(text)}, "seqlen": seqlen, "max_windows": 4,
                                        "zeroshot": {"enabled": False}},
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


# --full-pipeline: the Snakemake workflow itself on an external model folder

FULL_STAGES = ("calibration", "layer_inputs", "activations", "prune1", "prune1_adjust", "reconstruct", "prune2",
               "evaluate_dense", "evaluate_prune1", "evaluate_prune1_adjust", "evaluate_sds", "export_prune1",
               "export_prune1_adjust", "report")
SMALL = ("logs", "benchmarks", "config", "eval", "report", "mlflow_pending", "tasks")  # the tiny stuff


def workflow_config(run: str, model: Path, calib: Path, text: Path, method: str, pattern: str, nsamples: int,
                    seqlen: int, steps: int, threads: int) -> dict:
    """The bench's run: small calibration, one method and pattern, solvers cut to `steps`, perplexity on a
    few windows, no zero-shot, no MLflow."""
    return {"run": run, "threads": threads, "model": {"source": str(model), "dtype": "auto"},
            "calibration": {"source": str(calib), "nsamples": nsamples, "seqlen": seqlen},
            "prune": {"methods": [method], "patterns": [pattern]},
            "reconstruct": {"default": {"solver": "fista", "steps": steps}},
            "prune2": {"selection": "pruner", "adjust": "fista", "adjust_steps": steps},
            "evaluate": {"seqlen": seqlen, "max_windows": 4, "datasets": {"text": str(text)},
                         "zeroshot": {"enabled": False}},
            "mlflow": {"enabled": False}}


def rule_outputs(L, method: str, slug: str, recon: str) -> dict:
    """(benchmark/log name, its parts, output folder or file) of every rule of a one-method, one-pattern run:
    a rule's benchmark file is L.benchmark(name, *parts) and its log L.log(name, *parts)."""
    m, p, r, c = method, slug, recon, L.checkpoint
    return {
        "calibration": ("calibration", (), L.calibration),
        "layer_inputs": ("layer_inputs", (), L.layer_inputs),
        "activations": ("activations", (), L.dense_activations),
        "prune1": ("prune1", (m, p), c(m, p, "prune1")),
        "prune1_adjust": ("prune1_adjust", (m, p), c(m, p, "prune1_adjust")),
        "reconstruct": ("reconstruct", (m, p, r), L.reconstruct(m, p, r)),
        # the SDS checkpoint folder; its model/ (the loadable copy) is counted with the exports
        "prune2": ("prune2", (m, p, r), L.sds(m, p, r)),
        "evaluate_dense": ("evaluate", ("dense",), L.evaluation()),
        "evaluate_prune1": ("evaluate", (m, p, "prune1"), L.evaluation(m, p, "prune1")),
        "evaluate_prune1_adjust": ("evaluate", (m, p, "prune1_adjust"), L.evaluation(m, p, "prune1_adjust")),
        "evaluate_sds": ("evaluate", (m, p, r, "sds"), L.evaluation(m, p, "sds", r)),
        "export_prune1": ("export", (m, p, "prune1"), L.export(m, p, "prune1")),
        "export_prune1_adjust": ("export", (m, p, "prune1_adjust"), L.export(m, p, "prune1_adjust")),
        "report": ("report", (), L.report_dir),
    }


def log_peak_rss(path: Path) -> float:
    """The largest 'peak RSS <n> MiB' a stage's log reports (its own VmHWM, read at each layer's end and at
    the stage's end): Snakemake samples RSS every few seconds and can miss a short peak."""
    import re

    peaks = [float(x) for x in re.findall(r"peak RSS (\d+(?:\.\d+)?) MiB", path.read_text())] if path.exists() else []
    return max(peaks) if peaks else float("nan")


def read_benchmark(path: Path) -> dict:
    """Snakemake's benchmark TSV: one header line, one row per repeat (s = wall seconds, max_rss = MiB)."""
    head, row = path.read_text().splitlines()[:2]
    rec = dict(zip(head.split("\t"), row.split("\t")))
    num = lambda v: float(v) if v not in ("-", "NA", "") else float("nan")  # noqa: E731
    return {"seconds": num(rec["s"]), "max_rss": num(rec["max_rss"])}


def layer_peaks(path: Path) -> list[float]:
    """The peak RSS a stage's log reports at the end of each decoder layer ('layer i/N · … · peak RSS x MiB')."""
    import re

    if not path.exists():
        return []
    return [float(m) for m in re.findall(r"layer \d+/\d+ .*?peak RSS (\d+(?:\.\d+)?) MiB", path.read_text())]


def run_workflow(shape: dict, work: Path, method: str, pattern: str, nsamples: int, seqlen: int, steps: int,
                 threads: int, collect_only: bool = False) -> dict:
    """Builds the model folder (once per depth) and runs `snakemake ... -- all export` in `work` (unless
    `collect_only`), then collects per rule seconds, peak RSS and bytes written, plus the disk totals."""
    from sds.core.layout import RunLayout

    work.mkdir(parents=True, exist_ok=True)
    model, calib, text = work / "source-model", work / "calib.txt", work / "eval.txt"
    run = f"{shape.get('name', 'bench')}-l{shape['layers']}"
    L = RunLayout(run)
    wall = None
    if not collect_only:
        if not (model / "model.safetensors.index.json").exists():
            t = time.monotonic()
            make_sharded_model(model, shape)
            print(f"  built {model} in {time.monotonic() - t:.0f} s", flush=True)
        make_text(calib, max(nsamples * seqlen * 4, 20_000), shape["vocab"], seed=1)
        make_text(text, max(4 * seqlen * 2, 5_000), shape["vocab"], seed=2)
        cfg = workflow_config(run, model, calib, text, method, pattern, nsamples, seqlen, steps, threads)
        cfg_path = work / "config.yaml"
        cfg_path.write_text(json.dumps(cfg, indent=2))  # JSON is YAML
        cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "-d", str(work), "--cores",
               str(threads), "--configfile", str(cfg_path), "--", "all", "export"]
        print("  $ " + " ".join(cmd), flush=True)
        start = time.monotonic()
        with open(work / "snakemake.log", "w") as log:
            proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=stage_env())
        wall = time.monotonic() - start
        if proc.returncode:
            raise RuntimeError(f"snakemake failed (exit {proc.returncode}) after {wall:.0f} s: see "
                               f"{work / 'snakemake.log'} and {work / L.root / 'logs'}")
    return collect(work, L, model, method, pattern, wall)


def collect(work: Path, L, model: Path, method: str, pattern: str, wall: float | None) -> dict:
    from sds.core.layout import MODEL
    from sds.core.patterns import parse_pattern

    slug = parse_pattern(pattern).slug
    rows = {}
    for name, (stage_name, parts, out) in rule_outputs(L, method, slug, "default").items():
        bench = work / L.benchmark(stage_name, *parts)
        if not bench.exists():
            continue
        out = work / out
        written = du(out) if out.exists() else 0
        if name == "prune2":
            written -= du(out / MODEL)
        log = work / L.log(stage_name, *parts)
        rows[name] = {**read_benchmark(bench), "log_rss": log_peak_rss(log), "layer_rss": layer_peaks(log),
                      "bytes": written}
    root = work / L.root
    source = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    sds_model = f"{method}/{slug}/default/sds/{MODEL}"
    exports = {f"export/{method}/{slug}/{s}": du(work / L.export(method, slug, s)) for s in ("prune1", "prune1_adjust")}
    exports[sds_model] = du(work / L.sds(method, slug, "default") / MODEL)
    small = sum(du(root / d) for d in SMALL if (root / d).exists())
    stages = du(root) - du(root / "export") - exports[sds_model] - small
    return {"rows": rows, "wall": wall, "source_bytes": source, "stage_bytes": stages, "exports": exports,
            "small_bytes": small}


def print_full(shape: dict, results: dict[int, dict], nsamples: int, seqlen: int) -> None:
    depths = sorted(results)
    a, b = depths[0], depths[-1]
    names = [n for n in FULL_STAGES if all(n in results[d]["rows"] for d in depths)]
    mib = 2**20
    print(f"\nper rule: wall s and peak RSS MiB from Snakemake's benchmark file (s, max_rss), the stage's own "
          f"peak RSS (VmHWM, its log), MiB written; {' vs '.join(map(str, depths))} layers")
    head = f"{'rule':23s}" + "".join(f" {'s N=' + str(d):>8s}" for d in depths) + \
        "".join(f" {'RSS N=' + str(d):>9s}" for d in depths) + f" {'ratio':>6s}" + \
        "".join(f" {'HWM N=' + str(d):>9s}" for d in depths) + f" {'ratio':>6s}" + \
        "".join(f" {'MiB N=' + str(d):>10s}" for d in depths)
    print(head)
    for n in names:
        r = [results[d]["rows"][n] for d in depths]
        print(f"{n:23s}" + "".join(f" {x['seconds']:8.1f}" for x in r) + "".join(f" {x['max_rss']:9.0f}" for x in r)
              + f" {r[-1]['max_rss'] / r[0]['max_rss']:6.3f}" + "".join(f" {x['log_rss']:9.0f}" for x in r)
              + f" {r[-1]['log_rss'] / r[0]['log_rss']:6.3f}" + "".join(f" {x['bytes'] / mib:10.1f}" for x in r))
    if all(results[d]["wall"] for d in depths):
        print(f"{'snakemake wall':23s}" + "".join(f" {results[d]['wall']:8.1f}" for d in depths))
    print("\ndisk under results/<run>/ as a multiple of the source checkpoint's safetensors "
          "(logs, benchmarks, config, eval, report left out)")
    for d in depths:
        r = results[d]
        src = r["source_bytes"]
        ex = ", ".join(f"{k} " + (f"{v / src:.2f}x" if v else "- (not written)") for k, v in r["exports"].items())
        print(f"  N={d}: source {src / mib:.0f} MiB; stages {r['stage_bytes'] / mib:.0f} MiB = "
              f"{r['stage_bytes'] / src:.2f}x (target <= 5x); exports: {ex} (target 1x each); "
              f"left out {r['small_bytes'] / mib:.1f} MiB")
    # the same at full depth: what a run writes grows with the decoder layers only (the embeddings and the head
    # are written by the exports alone), so per-layer bytes x the full depth over the full checkpoint's bytes
    h, f, v = shape["hidden"], shape["ffn"], shape["vocab"]
    kv = h // shape["heads"] * shape.get("kv_heads", shape["heads"])
    full = shape["layers"]
    per_layer_weights = (2 * h * h + 2 * h * kv + 3 * h * f) * 2
    outside = v * h * 2 * (1 if shape.get("tied") else 2)
    full_source = full * per_layer_weights + outside
    d = b
    r = results[d]
    layer_bytes = r["stage_bytes"] / d
    print(f"  at N={full} (extrapolated from N={d}: {layer_bytes / mib:.0f} MiB of stage outputs per layer; source "
          f"{full_source / mib:.0f} MiB): stages {full * layer_bytes / full_source:.2f}x; exports: " + ", ".join(
              f"{k} " + (f"{(full_source + (v_ - r['source_bytes']) / d * full) / full_source:.2f}x" if v_ else "-")
              for k, v_ in r["exports"].items()))
    # memory formula: RSS(N) = fixed + embeddings + head + one layer + activations (+ slope × N if not flat)
    h, f, v = shape["hidden"], shape["ffn"], shape["vocab"]
    kv = h // shape["heads"] * shape.get("kv_heads", shape["heads"])
    emb = v * h * 2 / mib  # bf16
    head_mib = 0 if shape.get("tied") else emb
    layer = (2 * h * h + 2 * h * kv + 3 * h * f) * 2 / mib
    acts = nsamples * seqlen * h * 4 / mib  # one float32 hidden-state batch
    stats = (3 * h * h + f * f) * 4 / mib  # one layer's float32 input Hessians (q/k/v share one; o; gate/up; down)
    logits = 256  # evaluation's logit chunk
    terms = {  # what each rule holds of the shape at its peak (beyond the fixed part: Python, torch, buffers)
        "calibration": 0, "report": 0, "layer_inputs": emb + acts,
        # a LayerwiseModel holds the embeddings (and norms) throughout, the head only where it is used
        "activations": emb + layer + acts, "reconstruct": emb + layer + stats,
        "prune1": emb + layer + stats + acts, "prune1_adjust": emb + layer + stats + acts,
        "prune2": emb + layer + stats + acts, "evaluate_dense": emb + head_mib + layer + acts + logits,
        "export_prune1": emb + layer, "export_prune1_adjust": emb + layer}
    for n in ("evaluate_prune1", "evaluate_prune1_adjust", "evaluate_sds"):
        terms[n] = terms["evaluate_dense"]
    print(f"\nmemory formula, peak host RSS(N) = fixed + shape terms + slope x N [MiB]; shape terms per rule from: "
          f"embeddings {emb:.0f}, head {head_mib:.0f}, one layer {layer:.0f} (bf16), its fp32 Hessians {stats:.0f}, "
          f"activations {acts:.0f} (fp32 {nsamples}x{seqlen}x{h}), logit chunk {logits}")
    print(f"peak = the larger of Snakemake's max_rss and the stage's own VmHWM; fixed and slope from the N={a} and "
          f"N={b} measurements (one depth: slope taken as 0); predicted at N={full}")
    print(f"{'rule':23s} {'RSS N=' + str(a):>9s} {'RSS N=' + str(b):>9s} {'per layer':>14s} {'slope/layer':>11s} "
          f"{'terms':>6s} {'fixed':>6s} {'pred N=' + str(full):>10s}")
    for n in names:
        ra, rb = (max(results[d]["rows"][n]["max_rss"], results[d]["rows"][n]["log_rss"] if
                      results[d]["rows"][n]["log_rss"] == results[d]["rows"][n]["log_rss"] else 0) for d in (a, b))
        slope = (rb - ra) / (b - a) if b > a else 0.0
        t = terms.get(n, 0)
        fixed = ra - slope * a - t
        lp = results[b]["rows"][n]["layer_rss"]
        within = f"{lp[0]:.0f}->{lp[-1]:.0f}" if lp else "-"  # the deeper run's peak after its first and last layer
        print(f"{n:23s} {ra:9.0f} {rb:9.0f} {within:>14s} {slope:11.1f} {t:6.0f} {fixed:6.0f} "
              f"{ra + slope * (full - a):10.0f}")


def print_rows(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    print(f"{'stage':14s} {'seconds':>9s} {'peak RSS MiB':>13s} {'MiB written':>12s}")
    for r in rows:
        print(f"{r['stage']:14s} {r['seconds']:9.1f} {r['peak_rss_mib']:13.0f} {r['bytes_written'] / 2**20:12.1f}")
    print(f"{'total':14s} {sum(r['seconds'] for r in rows):9.1f} {max(r['peak_rss_mib'] for r in rows):13.0f}")


def eval_depth(shape: dict, depths: list[int], base: Path, seqlen: int, threads: int, prune: bool) -> int:
    """Stages as their own processes at each depth, on a model folder of `shape` (bf16, sharded, as
    --full-pipeline builds it): evaluate (dense); with `prune` also calibration, layer_inputs, prune1
    (wanda 2:4), its export and its evaluation. Peak RSS must not grow with depth."""
    from sds.core.config import validate_config

    rows: dict[int, list[dict]] = {}
    for layers in depths:
        work = base / f"eval-l{layers}"
        work.mkdir(parents=True, exist_ok=True)
        model = work / "source-model"
        if not (model / "config.json").is_file():
            make_sharded_model(model, dict(shape, layers=layers))
        text = work / "eval.txt"
        make_text(text, 8 * seqlen, shape["vocab"])
        config = workflow_config(f"eval-l{layers}", model, text, text, "wanda", "2:4", 4, seqlen, 2, threads)
        (work / "config.json").write_text(json.dumps(validate_config(config)))
        cfg = work / "config.json"
        print(f"{layers} layers: {'prune1 (wanda 2:4, 4 x %d), its export and ' % seqlen if prune else ''}"
              f"evaluate, 4 windows of {seqlen}", flush=True)
        rows[layers] = [stage(cfg, "evaluate", work / "dense.json", model_dir=model)]
        if prune:
            rows[layers].append(stage(cfg, "calibration", work / "calibration.parquet", model_dir=model))
            rows[layers].append(stage(cfg, "layer_inputs", work / "input", model_dir=model,
                                      calibration_file=work / "calibration.parquet"))
            prune1 = work / "wanda" / "2of4" / "prune1"
            rows[layers].append(stage(cfg, "prune1", prune1, model_dir=model, inputs_dir=work / "input",
                                      method="wanda", pattern="2of4", cache_stream="false"))
            rows[layers].append(stage(cfg, "export", work / "export" / "wanda" / "2of4" / "prune1", model_dir=model,
                                      checkpoint=prune1, stage="prune1", method="wanda", pattern="2of4"))
            rows[layers].append(stage(cfg, "evaluate", work / "prune1.json", model_dir=model,
                                      weights=prune1 / "weights.safetensors", stage="prune1", method="wanda",
                                      pattern="2of4"))
    first = rows[depths[0]]
    print(f"{'stage':14s} " + " ".join(f"{'s N=%d' % n:>8s} {'RSS N=%d' % n:>9s}" for n in depths) +
          f" {'RSS ratio':>9s}")
    for k, row in enumerate(first):
        name = row["stage"] + (" (prune1)" if row["stage"] == "evaluate" and k else "")
        cells = " ".join(f"{rows[n][k]['seconds']:8.1f} {rows[n][k]['peak_rss_mib']:9.0f}" for n in depths)
        print(f"{name:14s} {cells} {rows[depths[-1]][k]['peak_rss_mib'] / row['peak_rss_mib']:9.3f}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="opt-125m")
    ap.add_argument("--layers", type=int, nargs="+",
                    help="override the depth (e.g. 6 vs 12 for the memory check); with --full-pipeline one run "
                         "per depth given (e.g. 2 4)")
    ap.add_argument("--full-pipeline", action="store_true",
                    help="run the Snakemake workflow (all export) on an external model folder of --shape per depth "
                         "in --layers; nsamples/seqlen default 4 x 128 here, --solver-steps 2")
    ap.add_argument("--nsamples", type=int)
    ap.add_argument("--seqlen", type=int)
    ap.add_argument("--method", default=None, help="default: sparsegpt (--full-pipeline: wanda)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pattern", default="2:4")
    ap.add_argument("--curve", action="store_true", help="cost-curve table on small shapes")
    ap.add_argument("--curve-rows", nargs="+", metavar="HIDDEN:LAYERS:NSAMPLES:SEQLEN",
                    help="with --curve: run only these rows (e.g. 1536:1:4:1024) instead of the default five")
    ap.add_argument("--depth-check", action="store_true",
                    help="peak RSS per stage for 6 vs 12 layers (solver steps cut to 5: memory, not time)")
    ap.add_argument("--solver-steps", type=int,
                    help="cut FISTA and the adjustment to N FISTA steps (a wide slice's solvers take hours on "
                         "a CPU; the rest of each stage is then measured as is)")
    ap.add_argument("--eval-depth", action="store_true",
                    help="the evaluate stage alone (perplexity, layer by layer) on --shape at each depth in --layers "
                         "(e.g. 2 4): seconds and peak RSS side by side, and their ratio")
    ap.add_argument("--with-prune1", action="store_true",
                    help="with --eval-depth: also calibration, layer_inputs, prune1, its export and its evaluation")
    ap.add_argument("--workdir")
    ap.add_argument("--collect-only", action="store_true",
                    help="with --full-pipeline: run nothing, print the tables from the runs already in --workdir")
    args = ap.parse_args()
    base = Path(args.workdir or tempfile.mkdtemp(prefix="sds-scale-"))
    if args.eval_depth:
        return eval_depth(SHAPES[args.shape], args.layers or [2, 4], base, args.seqlen or 128, args.threads,
                          prune=args.with_prune1)
    if args.full_pipeline:
        nsamples, seqlen = args.nsamples or 4, args.seqlen or 128
        method, steps = args.method or "wanda", args.solver_steps or 2
        results = {}
        for layers in args.layers or [2, 4]:
            shape = dict(SHAPES[args.shape], layers=layers, name=args.shape)
            print(f"{args.shape} with {layers} layers: snakemake all export, {method} {args.pattern}, "
                  f"{nsamples} x {seqlen} calibration, solvers {steps} steps", flush=True)
            results[layers] = run_workflow(shape, base / f"l{layers}", method, args.pattern, nsamples, seqlen,
                                           steps, args.threads, collect_only=args.collect_only)
            (base / f"l{layers}" / "bench.json").write_text(json.dumps(results[layers], indent=1))
            print_full(dict(SHAPES[args.shape], name=args.shape), {layers: results[layers]}, nsamples, seqlen)
        if len(results) > 1:
            print_full(dict(SHAPES[args.shape], name=args.shape), results, nsamples, seqlen)
        return 0
    args.nsamples, args.seqlen = args.nsamples or 8, args.seqlen or 512
    args.method = args.method or "sparsegpt"
    args.layers = args.layers[0] if args.layers else None
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
