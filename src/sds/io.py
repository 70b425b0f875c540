"""File I/O for stage outputs.

- Atomic: every write goes to a temporary name in the same folder and is renamed into place, so a file
  or folder is complete or absent. A write that fails (disk full, file-size limit, read-only folder)
  removes its temporary and raises an OSError naming the output file, not the temporary.
- Checksummed: each tensor file records its XXH3-128 digest in a sidecar `<file>.xxh3`, written before
  the file is renamed into place and checked on read, so a truncated or altered file is named instead of
  silently used. The digest guards against truncation and corruption, not tampering (XXH3 runs at
  ~10 GB/s on one core where SHA-256 manages ~1.3).
- Owned: every output committed through `atomic_dir` carries a record, `.sds-output`, naming the place
  it was committed to (see `recorded_output`). Only an output whose record names its own place inside
  the run's folder is ever deleted by the pipeline; anything else (a user's model, a copy, another
  run's output) is named and left alone.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
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


HOW_TO_RECREATE = "delete it and re-run snakemake, which re-creates it"


# --- ownership records ------------------------------------------------------------------------------------
# Why a record inside each output rather than a ledger under results/<run>/: the record is written into
# the temporary folder before the rename that commits the output, so it exists exactly when the commit
# happened (a ledger entry and its output could disagree after a kill between the two writes, and a shared
# ledger file needs locking between parallel jobs, which shared cluster filesystems do poorly). It names
# the output's path relative to the working directory the stage ran in (Snakemake's `-d`), so a project
# moved as a whole keeps its records valid while a folder copied or moved elsewhere (say a released
# `sds/model` copied next to a user's own checkpoints) no longer matches its record and is never deleted.

OUTPUT_RECORD = ".sds-output"


def _record_file(output: Path, *, is_dir: bool) -> Path:
    return output / OUTPUT_RECORD if is_dir else output.with_name(output.name + OUTPUT_RECORD)


def _record_text(final: Path) -> str:
    return json.dumps({"output": os.path.relpath(os.path.abspath(final))}) + "\n"


def _is_recorded(output: Path) -> bool:
    """True if `output` (a resolved path) holds a record naming this very place."""
    try:
        named = json.loads(_record_file(output, is_dir=output.is_dir()).read_text())["output"]
        return Path(named).resolve() == output
    except (OSError, ValueError, KeyError, TypeError):
        return False


def recorded_output(path: str | Path, run_dir: str | Path) -> Path | None:
    """The pipeline output holding `path` (the file itself or a folder above it, below `run_dir`) whose
    record names its current place, or None. Symlinks are resolved first, so a user's folder linked into
    the run's folder lies outside it."""
    run_dir, path = Path(run_dir).resolve(), Path(path).resolve()
    for candidate in (path, *path.parents):
        if run_dir not in candidate.parents:
            return None
        if _is_recorded(candidate):
            return candidate
    return None


def discard_stage_output(path: str | Path, run_dir: str | Path) -> Path | None:
    """Deletes the output of this run that holds a corrupt file (see `recorded_output`), so that the next
    Snakemake run re-creates it; returns what was deleted, or None when nothing here is the run's own."""
    output = recorded_output(path, run_dir)
    if output is None:
        return None
    if output.is_dir():
        shutil.rmtree(output)
    else:
        for f in (output, _sidecar(output), _record_file(output, is_dir=False)):
            f.unlink(missing_ok=True)
    return output


# --- atomic writes ----------------------------------------------------------------------------------------

# errors of a write that the CLI reports in one line (file named, nothing left behind) instead of a traceback
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM})


def _temporary_for(final: Path, name: Path) -> Path | None:
    """The temporary (file or folder) of a write of `final` that `name` is or lies in, or None."""
    for candidate in (name, *name.parents):
        if (candidate.parent == final.parent and candidate.name.startswith(f".{final.name}.")
                and candidate.name.endswith(".tmp")):
            return candidate
    return None


def _write_errno(exc: BaseException) -> int | None:
    """The errno of a failed write: an OSError's, or the one quoted by a Rust library's I/O error
    (safetensors, tokenizers: "... (os error 28)"), if it is one of WRITE_ERRNOS."""
    code = exc.errno if isinstance(exc, OSError) else None
    if code is None and not isinstance(exc, OSError):
        found = re.search(r"\(os error (\d+)\)", str(exc))
        code = int(found.group(1)) if found else None
    return code if code in WRITE_ERRNOS else None


class OutputWriteError(OSError):
    """Writing a stage's output failed (disk full, file-size limit, read-only folder, …); `filename` is the
    output file or folder as the user will know it, and the temporary has been removed."""


@contextlib.contextmanager
def _naming(final: Path, *, creating: bool = False) -> Iterator[None]:
    """Re-raises a write error (WRITE_ERRNOS) met while writing `final` through its temporary as an
    OutputWriteError with the name the file will have: the temporary's name means nothing to the user and
    is removed afterwards. Errors naming other files pass unchanged (inside an output being built they
    may be about reading an input), except while `creating` the temporary (its folders)."""
    try:
        yield
    except Exception as exc:
        code = _write_errno(exc)
        if code is None:
            raise
        target = final
        filename = getattr(exc, "filename", None)
        if filename:
            name = Path(filename)
            temporary = _temporary_for(final, name)
            if temporary is not None:
                target = final / name.relative_to(temporary)
            elif creating:
                target = name  # the folder that could not be created
            else:
                raise
        raise OutputWriteError(code, os.strerror(code), str(target)) from exc


def remove_stale_temporaries(path: Path) -> None:
    """Removes `.NAME.*.tmp` leftovers of an earlier write of `path` that was killed (SIGKILL skips
    every cleanup). Snakemake never runs two jobs writing the same output, so none is in use."""
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def _umask() -> int:
    try:
        with open("/proc/self/status") as status:  # read without changing it (os.umask can only set)
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _publish_mode(tmp: Path, *, is_dir: bool) -> None:
    """The mode a plainly created file or folder would get: mkstemp/mkdtemp create them owner-only (0600,
    0700), which would leave results unreadable to the rest of a group sharing them."""
    os.chmod(tmp, (0o777 if is_dir else 0o666) & ~_umask())


class _TempFile:
    """A temporary file beside `path`; `commit` renames it onto `path` (after writing its checksum sidecar
    and before its ownership record), `discard` removes it. OSErrors name `path`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with _naming(self.path, creating=True):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(self.path)
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        os.close(fd)
        self.tmp = Path(tmp)

    def naming(self):
        return _naming(self.path)

    def commit(self, *, checksum: bool = False, record: bool = False) -> None:
        with self.naming():
            if checksum:  # sidecar first: a kill between the two leaves no unverifiable file
                with atomic_path(_sidecar(self.path)) as side:
                    side.write_text(file_digest(self.tmp) + "\n")
            _publish_mode(self.tmp, is_dir=False)
            os.replace(self.tmp, self.path)
            if record:  # after the rename: a kill in between leaves an output without a record (never deleted)
                with atomic_path(_record_file(self.path, is_dir=False)) as rec:
                    rec.write_text(_record_text(self.path))

    def discard(self) -> None:
        self.tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | Path, *, checksum: bool = False, record: bool = False) -> Iterator[Path]:
    """Yields a temporary path beside `path`; renames it onto `path` only if the block succeeds.
    `checksum`: also write its XXH3 sidecar; `record`: also its ownership record (a stage's own output)."""
    temp = _TempFile(path)
    try:
        with temp.naming():
            yield temp.tmp
        temp.commit(checksum=checksum, record=record)
    finally:
        temp.discard()


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Like atomic_path for a directory: built under a temporary name, renamed when complete, with its
    ownership record inside. An existing folder at `path` is replaced only if it is empty or is this
    pipeline's own output (its record names it); anything else is refused before any work."""
    path = Path(path)
    _refuse_to_replace_foreign(path)
    with _naming(path, creating=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        with _naming(path):
            yield tmp
            (tmp / OUTPUT_RECORD).write_text(_record_text(path))
            _publish_mode(tmp, is_dir=True)
            _refuse_to_replace_foreign(path)
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _refuse_to_replace_foreign(path: Path) -> None:
    if path.is_symlink() or (path.exists() and not (path.is_dir() and (not any(path.iterdir())
                                                                      or _is_recorded(path.resolve())))):
        raise FileExistsError(errno.EEXIST, "exists and is not an output this pipeline wrote there (no "
                              f"{OUTPUT_RECORD} record naming it), so it is not replaced", str(path))


# --- checksums ----------------------------------------------------------------------------------------------

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
    """The sidecar of a file already in place (inside an output folder still being built)."""
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
    """Verifies the safetensors files of a model folder: against their sidecars where they have them (files
    we wrote); otherwise (a user's checkpoint) that each is whole, its header readable and every tensor
    inside the file, so a truncated file is named here rather than deep inside a library's loader."""
    for f in sorted(Path(folder).glob("*.safetensors")):
        if _sidecar(f).is_file():
            verify_checksum(f)
        else:
            SafetensorsFile(f).close()


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
    """A safetensors file of `tensors` (with its checksum sidecar). Written by SafetensorsStreamWriter, not
    safetensors' save_file: that one orders the metadata as a hash map does, differently in each process,
    so the same tensors gave files (and digests) that differ from run to run."""
    with SafetensorsStreamWriter(path, {k: (v.dtype, tuple(v.shape)) for k, v in sorted(tensors.items())},
                                 metadata) as writer:
        for name, tensor in sorted(tensors.items()):
            writer.write(name, tensor)


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
        header, offset = {"__metadata__": {"format": "pt", **dict(sorted((metadata or {}).items()))}}, 0
        for name, (dtype, shape) in self._specs.items():
            size = int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
        self._temp, self._next = _TempFile(self.path), 0
        self._fh = open(self._temp.tmp, "wb")
        with self._temp.naming():
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
        with self._temp.naming():
            self._fh.write(memoryview(data))
        self._next += 1

    def close(self) -> None:
        if self._fh.closed:
            return
        if self._next != len(self._order):
            self.abort()
            raise ValueError(f"{self.path}: closed after {self._next} of {len(self._order)} tensors")
        try:
            with self._temp.naming():
                self._fh.close()  # flushes: a full disk may show only here
            self._temp.commit(checksum=True)
        finally:
            self._temp.discard()

    def abort(self) -> None:
        with contextlib.suppress(OSError):  # the error being handled is the one to report
            self._fh.close()
        self._temp.discard()

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
                if end - begin != nbytes:
                    raise ValueError(f"tensor {name!r} has {end - begin} bytes where {entry['dtype']} "
                                     f"{list(shape)} needs {nbytes}")
                if self._start + end > size:
                    raise ValueError(f"truncated: tensor {name!r} ends at byte {self._start + end} of a "
                                     f"{size}-byte file")
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
# One row per calibration sequence; column "hidden" holds the (seqlen × hidden) tensor as the raw bytes of
# the cache dtype in a fixed_size_binary column (Parquet FIXED_LEN_BYTE_ARRAY, PLAIN): a row group's values
# are one contiguous Arrow buffer after decoding, viewed as a (rows × seqlen × hidden) tensor without a
# copy; a list<float16> column would convert per element. Uncompressed, 8 sequences per row group, fp16 by
# default: chosen by bench/cache_bench.py (docs/performance.md has the figures and the reasons). Caches
# written before (a large_binary column) are read the same way.

_NUMPY_VIEW = {torch.float16: np.float16, torch.float32: np.float32, torch.bfloat16: np.uint16}


class ParquetTensorWriter:
    """Streams same-shaped tensors into a Parquet file, one row each, written atomically (with its checksum
    sidecar) on close. Each appended tensor is copied once, into the pending row group's buffer."""

    def __init__(self, path: str | Path, *, dtype: torch.dtype, row_group_size: int, compression: str = "none"):
        self.path = Path(path)
        self.dtype = dtype
        self.row_group_size = row_group_size
        self.compression = compression
        self._temp = _TempFile(self.path)
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
    verification overlaps the read instead of costing a pass before it."""

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
        _require_checksum(path)
    checksum = _BackgroundChecksum(path) if verify else None

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
