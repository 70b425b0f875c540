#!/usr/bin/env bash
# Sets up (once) and runs the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
set +e
# Two workers (SDS_TEST_WORKERS; 0 runs in this process): each test module runs whole on one worker, and the
# modules sharing the session's micro workflow run on the same one (tests/conftest.py), so every module- or
# session-scoped run is built once.
.venv/bin/python -m pytest -q -rs -n "${SDS_TEST_WORKERS:-2}" --dist loadgroup "$@" tests
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests" >&2
  exit 1
fi
exit "$rc"
