"""The layer-by-layer drivers the stages share: the dense activation and statistics passes, the sequential
protocol of SparseGPT/Wanda (prune1, the adjust ablation, prune2) and the per-layer dense reconstruction.

They join the model plumbing (`loading`, `decoder`, `statistics`), the hidden-state streams (`streams`) and the
checkpoint writer (`checkpoints`); what happens to each weight matrix is the caller's `update`. One
decoder layer is in memory at a time, every tensor lives on the model's device.
"""
from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import torch

from ..core.errors import HOW_TO_RECREATE, CorruptFileError
from ..core.layout import STREAM, WORK, layer_file, stats_file
from ..core.runtime import Progress, release_memory
from ..storage.parquet import ParquetTensorWriter
from ..storage.safetensors import load_tensors_with_metadata, save_tensors
from .checkpoints import CheckpointWriter, dense_maxima
from .decoder import capture_layer_inputs, clone_layer, find_linears
from .loading import LayerwiseModel
from .statistics import StatsAccumulator, collect_stats, propagate, update_layer
from .streams import WorkStream, append_batch, cache_writer, forward_batch_size, read_batches, tee

# update(layer index, full weight name, current weight, dense weight, statistics) -> (new weight, mask, info)
Update = Callable[[int, str, torch.Tensor, torch.Tensor, object], tuple]


def batch_size(config: dict, lm: LayerwiseModel, nsamples: int, seqlen: int) -> int:
    """Calibration sequences per layer forward (config `forward_batch`; see streams.forward_batch_size)."""
    return forward_batch_size(config["forward_batch"], nsamples=nsamples, seqlen=seqlen, device=lm.device,
                              **lm.dims())


def _embedded_batches(lm: LayerwiseModel, windows: torch.Tensor, batch: int):
    """Decoder layer 0's input for the calibration windows, a batch at a time (the model up to layer 0)."""
    for start in range(0, windows.shape[0], batch):
        yield capture_layer_inputs(lm.model, windows[start:start + batch])[0]


def write_layer_inputs(config: dict, lm: LayerwiseModel, windows: torch.Tensor, out: Path) -> None:
    """out/layer_000.parquet: decoder layer 0's input in the model's dtype (nothing rounded), where the
    sequential passes start."""
    batch = batch_size(config, lm, *windows.shape)
    with ParquetTensorWriter(layer_file(out, 0), dtype=lm.dtype,
                             row_group_size=config["activations"]["row_group_size"]) as writer:
        for hidden in _embedded_batches(lm, windows, batch):
            append_batch(writer, hidden)


def dense_pass(config: dict, lm: LayerwiseModel, windows: torch.Tensor, out: Path) -> None:
    """Runs the dense model layer by layer over the calibration windows and writes each decoder layer's
    input to out/layer_<i>.parquet (and the last layer's output as layer_<n>)."""
    nsamples, seqlen = windows.shape
    batch = batch_size(config, lm, nsamples, seqlen)
    kwargs = lm.kwargs(seqlen)
    progress = Progress("activations layer", len(lm), lm.device)
    first = out / WORK / "stream_000.parquet"
    first.parent.mkdir()
    with cache_writer(config["activations"], layer_file(out, 0)) as cache, \
            ParquetTensorWriter(first, dtype=lm.dtype, row_group_size=config["activations"]["row_group_size"]) as work:
        for hidden in _embedded_batches(lm, windows, batch):
            append_batch(cache, hidden)
            append_batch(work, hidden)
    stream = WorkStream(out / WORK, first, dtype=lm.dtype, device=lm.device, batch_size=batch,
                        row_group_size=config["activations"]["row_group_size"])
    for i in range(len(lm)):
        with cache_writer(config["activations"], layer_file(out, i + 1)) as cache:
            stream.advance(propagate(lm.layer(i), stream, kwargs, layer_name=f"dense layer {i}"), i + 1, also=cache)
        lm.release(i)
        release_memory(lm.device)
        progress(i + 1)
    stream.close()


def dense_statistics_pass(config: dict, lm: LayerwiseModel, nsamples: int, seqlen: int, inputs_dir,
                          measure: Callable[[int, torch.nn.Module, StatsAccumulator], object], work_dir: Path,
                          what: str = "dense statistics layer") -> list:
    """The dense model run layer by layer from decoder layer 0's cached input: `measure(i, layer, stats)`
    for each decoder layer on its linears' statistics of the dense inputs (nothing is changed; e.g. OWL's
    outlier fractions), then the dense layer propagates. Returns measure's results in layer order."""
    batch = batch_size(config, lm, nsamples, seqlen)
    kwargs = lm.kwargs(seqlen)
    stream = WorkStream(work_dir, layer_file(inputs_dir, 0), dtype=lm.dtype, device=lm.device, batch_size=batch,
                        row_group_size=config["activations"]["row_group_size"])
    progress = Progress(what, len(lm), lm.device)
    results = []
    for i in range(len(lm)):
        layer = lm.layer(i)
        acc = collect_stats(layer, stream, kwargs, layer_name=f"dense layer {i}")
        results.append(measure(i, layer, acc))
        acc = None
        stream.advance(propagate(layer, stream, kwargs, layer_name=f"dense layer {i}"), i + 1)
        lm.release(i)
        release_memory(lm.device)
        progress(i + 1)
    stream.close()
    return results


class OneSaveInFlight:
    """Writes files on a background thread, one at a time: `submit` first waits for the previous write (a
    failed write is raised there, a layer later at most); leaving the block waits for the last one."""

    def __init__(self):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sds-save")
        self._pending = None

    def submit(self, fn: Callable, *args) -> None:
        self.wait()
        self._pending = self._pool.submit(fn, *args)

    def wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def __enter__(self) -> "OneSaveInFlight":
        return self

    def __exit__(self, exc_type, *_) -> None:
        try:
            if exc_type is None:
                self.wait()
        finally:
            self._pool.shutdown(wait=True)


def sequential_pass(config: dict, lm: LayerwiseModel, nsamples: int, seqlen: int, inputs_dir, update: Update,
                    work_dir: Path, checkpoint: CheckpointWriter, *, source=None, dense_dir=None,
                    stream_out: Path | None = None, stats_out: Path | None = None, what: str = "layer") -> dict:
    """The SparseGPT/Wanda sequential protocol: for each decoder layer, collect its linears' input
    statistics on the current (already-modified) stream, update its weights, then propagate.

    With `source` (full weight name → tensor, e.g. a TensorReader), each layer starts from those weights
    instead of the dense ones (the dense weights stay the target). With `dense_dir` (the dense activation
    cache), statistics pair the stream with the dense model's own hidden states (the 'dense_stream' target).
    `stream_out` gets each layer's input as a cache; `stats_out` each layer's input statistics (what
    reconstruction fits on), saved while the layer is updated and propagated. Returns the per-linear infos."""
    batch = batch_size(config, lm, nsamples, seqlen)
    kwargs = lm.kwargs(seqlen)
    rows = config["activations"]["row_group_size"]
    stream = WorkStream(work_dir, layer_file(inputs_dir, 0), dtype=lm.dtype, device=lm.device, batch_size=batch,
                        row_group_size=rows)
    progress = Progress(what, len(lm), lm.device)
    with OneSaveInFlight() as stats_saves:
        for i in range(len(lm)):
            layer = lm.layer(i)
            names = lm.linear_names(i)
            linears = find_linears(layer)
            dense_weights = {n: m.weight.detach().clone() for n, m in linears.items()}
            dense_layer = clone_layer(layer) if dense_dir is not None else None
            if source is not None:
                with torch.no_grad():
                    for n, full in names.items():
                        linears[n].weight.copy_(source[full].to(lm.device, linears[n].weight.dtype))
            targets = read_batches(layer_file(dense_dir, i), dtype=lm.dtype, device=lm.device,
                                   batch_size=batch) if dense_dir is not None else None
            with cache_writer(config["activations"], layer_file(stream_out, i)) if stream_out else \
                    contextlib.nullcontext() as cache:
                acc = collect_stats(layer, tee(stream, cache), kwargs, target_layer=dense_layer, target_stream=targets,
                                    layer_name=f"layer {i}")
            if stats_out is not None:
                stats_saves.wait()  # the previous layer's tensors are written out before this layer's are made
                stats_saves.submit(save_tensors, layer_file(stats_out, i, ".safetensors"), *acc.to_tensors())
            infos = update_layer(layer, acc, lambda n, W, stats: update(i, names[n], W, dense_weights[n], stats))
            dense_max = dense_maxima(dense_weights)
            acc = dense_layer = dense_weights = None  # freed before the propagation pass
            stream.advance(propagate(layer, stream, kwargs, layer_name=f"layer {i}"), i + 1)
            checkpoint.add(i, infos, dense_max)
            lm.release(i)
            release_memory(lm.device)
            errors = [v["rel_error"] for v in infos.values() if "rel_error" in v]
            progress(i + 1, extra=f"mean rel. error {sum(errors) / max(len(errors), 1):.4f}")
    stream.close()
    return checkpoint.infos


def layer_statistics(lm: LayerwiseModel, i: int, settings: dict, *, dense_dir, prune1_dir, kwargs,
                     batch: int) -> StatsAccumulator:
    """The statistics dense reconstruction fits layer i on. The default (first-pruned inputs, dense-weights
    target) reads the ones prune1 saved for this layer (the inputs its linears see when the dense layer
    runs on the first-pruned model's stream), straight onto the device; the other settings re-run the
    dense layer (which layer i still holds) on a cached stream: prune1's stream/ or the dense cache."""
    cross = settings["target"] == "dense_stream"
    if settings["inputs"] == "pruned" and not cross:
        path = stats_file(prune1_dir, i)
        tensors, meta = load_tensors_with_metadata(path, device=lm.device)
        return StatsAccumulator.from_tensors(tensors, meta, source=path)
    if dense_dir is None:  # every other setting reads the dense model's own hidden states
        raise ValueError(f"reconstruction with inputs {settings['inputs']!r} and target {settings['target']!r} needs "
                         "the dense activation cache (dense_dir)")
    if settings["inputs"] == "pruned":
        if not (Path(prune1_dir) / STREAM).is_dir():
            raise CorruptFileError(f"{prune1_dir}/stream: the 'dense_stream' target needs prune1's stream "
                                   f"cache, which this prune1 output lacks; {HOW_TO_RECREATE}",
                                   Path(prune1_dir) / STREAM)
        inputs = layer_file(Path(prune1_dir) / STREAM, i)
    else:
        layer = lm.layers[i]

    def batches(path):
        return read_batches(path, dtype=lm.dtype, device=lm.device, batch_size=batch)

    return collect_stats(layer, batches(inputs), kwargs, target_layer=clone_layer(layer) if cross else None,
                         target_stream=batches(layer_file(dense_dir, i)) if cross else None, layer_name=f"layer {i}")


def refit_layers(lm: LayerwiseModel, layers: list[int], settings: dict, update: Update, checkpoint: CheckpointWriter,
                 *, dense_dir, prune1_dir, nsamples: int, seqlen: int, config: dict, what: str) -> dict:
    """Dense reconstruction of the given decoder layers, each on its own (they are independent: every
    layer's statistics come from caches); `update` refits one linear. Returns the per-linear infos."""
    for i in layers:
        if not 0 <= i < len(lm):
            raise ValueError(f"layer {i} does not exist: the model has {len(lm)} decoder layers")
    kwargs = lm.kwargs(seqlen)
    batch = batch_size(config, lm, nsamples, seqlen)
    progress = Progress(what, len(layers), lm.device)
    for done, i in enumerate(layers, 1):
        layer = lm.layer(i)
        names = lm.linear_names(i)
        dense_weights = {n: m.weight.detach().clone() for n, m in find_linears(layer).items()}
        acc = layer_statistics(lm, i, settings, dense_dir=dense_dir, prune1_dir=prune1_dir, kwargs=kwargs, batch=batch)
        infos = update_layer(layer, acc, lambda n, W, stats: update(i, names[n], W, dense_weights[n], stats))
        checkpoint.add(i, infos, dense_maxima(dense_weights))
        lm.release(i)
        release_memory(lm.device)
        progress(done, extra=f"decoder layer {i}")
    return checkpoint.infos
