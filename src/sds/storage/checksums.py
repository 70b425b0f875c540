"""Checksum sidecars written for and verified on every tensor file a stage reads, so a truncated or altered file
is named instead of silently used (the digests themselves: `digests`)."""
from __future__ import annotations

from pathlib import Path

from ..core.errors import HOW_TO_RECREATE, CorruptFileError
from .atomic import atomic_path
from .digests import file_digest, sidecar, tensor_sidecar


def write_checksum(path: str | Path) -> None:
    """Records the checksum sidecar of a file a stage wrote, already in place (inside an output folder still
    being built); its readers verify it."""
    with atomic_path(sidecar(Path(path))) as tmp:
        tmp.write_text(file_digest(path) + "\n")


def require_checksum(path: Path) -> None:
    """Raises CorruptFileError if `path` or its checksum sidecar is missing."""
    if not path.is_file():
        raise CorruptFileError(f"{path}: file is missing; {HOW_TO_RECREATE}")
    if not sidecar(path).is_file():
        raise CorruptFileError(f"{path}: no checksum file {sidecar(path).name} beside it; {HOW_TO_RECREATE}")


def _compare_checksum(path: Path, digest: str) -> None:
    if sidecar(path).read_text().strip() != digest:
        raise CorruptFileError(f"{path}: checksum mismatch (truncated or altered); {HOW_TO_RECREATE}")


def verify_checksum(path: str | Path) -> None:
    """Raises CorruptFileError if `path` is missing or differs from its recorded digest."""
    path = Path(path)
    require_checksum(path)
    _compare_checksum(path, file_digest(path))


def tensor_digests(path: str | Path) -> dict | None:
    """The per-tensor digests recorded beside a safetensors file (`<file>.tensors.json`: its header's, each
    tensor's and the whole file's), or None where there are none to trust: no such sidecar, an unreadable
    one, or one of another version of the file (its whole-file digest is not the checksum sidecar's), which
    the caller then verifies whole. Raises CorruptFileError if the file or its checksum is missing, or if
    the file's size is not the one written."""
    import json

    path = Path(path)
    require_checksum(path)
    try:
        record = json.loads(tensor_sidecar(path).read_text())
        if (record.get("algorithm") != "xxh3_128" or record.get("file") != sidecar(path).read_text().strip()
                or not isinstance(record.get("tensors"), dict) or not isinstance(record.get("header"), str)):
            return None
        size = int(record["size"])
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None
    if path.stat().st_size != size:
        raise CorruptFileError(f"{path}: checksum mismatch (truncated or altered: {path.stat().st_size} bytes where "
                               f"{size} were written); {HOW_TO_RECREATE}")
    return record


def checksum_folder(folder: str | Path) -> None:
    """Records checksum sidecars for every safetensors file of a save_pretrained folder."""
    for f in sorted(Path(folder).glob("*.safetensors")):
        write_checksum(f)


class BackgroundChecksum:
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
