"""File I/O for stage outputs: every write goes to a temporary name in the same folder and is renamed
into place, so a file is complete or absent. Each tensor file records its XXH3-128 digest in a sidecar
`<file>.xxh3`, checked on read, so a truncated or altered file is named instead of silently used. The
digest guards against truncation and corruption, not tampering; XXH3 runs at ~10 GB/s on one core where
SHA-256 manages ~1.3, so verification does not bound the activation-cache read rate (bench/cache_bench.py).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import torch


class CorruptFileError(RuntimeError):
    """A stage input that is missing, truncated or altered; the message says how to re-create it."""

    def __init__(self, message: str, path: str | Path | None = None):
        super().__init__(message)
        self.path = Path(path) if path is not None else (Path(message.split(":", 1)[0]) if ":" in message else None)


# Names of the outputs stages write under results/<run>/ (files or folders). A corrupt file inside one
# means that whole output must be re-created.
STAGE_OUTPUT_NAMES = {"corpus", "model", "calibration.parquet", "input", "dense", "prune1", "prune1_adjust", "reconstruct",
                      "sds", "tasks"}


def stage_output_root(path: str | Path) -> Path | None:
    """The stage output (under a results/ folder) that contains `path`, or None (e.g. a user's model)."""
    path = Path(path).resolve()
    found = None
    for candidate in (path, *path.parents):
        # below results/<run>/ only; the outermost match wins (sds/model/x → sds)
        if candidate.name in STAGE_OUTPUT_NAMES and "results" in candidate.parts[:-2]:
            found = candidate
    return found


def discard_stage_output(path: str | Path) -> Path | None:
    """Deletes the stage output holding a corrupt file so that the next Snakemake run re-creates it."""
    root = stage_output_root(path)
    if root is None or not root.exists():
        return None
    if root.is_dir():
        shutil.rmtree(root)
    else:
        root.unlink()
        _sidecar(root).unlink(missing_ok=True)
    return root


HOW_TO_RECREATE = "delete it and re-run snakemake, which re-creates it"


def remove_stale_temporaries(path: Path) -> None:
    """Removes `.NAME.*.tmp` leftovers of an earlier write of `path` that was killed (SIGKILL skips
    every cleanup). Snakemake never runs two jobs writing the same output, so none is in use."""
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path beside `path`; renames it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Like atomic_path for a directory: built under a temporary name, renamed when complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


CHECKSUM_SUFFIX = ".xxh3"


def file_digest(path: str | Path) -> str:
    """XXH3-128 of the file's bytes, as hex."""
    import xxhash

    digest = xxhash.xxh3_128()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(8 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + CHECKSUM_SUFFIX)


def _write_checksum(path: Path) -> None:
    with atomic_path(_sidecar(path)) as tmp:
        tmp.write_text(file_digest(path) + "\n")


def write_checksum(path: str | Path) -> None:
    """Records the checksum sidecar of a file a stage wrote (its readers verify it)."""
    _write_checksum(Path(path))


def _require_checksum(path: Path) -> None:
    """Raises CorruptFileError if `path` or its checksum sidecar is missing."""
    if not path.is_file():
        raise CorruptFileError(f"{path}: file is missing; {HOW_TO_RECREATE}")
    if not _sidecar(path).is_file():
        raise CorruptFileError(f"{path}: no checksum file {_sidecar(path).name} beside it; {HOW_TO_RECREATE}")


def _compare_checksum(path: Path, digest: str) -> None:
    if _sidecar(path).read_text().strip() != digest:
        raise CorruptFileError(f"{path}: checksum mismatch (truncated or altered); {HOW_TO_RECREATE}")


def verify_checksum(path: str | Path) -> None:
    """Raises CorruptFileError if `path` is missing or differs from its recorded digest."""
    path = Path(path)
    _require_checksum(path)
    _compare_checksum(path, file_digest(path))


def checksum_folder(folder: str | Path) -> None:
    """Records checksum sidecars for every safetensors file of a save_pretrained folder."""
    for f in sorted(Path(folder).glob("*.safetensors")):
        _write_checksum(f)


def verify_folder(folder: str | Path) -> None:
    """Verifies the safetensors files of a folder that has sidecars (folders we wrote); others pass."""
    for f in sorted(Path(folder).glob("*.safetensors")):
        if _sidecar(f).is_file():
            verify_checksum(f)


def write_json(path: str | Path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=float) + "\n")


def read_json(path: str | Path):
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CorruptFileError(f"{path}: file is missing; {HOW_TO_RECREATE}") from None
    except json.JSONDecodeError as exc:
        raise CorruptFileError(f"{path}: not valid JSON ({exc}); {HOW_TO_RECREATE}") from None


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


# --- safetensors checkpoints -------------------------------------------------------------------------

def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    path = Path(path)
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    _write_checksum(path)


# Where a read of a file this project wrote puts its tensors when the caller names no device. Stages always
# name theirs (the one device rule: weights, caches and statistics are read straight to the stage's device);
# the device-mixing test sets this to "meta" so that a read that forgets its device cannot go unnoticed.
DEFAULT_READ_DEVICE = "cpu"


def load_tensors(path: str | Path, *, device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    verify_checksum(path)
    try:
        tensors = load_file(str(path))
        return {k: v.to(device or DEFAULT_READ_DEVICE) for k, v in tensors.items()}
    except Exception as exc:  # safetensors raises its own error types for malformed headers
        raise CorruptFileError(f"{path}: not a readable safetensors file ({exc}); {HOW_TO_RECREATE}") from None


def load_tensors_with_metadata(path: str | Path, *, device: str | torch.device | None = None
                               ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of a file this project wrote, on `device`, and its metadata."""
    reader = TensorReader(path, device=device)
    try:
        return {k: reader[k] for k in reader.keys()}, reader.metadata()
    finally:
        reader.close()


# safetensors dtype codes (the format's own names) for the dtypes a checkpoint holds.
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                       torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.int32: "I32",
                       torch.int64: "I64", torch.bool: "BOOL"}


_TORCH_DTYPES = {code: dtype for dtype, code in _SAFETENSORS_DTYPES.items()}


class SafetensorsStreamWriter:
    """Writes a safetensors file one tensor at a time, so a checkpoint of any depth is never held in memory.

    The format puts every tensor's offsets in the header, so names, dtypes and shapes are declared up front
    (`specs`, in file order) and `write` must then be called for each name in that order. The file is built
    under a temporary name, renamed into place by `close` once every tensor is written, and gets its
    checksum sidecar; `abort` (or leaving the `with` block on an exception) leaves nothing behind."""

    def __init__(self, path: str | Path, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self._order = list(specs)
        self._specs = {k: (dtype, tuple(int(d) for d in shape)) for k, (dtype, shape) in specs.items()}
        header, offset = {"__metadata__": {"format": "pt", **(metadata or {})}}, 0
        for name, (dtype, shape) in self._specs.items():
            size = int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
        self.path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.path)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        self._tmp, self._fh, self._next = Path(tmp), os.fdopen(fd, "wb"), 0
        self._fh.write(len(raw).to_bytes(8, "little") + raw)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._order) or name != self._order[self._next]:
            expected = self._order[self._next] if self._next < len(self._order) else "nothing (all written)"
            raise ValueError(f"{self.path}: expected tensor {expected!r} next, got {name!r}")
        dtype, shape = self._specs[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"{self.path}: tensor {name!r} is {tensor.dtype} {tuple(tensor.shape)}, "
                             f"declared {dtype} {shape}")
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        self._fh.write(memoryview(data))
        self._next += 1

    def close(self) -> None:
        if self._fh.closed:
            return
        if self._next != len(self._order):
            self.abort()
            raise ValueError(f"{self.path}: closed after {self._next} of {len(self._order)} tensors")
        self._fh.close()
        os.replace(self._tmp, self.path)
        _write_checksum(self.path)

    def abort(self) -> None:
        self._fh.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False


class SafetensorsFile:
    """Reads single tensors of a safetensors file with plain file reads, located by its header. Not
    memory-mapped (as safetensors' own safe_open is): a mapping's touched pages count as this process's
    resident memory while it is open, so reading a checkpoint layer by layer would grow with depth."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        size = self.path.stat().st_size
        self._fh = open(self.path, "rb")
        try:
            n = int.from_bytes(self._fh.read(8), "little")
            if not 0 < n <= size - 8:
                raise ValueError(f"header length {n} does not fit a {size}-byte file")
            header = json.loads(self._fh.read(n))
            self._metadata = header.pop("__metadata__", None) or {}
            self._start, self._entries = 8 + n, {}
            for name, entry in header.items():
                begin, end = entry["data_offsets"]
                dtype, shape = _TORCH_DTYPES[entry["dtype"]], tuple(entry["shape"])
                nbytes = int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()
                if end - begin != nbytes or self._start + end > size:
                    raise ValueError(f"tensor {name!r} lies outside the file or has the wrong size")
                self._entries[name] = (dtype, shape, begin)
        except (ValueError, KeyError, TypeError) as exc:
            self._fh.close()
            raise CorruptFileError(f"{path}: not a readable safetensors file ({exc}); {HOW_TO_RECREATE}") from None

    def keys(self) -> list[str]:
        return list(self._entries)

    def metadata(self) -> dict[str, str]:
        return dict(self._metadata)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def spec(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        """(dtype, shape) of one tensor, from the header (nothing is read)."""
        dtype, shape, _ = self._entry(name)
        return dtype, shape

    def __getitem__(self, name: str) -> torch.Tensor:
        dtype, shape, begin = self._entry(name)
        tensor = torch.empty(shape, dtype=dtype)
        target = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
        self._fh.seek(self._start + begin)
        if self._fh.readinto(target) != len(target):
            raise CorruptFileError(f"{self.path}: truncated inside tensor {name!r}; {HOW_TO_RECREATE}")
        return tensor

    def _entry(self, name: str):
        if name not in self._entries:
            raise CorruptFileError(f"{self.path}: has no tensor {name!r}; {HOW_TO_RECREATE}")
        return self._entries[name]

    def close(self) -> None:
        self._fh.close()


class TensorReader(SafetensorsFile):
    """A safetensors file this project wrote: its checksum is verified once, on opening; tensors are then
    read one at a time, so a stage that needs one layer of a checkpoint does not load all of them, and
    land on `device` (see DEFAULT_READ_DEVICE)."""

    def __init__(self, path: str | Path, *, device: str | torch.device | None = None):
        verify_checksum(path)
        super().__init__(path)
        self.device = torch.device(device or DEFAULT_READ_DEVICE)

    def __getitem__(self, name: str) -> torch.Tensor:
        tensor = super().__getitem__(name)
        return tensor if self.device.type == "cpu" else tensor.to(self.device)


# --- Parquet activation caches -----------------------------------------------------------------------
# One row per calibration sequence; column "hidden" holds the (seqlen × hidden) tensor as raw bytes of the
# cache dtype (a large_binary column, PLAIN-encoded: one value per tensor, its bytes contiguous in the file,
# so the reader in parquet_pages reads each straight into its tensor; a list<float16> column would cost a
# conversion per element). Uncompressed, 8 sequences per row group, fp16 by default: chosen by
# bench/cache_bench.py (docs/performance.md has the table and the reasons).

_NUMPY_VIEW = {torch.float16: np.float16, torch.float32: np.float32, torch.bfloat16: np.uint16}


class ParquetTensorWriter:
    """Streams same-shaped tensors into a Parquet file, one row each, written atomically on close."""

    def __init__(self, path: str | Path, *, dtype: torch.dtype, row_group_size: int, compression: str = "none"):
        self.path = Path(path)
        self.dtype = dtype
        self.row_group_size = row_group_size
        self.compression = compression
        self._ctx = atomic_path(self.path)
        self._tmp = self._ctx.__enter__()
        self._writer = None
        self._pending: list[bytes] = []
        self._shape = None
        self.rows = 0

    def append(self, tensor: torch.Tensor) -> None:
        tensor = tensor.detach().to("cpu", self.dtype).contiguous()
        if self._shape is None:
            self._shape = tuple(tensor.shape)
        elif tuple(tensor.shape) != self._shape:
            raise ValueError(f"{self.path}: tensor shape {tuple(tensor.shape)} differs from {self._shape}")
        self._pending.append(tensor.view(torch.uint8).numpy().tobytes())
        self.rows += 1
        if len(self._pending) >= self.row_group_size:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self._pending:
            return
        table = pa.table({"hidden": pa.array(self._pending, type=pa.large_binary())})
        meta = {b"sds.shape": json.dumps(self._shape).encode(), b"sds.dtype": str(self.dtype).encode()}
        table = table.replace_schema_metadata(meta)
        if self._writer is None:
            # PLAIN encoding: dictionary encoding of unique float blobs only costs time
            self._writer = pq.ParquetWriter(str(self._tmp), table.schema, compression=self.compression,
                                            use_dictionary=False, write_statistics=False)
        self._writer.write_table(table, row_group_size=len(self._pending))
        self._pending = []

    def close(self) -> None:
        self._flush()
        if self._writer is None:
            raise ValueError(f"{self.path}: no rows written")
        self._writer.close()
        self._ctx.__exit__(None, None, None)
        _write_checksum(self.path)

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._ctx.__exit__(RuntimeError, RuntimeError("aborted"), None)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False


class _BackgroundChecksum:
    """The file's digest computed in a thread (xxhash releases the GIL) while the caller parses it, so
    verification overlaps the read instead of costing a second pass before it."""

    def __init__(self, path: Path):
        import threading

        self.path = path
        self.digest: str | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.digest = file_digest(self.path)
        except OSError:
            self.digest = ""

    def check(self) -> None:
        self._thread.join()
        _compare_checksum(self.path, self.digest)


class _OrderedHasher:
    """XXH3-128 of byte blocks given in order, hashed on one worker thread (xxhash releases the GIL), so
    the digest of a file read front to back costs no second pass and little time on the reading thread."""

    def __init__(self):
        import concurrent.futures
        import xxhash

        self._digest = xxhash.xxh3_128()
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        self._last = None
        self._small = bytearray()  # page headers and length prefixes, batched: a task each would cost more

    def __call__(self, block) -> None:
        if len(block) < 65536:
            self._small += memoryview(block).cast("B")
            return
        self._flush_small()
        self._last = self._pool.submit(self._digest.update, block)

    def _flush_small(self) -> None:
        if self._small:
            self._last = self._pool.submit(self._digest.update, bytes(self._small))
            self._small = bytearray()

    def hexdigest(self) -> str:
        self._flush_small()
        self._pool.shutdown(wait=True)
        if self._last is not None:
            self._last.result()
        return self._digest.hexdigest()


def iter_parquet_tensors(path: str | Path, *, verify: bool = True) -> Iterator[torch.Tensor]:
    """Yields the tensors of a ParquetTensorWriter file in order, one row group's worth in memory at a time.
    Treat them as read-only: with `verify` they are still being hashed after they are yielded.

    Uncompressed files (the default) are read page by page straight into each tensor's memory
    (`parquet_pages`); other settings through Arrow. With `verify`, the file's digest is checked against its
    sidecar; a mismatch raises CorruptFileError at the latest after the last tensor, before the generator
    finishes, so a stage fails (and writes nothing) instead of finishing on corrupt data.
    """
    import pyarrow.parquet as pq

    from . import parquet_pages

    path = Path(path)
    if verify:
        _require_checksum(path)
    try:
        # not memory-mapped: touched pages of a mapping count as resident memory for the whole read
        pf = pq.ParquetFile(str(path), memory_map=False)
        meta = pf.schema_arrow.metadata or {}
        shape = tuple(json.loads(meta[b"sds.shape"]))
        dtype = getattr(torch, meta[b"sds.dtype"].decode().removeprefix("torch."))
        parquet_pages.check_layout(pf)
    except parquet_pages.Unsupported:
        yield from _iter_parquet_through_arrow(path, pf, shape, dtype, verify)
        return
    except Exception as exc:
        if verify:
            verify_checksum(path)  # a damaged file is reported as such, not as a parse error
        raise CorruptFileError(f"{path}: not a readable activation cache ({exc}); {HOW_TO_RECREATE}") from None
    hasher = _OrderedHasher() if verify else None
    reader = parquet_pages.SequentialReader(path, hasher)
    has_def_levels = pf.schema.column(0).max_definition_level > 0
    nbytes = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
    try:
        for group in range(pf.num_row_groups):
            start, size = parquet_pages.chunk_range(pf, group)
            try:
                reader.skip_to(start)
                lengths = parquet_pages.value_lengths(reader, start + size, has_def_levels,
                                                      pf.metadata.row_group(group).num_rows)
                for length in lengths:
                    if length != nbytes:
                        raise ValueError(f"a {length}-byte value where {shape} {dtype} needs {nbytes}")
                    tensor = torch.empty(shape, dtype=dtype)
                    reader.readinto(tensor.view(-1).view(torch.uint8).numpy())
                    yield tensor
            except (ValueError, IndexError, KeyError, parquet_pages.Unsupported) as exc:
                if hasher is not None:
                    reader.read_rest()
                    _compare_checksum(path, hasher.hexdigest())
                raise CorruptFileError(f"{path}: row group {group} unreadable ({exc}); {HOW_TO_RECREATE}") from None
        if hasher is not None:
            reader.read_rest()
            _compare_checksum(path, hasher.hexdigest())
    finally:
        reader.close()


def _iter_parquet_through_arrow(path: Path, pf, shape, dtype, verify: bool) -> Iterator[torch.Tensor]:
    """iter_parquet_tensors for compressed (or otherwise non-default) caches: Arrow decodes each row group;
    the tensors are views of its buffer."""
    checksum = _BackgroundChecksum(path) if verify else None
    view = _NUMPY_VIEW[dtype]
    for group in range(pf.num_row_groups):
        try:
            column = pf.read_row_group(group, columns=["hidden"]).column(0)
        except Exception as exc:
            if checksum is not None:
                checksum.check()
            raise CorruptFileError(f"{path}: row group {group} unreadable ({exc}); {HOW_TO_RECREATE}") from None
        for chunk in column.chunks:
            _, offsets_buf, data_buf = chunk.buffers()
            offset_type = np.int64 if str(chunk.type) == "large_binary" else np.int32
            offsets = np.frombuffer(offsets_buf, dtype=offset_type)[chunk.offset:chunk.offset + len(chunk) + 1]
            data = np.frombuffer(data_buf, dtype=np.uint8)
            for r in range(len(chunk)):
                # a view of the row group's Arrow buffer (no copy; the tensor keeps the buffer alive).
                # Arrow marks it read-only, which torch only warns about: callers never write to it.
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)
                    tensor = torch.from_numpy(data[offsets[r]:offsets[r + 1]].view(view))
                if dtype == torch.bfloat16:
                    tensor = tensor.view(torch.bfloat16)
                yield tensor.view(shape)
        del column
    if checksum is not None:
        checksum.check()


