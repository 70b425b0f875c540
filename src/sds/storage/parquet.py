"""Parquet activation caches: hidden states, one calibration sequence per row."""
from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..core.errors import HOW_TO_RECREATE, CorruptFileError
from .atomic import StreamedOutput, TempFile
from .checksums import BackgroundChecksum, require_checksum

# One row per calibration sequence; column "hidden" holds the (seqlen × hidden) tensor as the raw bytes of
# the cache dtype in a fixed_size_binary column (Parquet FIXED_LEN_BYTE_ARRAY, PLAIN): a row group's values
# are one contiguous Arrow buffer after decoding, viewed as a (rows × seqlen × hidden) tensor without a
# copy; a list<float16> column would convert per element. Uncompressed, 8 sequences per row group, fp16 by
# default: chosen by bench/cache_bench.py (docs/performance.md has the figures and the reasons). Caches
# written before (a large_binary column) are read the same way.


_NUMPY_VIEW = {torch.float16: np.float16, torch.float32: np.float32, torch.bfloat16: np.uint16}


class ParquetTensorWriter(StreamedOutput):
    """Streams same-shaped tensors into a Parquet file, one row each, written atomically (with its checksum
    sidecar) on close. Each appended tensor is copied once, into the pending row group's buffer."""

    def __init__(self, path: str | Path, *, dtype: torch.dtype, row_group_size: int, compression: str = "none"):
        self.path = Path(path)
        self.dtype = dtype
        self.row_group_size = row_group_size
        self.compression = compression
        self._temp = TempFile(self.path)
        self._writer = None
        self._block: torch.Tensor | None = None  # the pending row group, (row_group_size, *shape)
        self._pending = 0
        self.rows = 0

    def append(self, tensor: torch.Tensor) -> None:
        tensor = tensor.detach()
        if self._block is None:
            self._block = torch.empty((self.row_group_size, *tensor.shape), dtype=self.dtype)
        elif tuple(tensor.shape) != tuple(self._block.shape[1:]):
            raise ValueError(f"{self.path}: tensor shape {tuple(tensor.shape)} differs from "
                             f"{tuple(self._block.shape[1:])}")
        self._block[self._pending].copy_(tensor)  # converts to the cache dtype (and from any device)
        self._pending += 1
        self.rows += 1
        if self._pending == self.row_group_size:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self._pending:
            return
        shape = tuple(self._block.shape[1:])
        rows = self._block[:self._pending].view(torch.uint8).numpy()
        width = rows.size // self._pending
        values = pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), self._pending, [None, pa.py_buffer(rows)])
        table = pa.table({"hidden": values}).replace_schema_metadata(
            {b"sds.shape": json.dumps(shape).encode(), b"sds.dtype": str(self.dtype).encode()})
        with self._temp.naming():
            if self._writer is None:
                # PLAIN, no statistics: dictionary encoding or min/max of unique float blobs only cost time
                self._writer = pq.ParquetWriter(str(self._temp.tmp), table.schema, compression=self.compression,
                                                use_dictionary=False, write_statistics=False)
            self._writer.write_table(table, row_group_size=self._pending)
        self._pending = 0

    def close(self) -> None:
        try:
            self._flush()
            if self._writer is None:
                raise ValueError(f"{self.path}: no rows written")
            with self._temp.naming():
                self._writer.close()
            self._temp.commit(checksum=True)
        finally:
            self._temp.discard()

    def abort(self) -> None:
        if self._writer is not None:
            with contextlib.suppress(Exception):  # the error being handled is the one to report
                self._writer.close()
        self._temp.discard()


def _cache_layout(pf) -> tuple[tuple[int, ...], torch.dtype]:
    meta = pf.schema_arrow.metadata or {}
    shape = tuple(int(d) for d in json.loads(meta[b"sds.shape"]))
    dtype = getattr(torch, meta[b"sds.dtype"].decode().removeprefix("torch."))
    if dtype not in _NUMPY_VIEW:
        raise ValueError(f"cache dtype {dtype} is not one the pipeline writes")
    return shape, dtype


def _chunk_tensors(chunk, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The values of one Arrow chunk of the "hidden" column as a (rows, *shape) tensor viewing Arrow's
    buffer (no copy; the tensor keeps the buffer alive). Every value must have the tensor's byte size, so
    the values lie back to back in the buffer, whether the column is fixed-size or (large_)binary."""
    import pyarrow as pa

    nbytes = int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()
    rows = len(chunk)
    if chunk.null_count:
        raise ValueError(f"{chunk.null_count} null values")
    if pa.types.is_fixed_size_binary(chunk.type):
        if chunk.type.byte_width != nbytes:
            raise ValueError(f"{chunk.type.byte_width}-byte values where {shape} {dtype} needs {nbytes}")
        start = chunk.offset * nbytes
        data = chunk.buffers()[1]
    elif pa.types.is_binary(chunk.type) or pa.types.is_large_binary(chunk.type):
        offset_type = np.int64 if pa.types.is_large_binary(chunk.type) else np.int32
        offsets = np.frombuffer(chunk.buffers()[1], dtype=offset_type)[chunk.offset:chunk.offset + rows + 1]
        if rows and not (np.diff(offsets) == nbytes).all():
            raise ValueError(f"values of other sizes than the {nbytes} bytes {shape} {dtype} needs")
        start = int(offsets[0]) if rows else 0
        data = chunk.buffers()[2]
    else:
        raise ValueError(f"column type {chunk.type}, expected binary values")
    values = np.frombuffer(data, dtype=np.uint8, count=rows * nbytes, offset=start) if rows else \
        np.empty(0, dtype=np.uint8)
    # Arrow buffers are read-only, which torch only warns about: callers never write to cached tensors
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        block = torch.from_numpy(values.view(_NUMPY_VIEW[dtype]))
    if dtype == torch.bfloat16:
        block = block.view(torch.bfloat16)
    return block.view(rows, *shape)


def iter_parquet_tensors(path: str | Path, *, verify: bool = True) -> Iterator[torch.Tensor]:
    """Yields the tensors of a ParquetTensorWriter file in order, one row group's worth in memory at a time,
    read through Arrow (any writer settings: compression, encodings, statistics, page sizes). The tensors
    view Arrow's buffers: treat them as read-only.

    With `verify`, the file's digest is computed in a background thread while the row groups are decoded
    and checked against its sidecar; a mismatch raises CorruptFileError at the latest after the last
    tensor, before the generator finishes, so a stage fails (and writes nothing) instead of finishing on
    corrupt data. A file that Arrow cannot parse is reported as a checksum mismatch when its digest
    differs (it was damaged), else as unreadable.
    """
    import pyarrow.parquet as pq

    path = Path(path)
    if verify:
        require_checksum(path)
    checksum = BackgroundChecksum(path) if verify else None

    def unreadable(what: str, exc: Exception) -> CorruptFileError:
        if checksum is not None:
            checksum.check()  # raises the mismatch if the file was damaged
        return CorruptFileError(f"{path}: {what} ({exc}); {HOW_TO_RECREATE}", path)

    try:
        # not memory-mapped: touched pages of a mapping count as resident memory for the whole read
        pf = pq.ParquetFile(str(path), memory_map=False)
        shape, dtype = _cache_layout(pf)
    except Exception as exc:  # Arrow's errors, a missing or malformed layout entry
        raise unreadable("not a readable activation cache", exc) from None
    for group in range(pf.num_row_groups):
        try:
            column = pf.read_row_group(group, columns=["hidden"]).column(0)
            blocks = [_chunk_tensors(chunk, shape, dtype) for chunk in column.chunks]
        except Exception as exc:
            raise unreadable(f"row group {group} unreadable", exc) from None
        del column
        for block in blocks:
            yield from block.unbind(0)
    if checksum is not None:
        checksum.check()
