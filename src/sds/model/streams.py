"""Hidden-state streams of layer-by-layer passes: read from Parquet caches in batches of calibration
sequences, straight onto the stage's device, and written back one sequence per row.

Memory never grows with nsamples × seqlen or with depth: a pass holds one batch (plus the one being read
ahead) of the stream it reads. Reading runs on a background thread, so file reads, checksum hashing and
host-to-device copies (from pinned memory, asynchronous) overlap the layer's compute.
"""
from __future__ import annotations

import contextlib
import queue
import threading
from pathlib import Path
from typing import Iterable, Iterator

import torch

from ..storage.digests import CHECKSUM_SUFFIX
from ..storage.parquet import ParquetTensorWriter, iter_parquet_tensors

# Bytes of activations per token of one sequence in a layer forward, in units of 4-byte floats per
# hidden/ffn unit: hidden states in and out, q/k/v and attention output, the MLP's intermediate (two for
# SwiGLU) and the linears' recorded inputs, with room for temporaries.
_FLOATS_PER_TOKEN = lambda hidden, ffn: 12 * hidden + 4 * ffn  # noqa: E731


def forward_batch_size(setting, *, nsamples: int, seqlen: int, hidden: int, ffn: int, heads: int,
                       device: torch.device) -> int:
    """Calibration sequences per layer forward. An integer setting is used as it is; 'auto' sizes batches
    from the device's *total* memory (a quarter of a GPU's, at most 8 GiB; a tenth of the host's, at most
    4 GiB, on the CPU), not its free memory: the batch size changes the order of floating-point sums, and
    the same config must give the same numbers on the same hardware whatever else is running."""
    if setting != "auto":
        return max(1, min(int(setting), nsamples))
    if device.type == "cuda":
        budget = min(torch.cuda.get_device_properties(device).total_memory // 4, 8 << 30)
    else:
        budget = min(host_memory_bytes() // 10, 4 << 30)
    per_sequence = seqlen * _FLOATS_PER_TOKEN(hidden, ffn) * 4 + heads * seqlen * seqlen * 4
    return max(1, min(nsamples, budget // max(per_sequence, 1)))


def host_memory_bytes() -> int:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


_DONE = object()


def _prefetched(items: Iterable, depth: int = 2) -> Iterator:
    """Yields `items`, produced on a background thread up to `depth` ahead. An exception there is raised
    here, where the item would have been; leaving the loop early stops the thread."""
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce():
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        slots.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            slots.put((_DONE, None))
        except BaseException as exc:  # handed to the consumer, raised there
            slots.put((_DONE, exc))

    worker = threading.Thread(target=produce, daemon=True)
    worker.start()
    try:
        while True:
            item, error = slots.get()
            if item is _DONE:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()
        while worker.is_alive():  # unblock a producer waiting on a full queue
            try:
                slots.get_nowait()
            except queue.Empty:
                worker.join(timeout=0.1)


def _host_batches(path: Path, batch_size: int, pin: bool) -> Iterator[torch.Tensor]:
    rows: list[torch.Tensor] = []
    for row in iter_parquet_tensors(path):
        rows.append(row)
        if len(rows) == batch_size:
            yield _stack(rows, pin)
            rows = []
    if rows:
        yield _stack(rows, pin)


def _stack(rows: list[torch.Tensor], pin: bool) -> torch.Tensor:
    out = torch.empty((len(rows), *rows[0].shape), dtype=rows[0].dtype, pin_memory=pin)
    return torch.stack(rows, out=out)


def read_batches(path: str | Path, *, dtype: torch.dtype, device: torch.device, batch_size: int
                 ) -> Iterator[torch.Tensor]:
    """The sequences of a stream file as (batch, seqlen, hidden) tensors of `dtype` on `device`, in file
    order. On a GPU each batch is read into pinned memory and copied asynchronously, ahead of use."""
    device = torch.device(device)
    pin = device.type == "cuda"
    for host in _prefetched(_host_batches(Path(path), batch_size, pin)):
        yield host.to(device, non_blocking=pin).to(dtype)


def append_batch(writer: ParquetTensorWriter | None, batch: torch.Tensor) -> None:
    """Writes each sequence of a (batch, seqlen, hidden) tensor as one row (one device-to-host copy)."""
    if writer is None:
        return
    host = batch.detach().to("cpu", writer.dtype)
    for row in host:
        writer.append(row)


def cache_writer(settings: dict, path: Path) -> ParquetTensorWriter:
    """A writer of an activation cache with the configured `activations` settings."""
    return ParquetTensorWriter(path, dtype=getattr(torch, settings["dtype"]), row_group_size=settings["row_group_size"],
                               compression=settings["compression"])


def tee(batches: Iterable[torch.Tensor], writer: ParquetTensorWriter | None) -> Iterator[torch.Tensor]:
    """Yields `batches` unchanged while writing each to `writer` (None: no copy)."""
    for batch in batches:
        append_batch(writer, batch)
        yield batch


def held_stream_bytes(device: torch.device) -> int:
    """The largest hidden-state stream a pass keeps in memory rather than on disk: 1/16 of the device's
    total memory, at most 2 GiB (two are held while one layer's output replaces its input). OPT-125M at
    128 × 2048 tokens in float32 is 768 MiB: held on a 24 GiB host, which saves each sequential pass
    ~3.5 s per layer of Parquet writing and reading on this project's 2-core machine."""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
    else:
        total = host_memory_bytes()
    return min(total // 16, 2 << 30)


class WorkStream:
    """The hidden states a layer-by-layer pass carries from one decoder layer to the next, read a batch at
    a time. Up to `memory_bytes` of them (default `held_stream_bytes`) stay in memory as the batches the
    layer produced: no disk round trip per layer; a larger stream goes to disk (Parquet in the model's
    dtype, so nothing is rounded either way), so memory stays bounded whatever nsamples × seqlen.
    Files live in `folder` (inside the stage's temporary output folder); each is deleted as soon as the
    next layer's stream is complete. `first` (e.g. the dense cache of layer 0) is read but never deleted."""

    def __init__(self, folder: Path, first: Path, *, dtype, device, batch_size: int, row_group_size: int,
                 memory_bytes: int | None = None):
        self.folder, self.current = Path(folder), Path(first)
        self.dtype, self.device, self.batch_size, self.row_group_size = dtype, device, batch_size, row_group_size
        self.memory_bytes = held_stream_bytes(torch.device(device)) if memory_bytes is None else memory_bytes
        self.held: list[torch.Tensor] | None = None  # the current stream when it is in memory
        self.folder.mkdir(parents=True, exist_ok=True)

    def __iter__(self) -> Iterator[torch.Tensor]:
        if self.held is not None:
            return iter(self.held)
        return read_batches(self.current, dtype=self.dtype, device=self.device, batch_size=self.batch_size)

    def advance(self, outputs: Iterable[torch.Tensor], layer: int, also: ParquetTensorWriter | None = None) -> None:
        """Takes `outputs` (batches: the next layer's inputs) as the new current stream, in memory while it
        fits `memory_bytes`, else written to a file; `also` gets them too."""
        path = self.folder / f"stream_{layer:03d}.parquet"
        held: list[torch.Tensor] | None = []
        size = 0
        with contextlib.ExitStack() as stack:
            writer = None
            for batch in outputs:
                append_batch(also, batch)
                if writer is None:
                    size += batch.numel() * batch.element_size()
                    if size <= self.memory_bytes:
                        held.append(batch.detach().to(self.dtype))
                        continue
                    writer = stack.enter_context(
                        ParquetTensorWriter(path, dtype=self.dtype, row_group_size=self.row_group_size))
                    for kept in held:  # spilled: what was held goes first, in order
                        append_batch(writer, kept)
                    held = None
                append_batch(writer, batch)
        self._drop_current()
        self.held = held
        self.current = path

    def _drop_current(self) -> None:
        self.held = None
        if self.current.parent == self.folder and self.current.exists():
            self.current.unlink()
            self.current.with_name(self.current.name + CHECKSUM_SUFFIX).unlink(missing_ok=True)

    def close(self) -> None:
        self._drop_current()
        if not any(self.folder.iterdir()):
            self.folder.rmdir()
