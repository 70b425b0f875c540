"""File I/O for stage outputs: every write goes to a temporary name in the same folder and is renamed
into place, so a file is complete or absent. Each tensor file records its SHA-256 in a sidecar
`<file>.sha256`, checked on read, so a truncated or altered file is named instead of silently used.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
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
STAGE_OUTPUT_NAMES = {"corpus", "model", "calibration.parquet", "dense", "prune1", "prune1_adjust", "reconstruct",
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
        Path(str(root) + ".sha256").unlink(missing_ok=True)
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


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_checksum(path: Path) -> None:
    with atomic_path(path.with_name(path.name + ".sha256")) as tmp:
        tmp.write_text(sha256_file(path) + "\n")


def verify_checksum(path: str | Path) -> None:
    """Raises CorruptFileError if `path` is missing or differs from its recorded SHA-256."""
    path = Path(path)
    if not path.is_file():
        raise CorruptFileError(f"{path}: file is missing; {HOW_TO_RECREATE}")
    sidecar = path.with_name(path.name + ".sha256")
    if not sidecar.is_file():
        raise CorruptFileError(f"{path}: no checksum file {sidecar.name} beside it; {HOW_TO_RECREATE}")
    if sidecar.read_text().strip() != sha256_file(path):
        raise CorruptFileError(f"{path}: checksum mismatch (truncated or altered); {HOW_TO_RECREATE}")


def checksum_folder(folder: str | Path) -> None:
    """Records SHA-256 sidecars for every safetensors file of a save_pretrained folder."""
    for f in sorted(Path(folder).glob("*.safetensors")):
        _write_checksum(f)


def verify_folder(folder: str | Path) -> None:
    """Verifies the safetensors files of a folder that has sidecars (folders we wrote); others pass."""
    for f in sorted(Path(folder).glob("*.safetensors")):
        if f.with_name(f.name + ".sha256").is_file():
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


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    verify_checksum(path)
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for malformed headers
        raise CorruptFileError(f"{path}: not a readable safetensors file ({exc}); {HOW_TO_RECREATE}") from None


# --- Parquet activation caches -----------------------------------------------------------------------
# One row per calibration sequence; column "hidden" holds the (seqlen × hidden) tensor as raw bytes of the
# cache dtype. A binary column (not a list column) keeps reads a single memcpy per row group.

_TORCH_TO_NUMPY = {torch.float16: np.float16, torch.float32: np.float32, torch.bfloat16: None}


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
        self._pending.append(tensor.view(torch.uint8).numpy().tobytes() if self.dtype == torch.bfloat16
                             else tensor.numpy().tobytes())
        self.rows += 1
        if len(self._pending) >= self.row_group_size:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self._pending:
            return
        table = pa.table({"hidden": pa.array(self._pending, type=pa.binary())})
        if self._writer is None:
            meta = {b"sds.shape": json.dumps(self._shape).encode(), b"sds.dtype": str(self.dtype).encode()}
            schema = table.schema.with_metadata(meta)
            self._writer = pq.ParquetWriter(str(self._tmp), schema, compression=self.compression)
            table = table.replace_schema_metadata(meta)
        else:
            table = table.replace_schema_metadata(self._writer.schema.metadata)
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


def iter_parquet_tensors(path: str | Path, *, verify: bool = True) -> Iterator[torch.Tensor]:
    """Yields the tensors of a ParquetTensorWriter file in order, one row group in memory at a time."""
    import pyarrow.parquet as pq

    path = Path(path)
    if verify:
        verify_checksum(path)
    try:
        pf = pq.ParquetFile(str(path))
        meta = pf.schema_arrow.metadata or {}
        shape = tuple(json.loads(meta[b"sds.shape"]))
        dtype = getattr(torch, meta[b"sds.dtype"].decode().removeprefix("torch."))
    except Exception as exc:
        raise CorruptFileError(f"{path}: not a readable activation cache ({exc}); {HOW_TO_RECREATE}") from None
    for group in range(pf.num_row_groups):
        column = pf.read_row_group(group, columns=["hidden"]).column(0)
        for value in column.to_pylist():
            yield torch.frombuffer(bytearray(value), dtype=dtype).view(shape)


def parquet_rows(path: str | Path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(str(path)).metadata.num_rows
