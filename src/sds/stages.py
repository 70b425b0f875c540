"""The pipeline's stages. Each Snakemake rule calls exactly one function here (through `sds.cli`).

A stage reads its inputs, does its work through the plumbing (`model`, `layerwise`) and the algorithms
(`pruners`, `reconstruct`), writes its outputs atomically (`io`) and records itself in MLflow (`tracking`).
"""
from __future__ import annotations

import contextlib
import logging
import os
import platform
import signal
import subprocess
import time
from pathlib import Path

import torch

from . import __version__
from .config import config_hash
from .io import (CHECKSUM_SUFFIX, HOW_TO_RECREATE, CorruptFileError, ParquetTensorWriter, SafetensorsStreamWriter,
                 TensorReader, atomic_dir, checksum_folder, iter_parquet_tensors, load_tensors,
                 load_tensors_with_metadata, read_json, save_tensors, write_json, write_text)
from .model import LayerwiseModel, apply_weights, clone_layer, find_linears, load_model
from .layerwise import StatsAccumulator, collect_stats, propagate, update_layer
from .pruners import pattern_from_slug, prune
from .reconstruct import adjust, fista, relative_error
from .tracking import record_stage

log = logging.getLogger("sds")


# --- shared helpers ----------------------------------------------------------------------------------

def _fault_injection(what: str, done: int) -> None:
    """Test hook: SDS_FAULT_KILL="<stage word>:<n>" SIGKILLs this process after step n of that stage, to
    prove that a killed stage leaves no partial output and that a re-run gives identical results."""
    spec = os.environ.get("SDS_FAULT_KILL")
    if spec:
        word, _, n = spec.partition(":")
        if what.startswith(word) and done == int(n or 1):
            os.kill(os.getpid(), signal.SIGKILL)


def peak_rss_mib() -> float:
    """This process's peak resident memory so far, in MiB. On Linux from VmHWM: ru_maxrss survives
    execve, so a stage started by a large parent (Snakemake, a benchmark) would report the parent's peak."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def release_memory() -> None:
    """Between layers: drop unreachable objects and hand freed heap pages back to the OS (glibc keeps
    freed chunks below its mmap threshold, such as per-sequence activations, in the heap). Measured: this
    alone does not stop the resident set creeping up with depth (docs/performance.md)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


class Progress:
    """Logs 'what i/n · elapsed · ETA' lines (to the terminal and the rule's log via stderr)."""

    def __init__(self, what: str, total: int):
        self.what, self.total, self.start = what, total, time.monotonic()

    def __call__(self, done: int, total: int | None = None, extra: str = "") -> None:
        _fault_injection(self.what, done)
        total = total or self.total
        elapsed = time.monotonic() - self.start
        eta = elapsed / done * (total - done) if done else float("nan")
        log.info("%s %d/%d · elapsed %.1fs · ETA %.1fs · peak RSS %.0f MiB%s", self.what, done, total, elapsed, eta,
                 peak_rss_mib(), f" · {extra}" if extra else "")


def setup(config: dict) -> torch.device:
    torch.set_num_threads(config["threads"])
    torch.manual_seed(config["seed"])
    want = config["device"]
    if want == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("config key 'device' = 'cuda' but CUDA is not available on this machine")
    use_cuda = want == "cuda" or (want == "auto" and torch.cuda.is_available())
    return torch.device("cuda" if use_cuda else "cpu")


def provenance() -> dict:
    rev = "unknown"
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=5, cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        pass
    import transformers

    return {"sds_version": __version__, "git_revision": rev, "torch_version": torch.__version__,
            "transformers_version": transformers.__version__, "python_version": platform.python_version()}


def _track(config, stage, *, params=None, metrics=None, artifacts=(), parent_artifacts=()):
    record_stage(config, config_hash(config), stage, params=params or {}, metrics=metrics or {},
                 artifacts=list(artifacts), parent_artifacts=list(parent_artifacts), provenance=provenance())


def _model(config: dict, model_dir: str, device) -> tuple:
    return load_model(model_dir, dtype=config["model"]["dtype"],
                      trust_remote_code=config["model"]["trust_remote_code"], device=str(device))


def _layerwise_model(config: dict, model_dir: str, device) -> LayerwiseModel:
    """The model for layer-by-layer stages: one decoder layer in memory at a time (see LayerwiseModel)."""
    return LayerwiseModel(model_dir, dtype=config["model"]["dtype"],
                          trust_remote_code=config["model"]["trust_remote_code"], device=str(device))


def _cache_file(directory: str | Path, layer: int) -> Path:
    return Path(directory) / f"layer_{layer:03d}.parquet"


def _iter_file(path, dtype, device):
    return (t.to(device, dtype) for t in iter_parquet_tensors(path))


def _iter_stream(directory, layer, dtype, device):
    return _iter_file(_cache_file(directory, layer), dtype, device)


class _WorkStream:
    """The hidden states a layer-by-layer pass carries from one decoder layer to the next, kept on disk
    (Parquet in the model's dtype, so nothing is rounded) and read one row group at a time: memory does
    not grow with nsamples × seqlen or with depth. Files live in `folder` (inside the stage's temporary
    output folder) and each is deleted as soon as the next layer's file is complete."""

    def __init__(self, folder: Path, first: Path, dtype, device, row_group_size: int):
        self.folder, self.current, self.dtype, self.device = Path(folder), Path(first), dtype, device
        self.row_group_size = row_group_size
        self.folder.mkdir(parents=True, exist_ok=True)

    def __iter__(self):
        return _iter_file(self.current, self.dtype, self.device)

    def advance(self, outputs, layer: int, also=None) -> None:
        """Writes `outputs` (the next layer's inputs) as the new current file; `also` gets them too."""
        path = self.folder / f"stream_{layer:03d}.parquet"
        with ParquetTensorWriter(path, dtype=self.dtype, row_group_size=self.row_group_size) as writer:
            for h in outputs:
                writer.append(h)
                if also is not None:
                    also.append(h)
        self._drop_current()
        self.current = path

    def _drop_current(self):
        if self.current.parent == self.folder:
            self.current.unlink()
            self.current.with_name(self.current.name + CHECKSUM_SUFFIX).unlink(missing_ok=True)

    def close(self):
        self._drop_current()
        if not any(self.folder.iterdir()):
            self.folder.rmdir()


def _tee(stream, writer):
    """Yields `stream` unchanged while appending each item to `writer` (None: no copy)."""
    for item in stream:
        if writer is not None:
            writer.append(item)
        yield item


def _cache_dtype(config) -> torch.dtype:
    return getattr(torch, config["activations"]["dtype"])


def _stream_writer(config, directory, layer) -> ParquetTensorWriter:
    act = config["activations"]
    return ParquetTensorWriter(_cache_file(directory, layer), dtype=_cache_dtype(config),
                               row_group_size=act["row_group_size"], compression=act["compression"])


class _CheckpointWriter:
    """weights.safetensors (every decoder linear of `layers`), masks.safetensors (with `masks`) and
    layers.json, written layer by layer as a pass finishes each: no stage holds more than one layer's
    weights, whatever the depth. Also counts each layer's exact zeros (the model card's sparsity)."""

    def __init__(self, out_dir: Path, lm: LayerwiseModel, layers, *, masks: bool):
        specs = lm.linear_specs(layers)
        self.out_dir, self.lm, self.infos, self.zeros = Path(out_dir), lm, {}, {}
        self.weights = SafetensorsStreamWriter(self.out_dir / "weights.safetensors", specs)
        self.masks = SafetensorsStreamWriter(self.out_dir / "masks.safetensors",
                                             {k: (torch.uint8, shape) for k, (_, shape) in specs.items()}
                                             ) if masks else None

    def add(self, i: int, layer_infos: dict[str, dict]) -> None:
        """Writes decoder layer i's current linear weights (and the masks in `layer_infos`)."""
        zeros = total = 0
        for name, full in self.lm.linear_names(i).items():
            weight = self.lm.layers[i].get_submodule(name).weight.detach()
            self.weights.write(full, weight)
            zeros, total = zeros + int((weight == 0).sum()), total + weight.numel()
            info = dict(layer_infos[name])
            mask = info.pop("mask", None)
            if self.masks is not None:
                self.masks.write(full, mask.to(torch.uint8))
            self.infos[full] = info
        self.zeros[i] = (zeros, total)

    def sparsity(self) -> dict:
        zeros, total = (sum(v[k] for v in self.zeros.values()) for k in (0, 1))
        return {"overall": zeros / max(total, 1), "per_layer": {i: z / t for i, (z, t) in self.zeros.items()}}

    def close(self, extra: dict | None = None) -> dict:
        self.weights.close()
        if self.masks is not None:
            self.masks.close()
        summary = {"linears": self.infos, **(extra or {})}
        write_json(self.out_dir / "layers.json", summary)
        return summary


# --- 1. corpus and model ------------------------------------------------------------------------------

def corpus(config: dict, out: str) -> None:
    """Writes train.txt / test.txt: the generated corpus, or copies of configured text files."""
    from .corpus import builtin_splits

    spec = config["model"]["builtin"]["corpus"]
    with atomic_dir(out) as tmp:
        if spec["source"] == "generated":
            splits = builtin_splits(spec["documents"], spec["test_documents"], config["seed"])
        else:
            splits = {"train": Path(spec["train_path"]).read_text(encoding="utf-8"),
                      "test": Path(spec["test_path"]).read_text(encoding="utf-8")}
        for name, text in splits.items():
            if len(text.split()) < 1000:
                raise ValueError(f"corpus split {name!r} has only {len(text.split())} words; at least 1000 needed")
            (tmp / f"{name}.txt").write_text(text, encoding="utf-8")
    log.info("corpus: train %d chars, test %d chars", len(splits["train"]), len(splits["test"]))


def build_model(config: dict, corpus_dir: str, out: str) -> None:
    """Trains the embedded default model (tokenizer + small OPT) on the corpus's train split."""
    from .modelbuild import build_model as train

    setup(config)  # seed; training runs on the CPU with its own thread count
    b = config["model"]["builtin"]
    torch.set_num_threads(b["threads"])
    text = (Path(corpus_dir) / "train.txt").read_text(encoding="utf-8")
    progress = Progress("train step", b["steps"])
    start = time.monotonic()
    with atomic_dir(out) as tmp:
        info = train(text, tmp, vocab_size=b["vocab_size"], layers=b["layers"], hidden=b["hidden"],
                     ffn=b["ffn"], heads=b["heads"], max_positions=b["max_positions"], steps=b["steps"],
                     batch_size=b["batch_size"], seqlen=b["seqlen"], lr=b["lr"], seed=config["seed"],
                     progress=lambda s, n, loss, _e: progress(s, n, f"loss {loss:.3f}") if s % 250 == 0 else None)
        info["seconds"] = time.monotonic() - start
        checksum_folder(tmp)
        write_json(tmp / "build.json", info)
    log.info("model built in %.1fs: %d parameters, final train loss %.3f", info["seconds"], info["parameters"],
             info["final_train_loss"])
    _track(config, "build_model", params=b, metrics=[("train_loss", v, (i + 1) * 10) for i, v in
                                                      enumerate(info["loss_curve"])] +
           [("parameters", info["parameters"], 0), ("seconds", info["seconds"], 0)])


# --- 2. calibration -------------------------------------------------------------------------------------

def calibration(config: dict, model_dir: str, corpus_dir: str | None, out: str) -> None:
    """Samples nsamples × seqlen token windows (seeded) → Parquet of token ids."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from .data import read_text_source, sample_windows, tokenize
    from .io import atomic_path

    setup(config)
    cal = config["calibration"]
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=config["model"]["trust_remote_code"])
    text = read_text_source(cal["source"], text_field=cal["text_field"],
                            builtin_text=Path(corpus_dir) / "train.txt" if corpus_dir else None, split="train")
    ids = tokenize(tokenizer, text)
    windows = sample_windows(ids, cal["nsamples"], cal["seqlen"], config["seed"])
    table = pa.table({"input_ids": pa.array(windows.to(torch.int32).tolist(), type=pa.list_(pa.int32()))})
    with atomic_path(out, checksum=True, record=True) as tmp:  # record: the CLI may delete it if corrupt
        pq.write_table(table, str(tmp))
    log.info("calibration: %d windows × %d tokens from %s (%d tokens)", *windows.shape, cal["source"], ids.numel())
    _track(config, "calibration", params=cal, metrics={"source_tokens": ids.numel()})


def read_calibration(path: str) -> torch.Tensor:
    import pyarrow.parquet as pq

    from .io import CorruptFileError, HOW_TO_RECREATE, verify_checksum

    verify_checksum(path)
    try:
        column = pq.read_table(str(path), columns=["input_ids"]).column("input_ids").to_pylist()
    except Exception as exc:
        raise CorruptFileError(f"{path}: not a readable calibration file ({exc}); {HOW_TO_RECREATE}") from None
    return torch.tensor(column, dtype=torch.long)


# --- 3. dense activation cache --------------------------------------------------------------------------

def activations(config: dict, model_dir: str, calibration_file: str, out: str) -> None:
    """Runs the dense model layer by layer; caches each decoder layer's input (and the last output),
    one Parquet file per layer boundary: layer_i = input of layer i = dense output of layer i−1."""
    device = setup(config)
    lm = _layerwise_model(config, model_dir, device)
    windows = read_calibration(calibration_file)
    kwargs = lm.kwargs(windows.shape[1])
    from .model import capture_layer_inputs

    model, dtype = lm.model, lm.dtype
    progress = Progress("activations layer", len(lm))
    rg = config["activations"]["row_group_size"]
    with atomic_dir(out) as tmp:
        first = tmp / "work" / "stream_000.parquet"
        first.parent.mkdir()
        with _stream_writer(config, tmp, 0) as cache, \
                ParquetTensorWriter(first, dtype=dtype, row_group_size=rg) as work:
            for row in windows:
                hidden, _ = capture_layer_inputs(model, row.unsqueeze(0))
                cache.append(hidden[0])
                work.append(hidden[0])
        stream = _WorkStream(tmp / "work", first, dtype, device, rg)
        for i in range(len(lm)):
            with _stream_writer(config, tmp, i + 1) as cache:
                stream.advance(propagate(lm.layer(i), stream, kwargs, layer_name=f"dense layer {i}"), i + 1,
                               also=cache)
            lm.release(i)
            release_memory()
            progress(i + 1)
        stream.close()
        write_json(tmp / "manifest.json", {"layers": len(lm), "nsamples": windows.shape[0],
                                           "seqlen": windows.shape[1], "dtype": config["activations"]["dtype"]})
    _track(config, "activations", params=config["activations"], metrics={"layers": len(lm)})


# --- 4. sequential prune / adjust passes ---------------------------------------------------------------

def _sequential_pass(config, lm: LayerwiseModel, seqlen: int, dense_dir, update, work_dir,
                     checkpoint: _CheckpointWriter, *, source=None, cross=False, stream_out=None, stats_out=None,
                     what="layer"):
    """The SparseGPT/Wanda sequential protocol: for each decoder layer, collect its linears' input
    statistics on the current (already-modified) stream, update its weights, then propagate.

    `update(i, name, W_current, W_dense, stats) -> (W_new, mask, info)`. With `source` (full weight name →
    tensor, e.g. a TensorReader), each layer starts from those weights instead of the dense ones (the
    dense weights stay the target). With `cross`, statistics pair the stream with the dense cache (the
    'dense_stream' target). The stream lives in `work_dir` (see _WorkStream). `stream_out` gets each
    layer's input as a cache (cache dtype); `stats_out` each layer's input statistics (for
    reconstruction). Each finished layer goes to `checkpoint` and leaves memory."""
    kwargs = lm.kwargs(seqlen)
    stream = _WorkStream(work_dir, _cache_file(dense_dir, 0), lm.dtype, lm.device,
                         config["activations"]["row_group_size"])
    progress = Progress(what, len(lm))
    for i in range(len(lm)):
        layer = lm.layer(i)
        names = lm.linear_names(i)
        linears = find_linears(layer)
        dense_weights = {n: m.weight.detach().clone() for n, m in linears.items()}
        dense_layer = clone_layer(layer) if cross else None
        if source is not None:
            with torch.no_grad():
                for n, full in names.items():
                    linears[n].weight.copy_(source[full].to(linears[n].weight.dtype))
        with _stream_writer(config, stream_out, i) if stream_out is not None else contextlib.nullcontext() as cache:
            acc = collect_stats(layer, _tee(stream, cache), kwargs, target_layer=dense_layer,
                                target_stream=_iter_stream(dense_dir, i, lm.dtype, lm.device) if cross else None,
                                layer_name=f"layer {i}")
        if stats_out is not None:
            tensors, meta = acc.to_tensors()
            save_tensors(Path(stats_out) / f"layer_{i:03d}.safetensors", tensors, meta)
        layer_infos = update_layer(layer, acc, lambda n, W, stats: update(i, names[n], W, dense_weights[n], stats))
        acc = dense_layer = dense_weights = None  # freed before the propagation pass
        stream.advance(propagate(layer, stream, kwargs, layer_name=f"layer {i}"), i + 1)
        errs = [v["rel_error"] for v in layer_infos.values() if "rel_error" in v]
        checkpoint.add(i, layer_infos)
        lm.release(i)
        release_memory()
        progress(i + 1, extra=f"mean rel. error {sum(errs) / max(len(errs), 1):.4f}")
    stream.close()
    return checkpoint.infos


def _layer_metrics(infos: dict) -> list:
    metrics = []
    for name, info in sorted(infos.items()):
        for key in ("rel_error", "rel_error_before"):
            if key in info:
                metrics.append((f"{key}.{name}", info[key], 0))
    return metrics


def prune1(config: dict, model_dir: str, calibration_file: str, dense_dir: str, method: str, pattern: str,
           out: str, cache_stream: str = "false") -> None:
    """First prune: one-shot, sequential, every linear of every decoder layer. Also saves each layer's
    input statistics (stats/: what the reconstruction fits on, so it needs no forward pass) and, with
    `cache_stream` (needed only by the 'dense_stream' reconstruction target), the pruned model's
    per-layer inputs (stream/)."""
    device = setup(config)
    pat = pattern_from_slug(pattern)
    p = config["prune"]
    lm = _layerwise_model(config, model_dir, device)
    seqlen = read_calibration(calibration_file).shape[1]

    def update(i, name, W, W_dense, stats):
        new_W, mask = prune(method, W, pat, hessian=stats.H, blocksize=p["blocksize"], percdamp=p["percdamp"])
        return new_W, mask, {"rel_error": relative_error(new_W, W_dense, stats),
                             "sparsity": 1 - float(mask.float().mean())}

    start = time.monotonic()
    with atomic_dir(out) as tmp:
        stream_out = tmp / "stream" if cache_stream == "true" else None
        if stream_out:
            stream_out.mkdir()
        (tmp / "stats").mkdir()
        checkpoint = _CheckpointWriter(tmp, lm, range(len(lm)), masks=True)
        infos = _sequential_pass(config, lm, seqlen, dense_dir, update, tmp / "work", checkpoint,
                                 stream_out=stream_out, stats_out=tmp / "stats", what=f"prune1 {method} {pat} layer")
        checkpoint.close({"method": method, "pattern": str(pat)})
    log.info("prune1 %s %s done in %.1fs", method, pat, time.monotonic() - start)
    _track(config, f"prune1/{method}/{pattern}", params={"method": method, "pattern": str(pat), **p},
           metrics=_layer_metrics(infos) + [("seconds", time.monotonic() - start, 0)])


def _adjust_fn(config):
    p2 = config["prune2"]

    def run(W_dense, stats, mask, W_init):
        if p2["adjust"] == "none":
            return W_init * mask
        return adjust(W_dense, stats, mask, W_init, solver=p2["adjust"], steps=p2["adjust_steps"],
                      percdamp=p2["percdamp"])
    return run


def prune1_adjust(config: dict, model_dir: str, calibration_file: str, dense_dir: str, prune1_dir: str,
                  out: str) -> None:
    """Ablation: the post-prune weight adjustment applied to the first prune's masks directly (no dense
    phase), so the dense phase's own contribution is visible."""
    device = setup(config)
    lm = _layerwise_model(config, model_dir, device)
    seqlen = read_calibration(calibration_file).shape[1]
    first = TensorReader(Path(prune1_dir) / "weights.safetensors")
    masks = TensorReader(Path(prune1_dir) / "masks.safetensors")
    run_adjust = _adjust_fn(config)

    def update(i, name, W, W_dense, stats):
        mask = masks[name].to(W.device).bool()
        new_W = run_adjust(W_dense, stats, mask, W)
        return new_W, mask, {"rel_error": relative_error(new_W, W_dense, stats),
                             "rel_error_before": relative_error(W, W_dense, stats)}

    start = time.monotonic()
    cross = config["prune2"]["adjust_target"] == "dense_stream"
    with atomic_dir(out) as tmp:
        checkpoint = _CheckpointWriter(tmp, lm, range(len(lm)), masks=True)
        infos = _sequential_pass(config, lm, seqlen, dense_dir, update, tmp / "work", checkpoint, source=first,
                                 cross=cross, what="prune1+adjust layer")
        checkpoint.close()
    _track(config, f"prune1_adjust/{Path(prune1_dir).parent.parent.name}/{Path(prune1_dir).parent.name}",
           params=config["prune2"], metrics=_layer_metrics(infos) + [("seconds", time.monotonic() - start, 0)])


# --- 5. dense reconstruction ------------------------------------------------------------------------------

def reconstruct_layer(lm: LayerwiseModel, i: int, settings: dict, *, dense_dir, prune1_dir, first_weights,
                      first_masks, kwargs) -> dict:
    """Re-fits every linear of decoder layer i with the pruned weights re-activated (FISTA on the
    quadratic objective + L1/L2). Layers are independent of each other: the default (first-pruned
    inputs, dense-weights target) needs only the statistics prune1 saved for this layer, i.e. the inputs
    the layer's linears see when the dense layer runs on the first-pruned model's stream; the other
    settings re-run the dense layer on a cached stream (prune1's stream/ or the dense cache). Returns the
    per-linear infos (by short name); layer i then holds the re-fitted weights."""
    layer = lm.layer(i)
    names = lm.linear_names(i)
    dense_weights = {n: m.weight.detach().clone() for n, m in find_linears(layer).items()}
    cross = settings["target"] == "dense_stream"
    if settings["inputs"] == "pruned" and not cross:
        acc = StatsAccumulator.from_tensors(*load_tensors_with_metadata(
            Path(prune1_dir) / "stats" / f"layer_{i:03d}.safetensors"))
    else:
        if settings["inputs"] == "pruned":
            if not (Path(prune1_dir) / "stream").is_dir():
                raise CorruptFileError(f"{prune1_dir}/stream: the 'dense_stream' target needs prune1's stream "
                                       f"cache, which this prune1 output lacks; {HOW_TO_RECREATE}",
                                       Path(prune1_dir) / "stream")
            stream = _iter_stream(Path(prune1_dir) / "stream", i, lm.dtype, lm.device)
        else:
            stream = _iter_stream(dense_dir, i, lm.dtype, lm.device)
        # the layer still holds its dense weights here, so it is its own target
        acc = collect_stats(layer, stream, kwargs, target_layer=clone_layer(layer) if cross else None,
                            target_stream=_iter_stream(dense_dir, i, lm.dtype, lm.device) if cross else None,
                            layer_name=f"layer {i}")

    def update(n, _W, stats):
        full = names[n]
        W1, mask1 = first_weights[full].to(lm.device).float(), first_masks[full].to(lm.device).bool()
        omega = torch.where(mask1, torch.ones_like(W1), torch.full_like(W1, settings["l1_pruned_weight"]))
        W = fista(W1, dense_weights[n], stats, steps=settings["steps"], l1=settings["l1"], l2=settings["l2"],
                  l1_weights=omega)
        return W, None, {"rel_error_before": relative_error(W1, dense_weights[n], stats),
                         "rel_error": relative_error(W, dense_weights[n], stats),
                         "near_zero": float((W.abs() < 1e-8).float().mean())}

    return update_layer(layer, acc, update)


def _reconstruct_layers(config, model_dir, dense_dir, prune1_dir, recon, layers: list[int] | None, out: Path,
                        extra: dict) -> dict:
    """Reconstructs the given decoder layers (all when None) into a checkpoint in `out`; returns its summary."""
    device = setup(config)
    settings = config["reconstruct"][recon]
    lm = _layerwise_model(config, model_dir, device)
    manifest = read_json(Path(dense_dir) / "manifest.json")
    kwargs = lm.kwargs(manifest["seqlen"])
    first = TensorReader(Path(prune1_dir) / "weights.safetensors")
    masks = TensorReader(Path(prune1_dir) / "masks.safetensors")
    todo = list(range(len(lm))) if layers is None else layers
    for i in todo:
        if not 0 <= i < len(lm):
            raise ValueError(f"layer {i} does not exist: the model has {len(lm)} decoder layers")
    progress = Progress(f"reconstruct {recon} layer", len(todo))
    checkpoint = _CheckpointWriter(out, lm, todo, masks=False)
    for done, i in enumerate(todo, 1):
        infos = reconstruct_layer(lm, i, settings, dense_dir=dense_dir, prune1_dir=prune1_dir, first_weights=first,
                                  first_masks=masks, kwargs=kwargs)
        checkpoint.add(i, infos)
        lm.release(i)
        release_memory()
        progress(done, extra=f"decoder layer {i}")
    return checkpoint.close(extra)


def reconstruct(config: dict, model_dir: str, dense_dir: str, prune1_dir: str, recon: str, out: str) -> None:
    """Dense reconstruction of every decoder layer in one job."""
    start = time.monotonic()
    with atomic_dir(out) as tmp:
        summary = _reconstruct_layers(config, model_dir, dense_dir, prune1_dir, recon, None, tmp,
                                      {"settings": config["reconstruct"][recon]})
    _track(config, f"reconstruct/{recon}", params=config["reconstruct"][recon],
           metrics=_layer_metrics(summary["linears"]) + [("seconds", time.monotonic() - start, 0)])


def reconstruct_one_layer(config: dict, model_dir: str, dense_dir: str, prune1_dir: str, recon: str, layer: str,
                          out: str) -> None:
    """Layer-parallel mode: reconstructs decoder layer `layer` only (its own job); `out` is a folder with
    that layer's weights.safetensors and layers.json, merged by `reconstruct_gather`."""
    i = int(layer)
    start = time.monotonic()
    with atomic_dir(out) as tmp:
        summary = _reconstruct_layers(config, model_dir, dense_dir, prune1_dir, recon, [i], tmp, {"layer": i})
        summary["seconds"] = time.monotonic() - start
        write_json(tmp / "layers.json", summary)


def reconstruct_gather(config: dict, recon: str, out: str, parts: list[str]) -> None:
    """Merges per-layer reconstruction outputs into the same checkpoint layout `reconstruct` writes,
    one tensor in memory at a time."""
    readers = [TensorReader(Path(part) / "weights.safetensors") for part in parts]
    infos = {}
    for part in parts:
        infos.update(read_json(Path(part) / "layers.json")["linears"])
    specs = {name: reader.spec(name) for reader in readers for name in reader.keys()}
    with atomic_dir(out) as tmp:
        with SafetensorsStreamWriter(tmp / "weights.safetensors", specs) as writer:
            for reader in readers:
                for name in reader.keys():
                    writer.write(name, reader[name])
        write_json(tmp / "layers.json", {"linears": infos, "settings": config["reconstruct"][recon],
                                         "layer_parallel": True, "parts": len(parts)})
    _track(config, f"reconstruct/{recon}", params={**config["reconstruct"][recon], "layer_parallel": True},
           metrics=_layer_metrics(infos))


# --- 6. second prune ---------------------------------------------------------------------------------------

def prune2(config: dict, model_dir: str, calibration_file: str, dense_dir: str, prune1_dir: str,
           reconstruct_dir: str, method: str, pattern: str, out: str) -> None:
    """Second prune of the reconstructed model with the same pruner and pattern (sequential), then the
    weight adjustment to the dense target; writes a loadable Hugging Face folder with masks and a card."""
    device = setup(config)
    pat = pattern_from_slug(pattern)
    p, p2 = config["prune"], config["prune2"]
    lm = _layerwise_model(config, model_dir, device)
    seqlen = read_calibration(calibration_file).shape[1]
    recon = TensorReader(Path(reconstruct_dir) / "weights.safetensors")
    first = TensorReader(Path(prune1_dir) / "weights.safetensors")
    first_masks = TensorReader(Path(prune1_dir) / "masks.safetensors")
    run_adjust = _adjust_fn(config)

    def update(i, name, W, W_dense, stats):
        pruned, mask = prune(method, W, pat, hessian=stats.H, blocksize=p["blocksize"], percdamp=p["percdamp"])
        new_W = run_adjust(W_dense, stats, mask, pruned)
        info = {"rel_error_pruned": relative_error(pruned, W_dense, stats),
                "rel_error": relative_error(new_W, W_dense, stats), "fallback": False}
        if p2["fallback"]:
            first_err = relative_error(first[name].to(W_dense.device), W_dense, stats)
            info["rel_error_prune1"] = first_err
            if first_err < info["rel_error"]:
                new_W, mask = first[name].to(W_dense.device).float(), first_masks[name].to(W_dense.device).bool()
                info.update(rel_error=first_err, fallback=True)
        return new_W, mask, info

    cross = p2["adjust_target"] == "dense_stream"
    start = time.monotonic()
    with atomic_dir(out) as tmp:
        checkpoint = _CheckpointWriter(tmp, lm, range(len(lm)), masks=True)
        infos = _sequential_pass(config, lm, seqlen, dense_dir, update, tmp / "work", checkpoint, source=recon,
                                 cross=cross, what=f"prune2 {method} {pat} layer")
        fallbacks = sum(1 for v in infos.values() if v.get("fallback"))
        summary = checkpoint.close({"method": method, "pattern": str(pat), "fallbacks": fallbacks})
        # the loadable folder: the base checkpoint with every decoder linear replaced, one tensor at a time
        lm.save_pretrained(tmp / "model", TensorReader(tmp / "weights.safetensors"))
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(model_dir, trust_remote_code=config["model"]["trust_remote_code"]
                                      ).save_pretrained(tmp / "model")
        checksum_folder(tmp / "model")
        write_text(tmp / "model" / "README.md", model_card(config, method, pat, checkpoint.sparsity(), summary))
    log.info("prune2 %s %s done in %.1fs; %d/%d linears kept their first-prune weights", method, pat,
             time.monotonic() - start, fallbacks, len(infos))
    _track(config, f"prune2/{method}/{pattern}", params={"method": method, "pattern": str(pat), **p2},
           metrics=_layer_metrics(infos) + [("seconds", time.monotonic() - start, 0), ("fallbacks", fallbacks, 0)])


def model_card(config, method, pat, sp: dict, summary) -> str:
    """The model folder's README; `sp`: exact-zero fractions, overall and per decoder layer."""
    rows = "\n".join(f"| {i} | {s:.4f} |" for i, s in sp["per_layer"].items())
    errors = [v["rel_error"] for v in summary["linears"].values()]
    mean_error = sum(errors) / max(len(errors), 1)
    return f"""---
library_name: transformers
tags: [sparse, pruning, sds]
---
# SDS-pruned model

- Base model: `{config['model']['source']}`
- Method: SDS (Sparse-Dense-Sparse) with `{method}` as the pruner, pattern `{pat}`
- Achieved sparsity of decoder linear weights: {sp['overall']:.4f} (exact zeros; masks in `../masks.safetensors`)
- Linears that kept their first-prune weights (early exit): {summary.get('fallbacks', 0)}
- Config hash: `{config_hash(config)}`; sds {__version__}
- Calibration metric: mean relative output error of the pruned linears vs the dense layers
  {mean_error:.5f} ({len(errors)} linears, {config['calibration']['nsamples']} × {config['calibration']['seqlen']} tokens)
- Evaluation metrics (perplexity, zero-shot) of dense, one-shot and SDS models:
  `results/{config['run']}/report/report.md` and `eval/` beside it

Weights are dense safetensors with exact zeros; load with `AutoModelForCausalLM.from_pretrained`.

| decoder layer | sparsity |
|---|---|
{rows}
"""


# --- 7. evaluation and report ------------------------------------------------------------------------------

def zeroshot_tasks(config: dict, out: str) -> None:
    """Writes the embedded default's own multiple-choice tasks, generated from the corpus grammar, as
    <task>/test.jsonl: the local data files that the built-in task YAMLs (sds/tasks/) read."""
    import json

    from .corpus import CHOICE_TASKS, choice_items

    n = config["evaluate"]["zeroshot"]["builtin_items"]
    with atomic_dir(out) as tmp:
        for task in CHOICE_TASKS:
            (tmp / task).mkdir()
            items = choice_items(task, n, config["seed"])
            write_text(tmp / task / "test.jsonl", "".join(json.dumps(r) + "\n" for r in items))
    log.info("zero-shot tasks: %d items each of %s", n, ", ".join(CHOICE_TASKS))  # no MLflow record: n is in each evaluation


def evaluate(config: dict, model_dir: str, corpus_dir: str | None, out: str, weights: str | None = None,
             stage: str = "dense", method: str = "", pattern: str = "", recon: str = "",
             tasks_dir: str | None = None) -> None:
    """Perplexity on every configured dataset, zero-shot accuracy (lm-eval-harness) and the achieved
    sparsity of one checkpoint. `tasks_dir`: the built-in tasks' data (the zeroshot_tasks step's output)."""
    from .data import perplexity_windows, read_text_source, tokenize
    from .evaluate import measured_sparsity, pattern_violations, perplexity

    zs = config["evaluate"]["zeroshot"]
    zs_files = None
    if zs["enabled"]:  # every task's data file is checked before the evaluation starts
        from .zeroshot import resolve_tasks, task_files

        zs_files = task_files(resolve_tasks(zs["tasks"]), zs["data_dir"], tasks_dir)
    device = setup(config)
    model, tokenizer = _model(config, model_dir, device)
    if weights:
        apply_weights(model, load_tensors(weights))
    ev = config["evaluate"]
    label = "/".join(x for x in (method, pattern, recon, stage) if x)
    result = {"stage": stage, "method": method, "pattern": str(pattern_from_slug(pattern)) if pattern else "",
              "recon": recon, "ppl": {}, "windows": {}}
    start = time.monotonic()
    for name, source in ev["datasets"].items():
        text = read_text_source(source, builtin_text=Path(corpus_dir) / "test.txt" if corpus_dir else None,
                                split="test")
        windows = perplexity_windows(tokenize(tokenizer, text), ev["seqlen"], ev["max_windows"])
        progress = Progress(f"evaluate {label} on {name}: window", windows.shape[0])
        result["ppl"][name] = perplexity(model, windows, progress=lambda d, n: progress(d, n) if d == n else None)
        result["windows"][name] = windows.shape[0]
        log.info("%s: perplexity on %s = %.4f (%d windows of %d)", label, name, result["ppl"][name],
                 windows.shape[0], ev["seqlen"])
    zs_metrics = {}
    if zs_files:
        from .zeroshot import evaluate_zeroshot, flat_metrics

        zs_start = time.monotonic()
        result["zeroshot"] = evaluate_zeroshot(model, tokenizer, zs_files, batch_size=zs["batch_size"],
                                               limit=zs["limit"], bootstrap_iters=zs["bootstrap_iters"],
                                               seed=config["seed"])
        result["zeroshot"]["seconds"] = time.monotonic() - zs_start
        zs_metrics = flat_metrics(result["zeroshot"])
        log.info("%s: zero-shot mean acc = %.4f over %s (%.1fs)", label,
                 result["zeroshot"]["mean"].get("acc", float("nan")), ", ".join(zs_files),
                 result["zeroshot"]["seconds"])
    sp = measured_sparsity(model)
    result["sparsity"], result["sparsity_per_layer"] = sp["overall"], sp["per_layer"]
    if pattern:
        result["pattern_violations"] = pattern_violations(model, pattern_from_slug(pattern))
    result["seconds"] = time.monotonic() - start
    result["config_hash"], result["provenance"] = config_hash(config), provenance()
    write_json(out, result)
    _track(config, f"evaluate/{label}", params={"label": label},
           metrics={**{f"ppl.{k}": v for k, v in result["ppl"].items()}, "sparsity": sp["overall"],
                    "seconds": result["seconds"], **zs_metrics})


def report(config: dict, evals: list[str], out: str, summary_csv: str, model_dir: str,
           benchmarks: list[str] = (), checkpoints: list[str] = ()) -> None:
    from .report import build_report

    setup(config)
    artifacts = build_report(config, evals, list(benchmarks), Path(out), Path(summary_csv), model_dir, list(checkpoints))
    _track(config, "report", parent_artifacts=artifacts, artifacts=artifacts)
