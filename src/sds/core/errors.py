"""Every error of an expected failure (bad input, missing or damaged data, an unusable model), in one place: any
layer raises them, and the CLI turns each into one line naming the file or key (`EXPECTED`)."""
from __future__ import annotations

from pathlib import Path

HOW_TO_RECREATE = "delete it and re-run snakemake, which re-creates it"


class DataError(ValueError):
    """A text source that cannot be read or is too short; the message names it."""


class TaskDataError(DataError):
    """A zero-shot task whose data file is missing or unusable; the message names the task and the file."""


class ConfigError(ValueError):
    """An invalid configuration; the message names the key and what was expected. `errors`: every error found
    at once (one line each; the message joins them)."""

    def __init__(self, message: str, errors: list[str] | None = None):
        super().__init__(message)
        self.errors = list(errors) if errors else [message]

    def report(self) -> str:
        """The errors as printed: the one error, or their count and then one indented line each."""
        lines = [" ".join(e.split()) for e in self.errors]
        return lines[0] if len(lines) == 1 else f"{len(lines)} errors:" + "".join(f"\n  {e}" for e in lines)


class ArchitectureError(ValueError):
    """A model the pipeline cannot prune correctly; the message names the architecture and what is supported."""


class ModelError(ValueError):
    """A model that cannot be used, with a message naming the path or architecture."""


class NumericalError(FloatingPointError):
    """NaN/Inf found in activations or statistics; the message names the layer."""


class DeviceError(RuntimeError):
    """The configured device is not there (`device: cuda` on a machine without a usable GPU); the message
    names the config key."""


class CorruptFileError(RuntimeError):
    """A stage input that is missing, truncated or altered; the message says how to re-create it."""

    def __init__(self, message: str, path: str | Path | None = None):
        super().__init__(message)
        self.path = Path(path) if path is not None else (Path(message.split(":", 1)[0]) if ":" in message else None)


class OutputWriteError(OSError):
    """Writing a stage's output failed (disk full, file-size limit, read-only folder, …); `filename` is the
    output file or folder as the user will know it, and the temporary has been removed."""


# What the CLI reports in one line (CorruptFileError and write errors get their own messages there).
EXPECTED = (ConfigError, ModelError, DataError, DeviceError, NumericalError, FloatingPointError,
            FileNotFoundError)
