#!/usr/bin/env bash
# Sets up (once) and runs the pipeline: `bash scripts/run.sh` = `snakemake --cores 2` on the default
# config. Extra arguments go to snakemake, e.g. `bash scripts/run.sh --configfile config/wikitext2.yaml`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
[ $# -gt 0 ] || set -- --cores 2
case " $* " in *" --cores "*|*" -c"*|*" --jobs "*|*" -j"*) ;; *) set -- --cores 2 "$@" ;; esac
exec .venv/bin/snakemake "$@"
