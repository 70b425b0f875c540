#!/usr/bin/env bash
# Creates .venv (Python 3.11) with the pinned stack, torch first. Idempotent: skips when up to date.
#
# Which build of torch 2.13.0 (SDS_TORCH):
#   unset            pip's own sources: plain PyPI gives the CUDA build on Linux x86_64 (torch plus its nvidia-*
#                    wheels, several GB) and the CPU build on macOS; a pip config's index or find-links is
#                    searched as well (where a local torch wheel lies, e.g. a CPU one, that one is taken).
#   cpu, cu126, …    torch==2.13.0+<SDS_TORCH> from https://download.pytorch.org/whl/<SDS_TORCH>: cpu is the
#                    CPU-only build (no CUDA libraries), cuNNN the build for that CUDA version (Linux, Windows).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${SDS_VENV:-.venv}
TORCH_BUILD=${SDS_TORCH:-}
torch_spec=(torch==2.13.0)
case "$TORCH_BUILD" in
  "") ;;
  cpu|cu[0-9]*|rocm[0-9]*)
    torch_spec=("torch==2.13.0+$TORCH_BUILD" --index-url "https://download.pytorch.org/whl/$TORCH_BUILD") ;;
  *)
    echo "sds setup: SDS_TORCH=$TORCH_BUILD is not a PyTorch wheel index (cpu, cu126, cu128, rocm6.4, ...)" >&2
    exit 1 ;;
esac
stamp="$VENV/.sds-installed"
# what is installed: the pins, and the torch build when one is asked for (unset: the same stamp as before)
want="$( { cat requirements.txt pyproject.toml; [ -z "$TORCH_BUILD" ] || echo "torch build $TORCH_BUILD"; } \
  | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "sds setup: creating $VENV (first time: about 3 minutes)" >&2
echo "sds setup: pip install ${torch_spec[*]}" >&2
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "${torch_spec[@]}" 2> >(grep -v "is ignored: it is neither" >&2)
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -r requirements.txt 2> >(grep -v "is ignored: it is neither" >&2)
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps -e . 2> >(grep -v "is ignored: it is neither" >&2)
"$VENV/bin/python" -c "import torch; print(f'sds setup: torch {torch.__version__} (CUDA {torch.version.cuda or \"none: CPU only\"})')" >&2
echo "$want" > "$stamp"
echo "sds setup: done" >&2
