"""Checksums of stage outputs: each tensor file records its XXH3-128 digest in a sidecar `<file>.xxh3`; a
safetensors file we stream-write also records each tensor's digest (and its header's) in `<file>.tensors.json`,
so a reader of a few tensors checks those bytes only. The digests guard against truncation and corruption, not
tampering (XXH3 runs at ~10 GB/s on one core where SHA-256 manages ~1.3)."""
from __future__ import annotations

from pathlib import Path

CHECKSUM_SUFFIX = ".xxh3"
TENSORS_SUFFIX = ".tensors.json"  # per-tensor digests of a safetensors file (see safetensors.TensorReader)


def new_digest():
    """An incremental XXH3-128 (`update`, `hexdigest`): a file's digest taken while it is written."""
    import xxhash

    return xxhash.xxh3_128()


def bytes_digest(data) -> str:
    """XXH3-128 of a bytes-like object (a tensor's bytes), as hex."""
    import xxhash

    return xxhash.xxh3_128_hexdigest(data)


def file_digest(path: str | Path) -> str:
    """XXH3-128 of the file's bytes, as hex."""
    digest = new_digest()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(8 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sidecar(path: Path) -> Path:
    return path.with_name(path.name + CHECKSUM_SUFFIX)


def tensor_sidecar(path: Path) -> Path:
    return path.with_name(path.name + TENSORS_SUFFIX)
