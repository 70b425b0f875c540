"""The `sds` command (also `python -m sds` and `python -m sds.cli`):

    sds validate CONFIG [--print]        every error of a config at once, each naming its key: the schema, the
                                         semantic checks, the model and each hf: dataset looked up in the local
                                         caches (offline); exit 1 if any. --print: the resolved config as JSON
    sds export CONFIG [SNAKEMAKE ARGS]   runs `snakemake --configfile CONFIG --cores 2 export` with this
                                         checkout's Snakefile in the current folder: every stage the export
                                         target needs, then the one-shot checkpoints as loadable Hugging Face
                                         folders (ARGS go to snakemake, e.g. -n, --cores 8)
    sds sync [--run RUN] [--config CONFIG]   logs the MLflow records kept while the store was unreachable (of
                                         RUN, CONFIG's run, or every run under the results root)
    sds STAGE --config RESOLVED.json key=value ...   one stage: what each Snakemake rule runs (`--config`
                                         right after the stage: `sds export --config …` is the export stage)

Each rule runs exactly one stage through this entry point, so a stage is an ordinary process (killable,
loggable, schedulable on SLURM). Expected failures print one line naming the file or key and exit 1; a
traceback means a bug. The results root is config `results_dir`, else $SDS_RESULTS, else results/.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from importlib import import_module
from pathlib import Path

from .stages import MODULES

LIST_KEYS = {"evals", "benchmarks", "checkpoints", "parts"}
STAGES = tuple(MODULES)
SNAKEFILE = Path(__file__).resolve().parents[2] / "Snakefile"  # this checkout's workflow


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
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in COMMANDS and not _is_stage_call(argv):
        return COMMANDS[argv[0]](argv[1:])
    return _stage(argv)


def _is_stage_call(argv: list[str]) -> bool:
    """`export --config RESOLVED.json k=v …` is the export stage (as its rule runs it); `export CONFIG …`, with
    the config first, the `sds export` command."""
    return argv[0] in STAGES and len(argv) > 1 and argv[1].split("=")[0] == "--config"


def _parser(command: str, summary: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=f"sds {command}".strip(), description=summary,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def validate(argv: list[str]) -> int:
    """`sds validate CONFIG`: every error at once; 0 when there is none."""
    parser = _parser("validate", "Checks a config: every schema and semantic error at once, each naming its key; "
                                 "the model and each hf: dataset looked up in the local caches. Exit 1 if any.")
    parser.add_argument("config", nargs="?", help="a YAML config, as given to snakemake --configfile")
    parser.add_argument("--config", dest="config_option", help=argparse.SUPPRESS)  # the older `validate --config X`
    parser.add_argument("--print", action="store_true", help="print the resolved config (every default filled) as JSON")
    args = parser.parse_args(argv)
    path = args.config or args.config_option
    if not path:
        parser.error("a config file is required")
    from .core.config import load_config_file
    from .core.errors import ConfigError
    from .core.layout import RunLayout, results_root

    try:
        config = load_config_file(path, hf_sources=True)
    except ConfigError as exc:
        print(f"sds validate: {path}: {exc.report()}", file=sys.stderr)
        return 1
    if args.print:
        print(json.dumps(config, indent=2, sort_keys=True))
    where = RunLayout(config["run"], results_root(config)).root
    print(f"sds validate: {path}: valid (run {config['run']!r}, outputs under {where}/)",
          file=sys.stderr if args.print else sys.stdout)
    return 0


def export(argv: list[str]) -> int:
    """`sds export CONFIG [SNAKEMAKE ARGS]`: snakemake's `export` target for CONFIG; its exit status."""
    import shlex
    import subprocess

    parser = _parser("export", "Runs snakemake's export target for a config (every stage it needs, then the "
                               "one-shot checkpoints as loadable Hugging Face folders) in the current folder. "
                               "Other arguments go to snakemake; --cores 2 unless given.")
    parser.add_argument("config", help="a YAML config, as given to snakemake --configfile")
    args, extra = parser.parse_known_args(argv)
    if not SNAKEFILE.is_file():
        return _fail("export", f"no Snakefile at {SNAKEFILE}: `sds export` runs from a checkout of the pipeline")
    if not Path(args.config).is_file():
        return _fail("export", f"config file {args.config!r} not found")
    cores = [] if any(a.startswith(("--cores", "--jobs", "-c", "-j")) for a in extra) else ["--cores", "2"]
    command = [sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), f"--configfile={args.config}", *cores,
               "export", *extra]
    print(f"sds export: {shlex.join(command)}", file=sys.stderr, flush=True)
    return subprocess.call(command)


def sync(argv: list[str]) -> int:
    """`sds sync`: replays the MLflow records kept while the store was unreachable; 0 when none is left."""
    parser = _parser("sync", "Logs the MLflow records that stages kept (under <results root>/<run>/mlflow_pending/) "
                             "while the tracking store was unreachable.")
    parser.add_argument("--run", help="only this run (default: every run with kept records)")
    parser.add_argument("--config", help="a config: its run, and its results root")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s sds %(levelname)s %(message)s")
    from .core.config import load_config_file
    from .core.errors import EXPECTED
    from .core.layout import runs_with_pending, use_results_root

    try:
        config = load_config_file(args.config) if args.config else None
    except EXPECTED as exc:
        return _fail("sync", str(exc))
    root = use_results_root(config)  # before the store is imported: its default lies under the root
    runs = [args.run or config["run"]] if args.run or config else runs_with_pending(root)
    if not runs:
        print(f"sds sync: no kept MLflow records under {root}/")
        return 0
    from .tracking.stage_runs import sync_pending

    left = 0
    for run in runs:
        done, run_left = sync_pending(run)
        left += run_left
        print(f"sds sync: {run}: {done} record(s) logged, {run_left} still pending")
    return 0 if left == 0 else 1


COMMANDS = {"validate": validate, "export": export, "sync": sync}


def _stage(argv: list[str]) -> int:
    parser = _parser("", __doc__)
    parser.add_argument("stage", choices=STAGES, metavar="COMMAND",
                        help=f"validate, export, sync, or a stage: {', '.join(STAGES)}")
    parser.add_argument("--config", help="resolved config JSON (written by the Snakefile) or a YAML config")
    parser.add_argument("pairs", nargs="*", help="stage arguments as key=value")
    args = parser.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s sds %(levelname)s %(message)s")
    warnings.filterwarnings("ignore", category=FutureWarning)

    from .core.config import load_config_file, validate_config
    from .core.errors import EXPECTED, ConfigError, CorruptFileError
    from .core.layout import use_results_root
    from .core.stage_keys import stage_config

    config = None
    try:
        if not args.config:
            raise ConfigError("--config is required")
        if args.config.endswith(".json"):
            with open(args.config) as fh:
                config = validate_config(json.load(fh))
        else:
            config = load_config_file(args.config)
        use_results_root(config)  # before any module reads it (the MLflow store's default lies under it)
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
    from .core.layout import results_root, run_dir
    from .storage.records import discard_stage_output

    reason = str(exc).removesuffix(f"; {HOW_TO_RECREATE}")
    own = run_dir(config["run"], results_root(config)) if config else None
    removed = discard_stage_output(exc.path, own) if exc.path and config else None
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
