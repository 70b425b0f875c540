"""Safetensors files: read one tensor at a time (located by the header, checked against the file's size),
written one tensor at a time (`SafetensorsStreamWriter`), so a checkpoint of any depth is never held in
memory; files this project wrote are verified against their checksums: whole on opening, or (`verify=
"per_tensor"`, for a job that reads a few tensors of a large file) the header on opening and each tensor's
bytes as it is read, against the per-tensor digests the writer recorded."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import torch

from ..core.errors import HOW_TO_RECREATE, CorruptFileError
from . import digests
from .atomic import StreamedOutput, TempFile
from .checksums import tensor_digests, verify_checksum
from .digests import sidecar, tensor_sidecar

# Where a read of a file this project wrote puts its tensors when the caller names no device. Stages always
# name theirs (the one device rule: weights, caches and statistics are read straight to the stage's device);
# the device-mixing test sets this to "meta" so that a read that forgets its device cannot go unnoticed.
DEFAULT_READ_DEVICE = "cpu"

# safetensors dtype codes (the format's own names) for the dtypes a checkpoint holds.
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                       torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.int32: "I32",
                       torch.int64: "I64", torch.bool: "BOOL"}

_TORCH_DTYPES = {code: dtype for dtype, code in _SAFETENSORS_DTYPES.items()}


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
            self._check_tiling(size - self._start, {k: (b, e) for k, (b, e) in
                                                    ((k, v["data_offsets"]) for k, v in header.items())})
        except (ValueError, KeyError, TypeError) as exc:
            self._fh.close()
            raise CorruptFileError(f"{path}: not a readable safetensors file ({exc}); {HOW_TO_RECREATE}") from None

    @staticmethod
    def _check_tiling(data_bytes: int, spans: dict[str, tuple[int, int]]) -> None:
        """The tensors' byte ranges must tile the data section in order, with no gap, overlap or negative
        offset, and end where the file does (the format's rule, which the safetensors library enforces)."""
        position = 0
        for name, (begin, end) in sorted(spans.items(), key=lambda item: (item[1][0], item[1][1])):
            if begin != position or end < begin:
                raise ValueError(f"tensor {name!r} spans bytes {begin}..{end} of the data where {position} was next "
                                 "(offsets overlap, leave a gap or are negative)")
            position = end
        if position != data_bytes:
            raise ValueError(f"the tensors end at data byte {position} of {data_bytes}")

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


VERIFY_MODES = ("file", "per_tensor")


class TensorReader(SafetensorsFile):
    """A safetensors file this project wrote, its tensors read one at a time (so a stage that needs one layer
    of a checkpoint does not load all of them) onto `device` (see DEFAULT_READ_DEVICE).

    `verify="file"`: the whole file's checksum is verified once, on opening. `verify="per_tensor"`: on opening
    only its size and header (names, dtypes, shapes, offsets, metadata) are checked against the per-tensor
    digests `SafetensorsStreamWriter` recorded, and each tensor's bytes when it is read, so a job reading one
    layer of a checkpoint of tens of GB hashes that layer only; a file without (current) per-tensor digests
    is verified whole instead. Every byte of the file is the header's or one tensor's (`_check_tiling`), so
    an altered byte in a tensor that is read is named either way."""

    def __init__(self, path: str | Path, *, device: str | torch.device | None = None, verify: str = "file"):
        if verify not in VERIFY_MODES:
            raise ValueError(f"verify must be one of {VERIFY_MODES}, not {verify!r}")
        self._digests = tensor_digests(path) if verify == "per_tensor" else None
        if self._digests is None:
            verify_checksum(path)
        super().__init__(path)
        self.device = torch.device(device or DEFAULT_READ_DEVICE)
        if self._digests is not None:
            self._check_header()

    @property
    def verify(self) -> str:
        """How this reader checks the file: "per_tensor", or "file" (verified whole on opening)."""
        return "file" if self._digests is None else "per_tensor"

    def _check_header(self) -> None:
        self._fh.seek(0)
        header = self._fh.read(self._start)
        if (digests.bytes_digest(header) != self._digests["header"]
                or sorted(self._digests["tensors"]) != sorted(self._entries)):
            self.close()
            raise CorruptFileError(f"{self.path}: checksum mismatch in the header (truncated or altered); "
                                   f"{HOW_TO_RECREATE}")

    def __getitem__(self, name: str) -> torch.Tensor:
        tensor = super().__getitem__(name)
        if self._digests is not None:
            data = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
            if digests.bytes_digest(data) != self._digests["tensors"][name]:
                raise CorruptFileError(f"{self.path}: checksum mismatch in tensor {name!r} (truncated or altered); "
                                       f"{HOW_TO_RECREATE}")
        return tensor if self.device.type == "cpu" else tensor.to(self.device)


class SafetensorsStreamWriter(StreamedOutput):
    """Writes a safetensors file one tensor at a time, so a checkpoint of any depth is never held in memory.

    The format puts every tensor's offsets in the header, so names, dtypes and shapes are declared up front
    (`specs`, in file order) and `write` must then be called for each name in that order. The file is built
    under a temporary name, renamed into place by `close` once every tensor is written, and gets its
    checksum sidecar and its per-tensor digests (`<file>.tensors.json`: the header's and each tensor's, taken
    from the bytes as they are written, as is the whole file's, so nothing is read back); `abort` (or leaving
    the `with` block on an exception) leaves nothing behind."""

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
        self._temp, self._next = TempFile(self.path), 0
        self._fh = open(self._temp.tmp, "wb")
        head = len(raw).to_bytes(8, "little") + raw
        self._file_digest, self._digests = digests.new_digest(), {}
        self._file_digest.update(head)
        self._header_digest, self._size = digests.bytes_digest(head), len(head) + offset
        with self._temp.naming():
            self._fh.write(head)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._order) or name != self._order[self._next]:
            expected = self._order[self._next] if self._next < len(self._order) else "nothing (all written)"
            raise ValueError(f"{self.path}: expected tensor {expected!r} next, got {name!r}")
        dtype, shape = self._specs[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"{self.path}: tensor {name!r} is {tensor.dtype} {tuple(tensor.shape)}, "
                             f"declared {dtype} {shape}")
        data = memoryview(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        with self._temp.naming():
            self._fh.write(data)
        self._file_digest.update(data)
        self._digests[name] = digests.bytes_digest(data)
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
            whole = self._file_digest.hexdigest()
            record = {"algorithm": "xxh3_128", "file": whole, "header": self._header_digest, "size": self._size,
                      "tensors": self._digests}
            self._temp.commit(checksum=True, digest=whole,
                              sidecars={tensor_sidecar(self.path): json.dumps(record, indent=1, sort_keys=True) + "\n"})
        finally:
            self._temp.discard()

    def abort(self) -> None:
        with contextlib.suppress(OSError):  # the error being handled is the one to report
            self._fh.close()
        self._temp.discard()


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """A safetensors file of `tensors` (with its checksum sidecar). Written by SafetensorsStreamWriter, not
    safetensors' save_file: that one orders the metadata as a hash map does, differently in each process,
    so the same tensors gave files (and digests) that differ from run to run."""
    with SafetensorsStreamWriter(path, {k: (v.dtype, tuple(v.shape)) for k, v in sorted(tensors.items())},
                                 metadata) as writer:
        for name, tensor in sorted(tensors.items()):
            writer.write(name, tensor)


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


def verify_folder(folder: str | Path) -> None:
    """Verifies the safetensors files of a model folder: against their sidecars where they have them (files
    we wrote); otherwise (a user's checkpoint) that each is whole, its header readable and every tensor
    inside the file, so a truncated file is named here rather than deep inside a library's loader."""
    for f in sorted(Path(folder).glob("*.safetensors")):
        if sidecar(f).is_file():
            verify_checksum(f)
        else:
            SafetensorsFile(f).close()
