"""Ownership records: every output committed through `atomic.atomic_dir` carries a record, `.sds-output`,
naming the place it was committed to. Only an output whose record names its own place inside the run's
folder is ever deleted by the pipeline; anything else (a user's model, a copy, another run's output) is
named and left alone."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .digests import sidecar, tensor_sidecar

# Why a record inside each output rather than a ledger under results/<run>/: the record is written into
# the temporary folder before the rename that commits the output, so it exists exactly when the commit
# happened (a ledger entry and its output could disagree after a kill between the two writes, and a shared
# ledger file needs locking between parallel jobs, which shared cluster filesystems do poorly). It names
# the output's path relative to the working directory the stage ran in (Snakemake's `-d`), so a project
# moved as a whole keeps its records valid while a folder copied or moved elsewhere (say a released
# `sds/model` copied next to a user's own checkpoints) no longer matches its record and is never deleted.


OUTPUT_RECORD = ".sds-output"


def record_file(output: Path, *, is_dir: bool) -> Path:
    return output / OUTPUT_RECORD if is_dir else output.with_name(output.name + OUTPUT_RECORD)


def record_text(final: Path) -> str:
    return json.dumps({"output": os.path.relpath(os.path.abspath(final))}) + "\n"


def is_recorded(output: Path) -> bool:
    """True if `output` (a resolved path) holds a record naming this very place."""
    try:
        named = json.loads(record_file(output, is_dir=output.is_dir()).read_text())["output"]
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
        if is_recorded(candidate):
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
        for f in (output, sidecar(output), tensor_sidecar(output), record_file(output, is_dir=False)):
            f.unlink(missing_ok=True)
    return output


def foreign_folders(folders) -> list[str]:
    """Those of `folders` (output locations) that exist and are not this pipeline's output there: a file, a
    link, or a non-empty folder without a record naming it. An empty folder is fine (replaced)."""
    found = []
    for folder in folders:
        path = Path(folder)
        if path.is_symlink() or (path.exists() and not path.is_dir()):
            found.append(str(folder))
        elif path.is_dir() and any(path.iterdir()) and not is_recorded(path.resolve()):
            found.append(str(folder))
    return found
