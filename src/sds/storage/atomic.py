"""Atomic publishing: every write goes to a temporary name in the same folder and is renamed into place, so a
file or folder is complete or absent. A write that fails (disk full, file-size limit, read-only folder)
removes its temporary and raises an OutputWriteError naming the output file, not the temporary."""
from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from ..core.errors import OutputWriteError
from .digests import file_digest, sidecar
from .records import OUTPUT_RECORD, is_recorded, record_file, record_text

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


class TempFile:
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
        """Write errors inside the block name `path`, not the temporary."""
        return _naming(self.path)

    def commit(self, *, checksum: bool = False, record: bool = False, digest: str | None = None,
               sidecars: dict[Path, str] | None = None) -> None:
        """`checksum`: writes the checksum sidecar first, of `digest` (taken by a writer as it wrote the
        bytes) or else of the file read back; `sidecars`: more files (path → text) written before the rename."""
        with self.naming():
            if checksum:  # sidecars first: a kill between them and the rename leaves no unverifiable file
                with atomic_path(sidecar(self.path)) as side:
                    side.write_text((digest or file_digest(self.tmp)) + "\n")
            for path, text in (sidecars or {}).items():
                with atomic_path(path) as side:
                    side.write_text(text)
            _publish_mode(self.tmp, is_dir=False)
            os.replace(self.tmp, self.path)
            if record:  # after the rename: a kill in between leaves an output without a record (never deleted)
                with atomic_path(record_file(self.path, is_dir=False)) as rec:
                    rec.write_text(record_text(self.path))

    def discard(self) -> None:
        self.tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | Path, *, checksum: bool = False, record: bool = False) -> Iterator[Path]:
    """Yields a temporary path beside `path`; renames it onto `path` only if the block succeeds.
    `checksum`: also write its XXH3 sidecar; `record`: also its ownership record (a stage's own output)."""
    temp = TempFile(path)
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
            (tmp / OUTPUT_RECORD).write_text(record_text(path))
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
                                                                      or is_recorded(path.resolve())))):
        raise FileExistsError(errno.EEXIST, "exists and is not an output this pipeline wrote there (no "
                              f"{OUTPUT_RECORD} record naming it), so it is not replaced", str(path))


@contextlib.contextmanager
def exclusive(lock_file: str | Path) -> Iterator[None]:
    """Holds an exclusive lock (flock on `lock_file`) for the block: read-modify-write files shared by runs
    (results/summary.csv, the MLflow store) are changed by one process at a time."""
    import fcntl

    lock_file = Path(lock_file)
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class StreamedOutput:
    """The lifecycle every streaming writer shares: written piece by piece into a TempFile, `close` commits it
    (complete, with its checksum sidecar), `abort` removes it; leaving a `with` block closes it, or aborts
    it on an exception, so a file is complete or absent."""

    def close(self) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False


@contextlib.contextmanager
def scratch_dir(path: str | Path) -> Iterator[Path]:
    """A working folder beside the output `path` (on its disk, named as its temporaries are, so a killed
    run's is removed by the next), deleted when the block ends."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    work = Path(tempfile.mkdtemp(prefix=f".{path.name}.scratch.", suffix=".tmp", dir=path.parent))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)
