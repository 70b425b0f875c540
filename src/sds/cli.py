"""Command line: `python -m sds.cli STAGE --config RESOLVED.json key=value ...`.

Each Snakemake rule runs exactly one stage through this entry point, so a stage is an ordinary process
(killable, loggable, schedulable on SLURM). Expected failures print one line naming the file or key and
exit 1; a traceback means a bug.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from importlib import import_module

from .stages import MODULES

LIST_KEYS = {"evals", "benchmarks", "checkpoints", "parts"}
STAGES = tuple(MODULES)


def _parse_pairs(pairs: list[str]) -> dict:
    kwargs: dict = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"sds: expected key=value, got {pair!r}")
        if key in LIST_KEYS:
            kwargs.setdefault(key, []).append(value)
        else:
            kwargs[key] = value or None
    return kwargs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sds.cli", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=STAGES + ("sync", "validate"))
    parser.add_argument("--config", help="resolved config JSON (written by the Snakefile) or a YAML config")
    parser.add_argument("--run", help="run name (for sync)")
    parser.add_argument("pairs", nargs="*", help="stage arguments as key=value")
    args = parser.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s sds %(levelname)s %(message)s")
    warnings.filterwarnings("ignore", category=FutureWarning)

    from .core.config import load_config_file, validate_config
    from .core.errors import EXPECTED, ConfigError, CorruptFileError
    from .core.stage_keys import stage_config

    config = None
    try:
        if args.stage == "sync":
            from .tracking.stage_runs import sync_pending

            done, left = sync_pending(args.run)
            print(f"sds sync: {done} record(s) logged, {left} still pending")
            return 0 if left == 0 else 1
        if not args.config:
            raise ConfigError("--config is required")
        if args.config.endswith(".json"):
            with open(args.config) as fh:
                config = validate_config(json.load(fh))
        else:
            config = load_config_file(args.config)
        if args.stage == "validate":
            print(json.dumps(config, indent=2, sort_keys=True))
            return 0
        kwargs = _parse_pairs(args.pairs)
        stage_module = import_module(f"{__package__}.stages.{MODULES[args.stage]}")
        # the stage sees only the config keys it is listed with (core.stage_keys), so none goes stale
        sliced = stage_config(config, args.stage, method=kwargs.get("method"), recon=kwargs.get("recon"))
        from .core.runtime import allocate_tensors_by_mmap, peak_rss_mib

        allocate_tensors_by_mmap()  # every stage, also those that never call setup (export, report)
        getattr(stage_module, args.stage)(sliced, **kwargs)
        # the process's true high-water mark: Snakemake's benchmark samples RSS and misses short peaks
        logging.getLogger("sds").info("%s done · peak RSS %.0f MiB", args.stage, peak_rss_mib())
        return 0
    except CorruptFileError as exc:
        return _fail(args.stage, _corrupt_file_message(exc, config))
    except EXPECTED as exc:
        return _fail(args.stage, str(exc))
    except OSError as exc:
        message = _write_error_message(exc)
        if message is None:
            raise
        return _fail(args.stage, message)


def _fail(stage: str, message: str) -> int:
    """Prints the error as one line (messages quoted from libraries may span several) and returns 1."""
    print(f"sds {stage}: error: {' '.join(message.split())}", file=sys.stderr)
    return 1


def _corrupt_file_message(exc, config: dict) -> str:
    """The error, and what was done about it: the output of this run holding the file is deleted (so the
    next `snakemake` run re-creates it) only if the run's own record says it wrote it
    (sds.storage.records.recorded_output); a user's file, a copy or another run's output is left alone."""
    from .core.errors import HOW_TO_RECREATE
    from .core.layout import run_dir
    from .storage.records import discard_stage_output

    reason = str(exc).removesuffix(f"; {HOW_TO_RECREATE}")
    removed = discard_stage_output(exc.path, run_dir(config["run"])) if exc.path and config else None
    if removed is not None:
        # Snakemake re-creates a missing file only for a job it runs: this stage's (whose output is absent), so
        # the same command again does it; a plain `snakemake` would not when everything after this stage exists
        # (a failed --forcerun).
        return (f"{reason}. Removed {os.path.relpath(removed)} (an output this run wrote): run the same snakemake "
                "command again (same targets and --forcerun), which re-creates it before re-running this stage.")
    return (f"{reason}. Nothing was deleted: no output this run recorded as its own holds "
            f"{'it' if exc.path is None else exc.path}; restore or replace it.")


def _write_error_message(exc: OSError) -> str | None:
    """One line for a failed write (disk full, file-size limit, read-only or foreign folder) or another
    refused file operation, or None for other errors. A failed output write (sds.core.errors.OutputWriteError)
    names the output file, and its temporary has been removed."""
    import errno

    from .core.errors import OutputWriteError
    from .storage.atomic import WRITE_ERRNOS

    if isinstance(exc, OutputWriteError):
        remedy = ("make room and re-run" if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
                  else "make it writable and re-run")
        return f"cannot write {exc.filename}: {exc.strerror} (nothing half-written is left: {remedy})"
    if exc.filename and (exc.errno in WRITE_ERRNOS or exc.errno == errno.EEXIST):
        return f"{exc.filename}: {exc.strerror}"
    return None


if __name__ == "__main__":
    sys.exit(main())
