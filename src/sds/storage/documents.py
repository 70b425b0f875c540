"""Small text outputs (JSON records, Markdown, CSV) written atomically, and JSON read back with one-line errors."""
from __future__ import annotations

import json
from pathlib import Path

from ..core.errors import HOW_TO_RECREATE, CorruptFileError
from .atomic import atomic_path
from .checksums import verify_checksum


def write_json(path: str | Path, obj, *, output: bool = False) -> None:
    """`output`: a stage's own output file (an evaluation), written with its checksum sidecar and ownership
    record, so a damaged copy is found (`read_json(verify=True)`) and removed for Snakemake to re-create."""
    with atomic_path(path, checksum=output, record=output) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=float) + "\n")


def read_json(path: str | Path, *, verify: bool = False):
    """A JSON file; with `verify`, checked against its checksum sidecar first (see write_json)."""
    path = Path(path)
    if verify:
        verify_checksum(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CorruptFileError(f"{path}: file is missing; {HOW_TO_RECREATE}") from None
    except json.JSONDecodeError as exc:
        raise CorruptFileError(f"{path}: not valid JSON ({exc}); {HOW_TO_RECREATE}") from None


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def copy_file(source: str | Path, path: str | Path) -> None:
    """`source`'s bytes at `path`, written atomically (symlinks followed: a hub cache's blobs)."""
    import shutil

    with atomic_path(path) as tmp:
        shutil.copyfile(source, tmp)
