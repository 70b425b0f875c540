"""Command line: `python -m sds.cli STAGE --config RESOLVED.json key=value ...`.

Each Snakemake rule runs exactly one stage through this entry point, so a stage is an ordinary process
(killable, loggable, schedulable on SLURM). Expected failures print one line naming the file or key and
exit 1; a traceback means a bug.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings

LIST_KEYS = {"evals", "benchmarks", "checkpoints", "parts"}
STAGES = ("corpus", "build_model", "calibration", "layer_inputs", "activations", "prune1", "prune1_adjust", "reconstruct",
          "reconstruct_one_layer", "reconstruct_gather", "prune2", "zeroshot_tasks", "evaluate", "report",
          "export")


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

    from .config import ConfigError, load_config_file, validate_config
    from .data import DataError
    from .io import CorruptFileError
    from .layerwise import NumericalError
    from .model import ModelError

    try:
        if args.stage == "sync":
            from .tracking import sync_pending

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
        from . import stages

        getattr(stages, args.stage)(config, **_parse_pairs(args.pairs))
        return 0
    except CorruptFileError as exc:
        from .io import discard_stage_output

        removed = discard_stage_output(exc.path) if exc.path else None
        note = f" Removed {removed} so that the next `snakemake` run re-creates it." if removed else ""
        print(f"sds {args.stage}: error: {exc}.{note}", file=sys.stderr)
        return 1
    except (ConfigError, ModelError, DataError, NumericalError, FloatingPointError, FileNotFoundError) as exc:
        print(f"sds {args.stage}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
