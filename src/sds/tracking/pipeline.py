"""The end of a pipeline invocation, for the Snakefile's onsuccess/onerror hooks (they run in the main
Snakemake process, also with `--executor slurm`, once every job is over):

    python -m sds.tracking.pipeline finished --config results/<run>/config/<hash>.json
    python -m sds.tracking.pipeline failed --config results/<run>/config/<hash>.json

sets the config's MLflow pipeline run FINISHED (ending with its last stage) or FAILED. A store that cannot
be reached keeps the record for `python -m sds.cli sync`; this never fails the workflow (exit status 0).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

from ..core.config import validate_config
from .stage_runs import close_pipeline


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sds.tracking.pipeline", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("status", choices=["finished", "failed"])
    ap.add_argument("--config", required=True, help="the run's resolved config JSON (written by the Snakefile)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s sds %(levelname)s %(message)s")
    try:
        with open(args.config) as fh:
            config = validate_config(json.load(fh))
        status = close_pipeline(config, args.status.upper())
    except Exception as exc:  # the workflow's own result stands whatever happens to its tracking
        logging.getLogger("sds.tracking").warning("the MLflow pipeline run was not closed: %s", str(exc)[:300])
        return 0
    if status:
        logging.getLogger("sds.tracking").info("MLflow pipeline run %s", status)
    return 0


if __name__ == "__main__":
    sys.exit(main())
