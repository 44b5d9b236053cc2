#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite. Exit non-zero if any test fails or none ran.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
PY=${PYTHON:-python3}
# two workers (RWKVC_TEST_WORKERS to change; 0 = one process), each taking whole files, so a file's
# module fixtures (compiled artifacts, trained models) are built once
$PY -m pytest -q -ra --durations=15 -n "${RWKVC_TEST_WORKERS:-2}" --dist loadfile tests "$@"
rc=$?
if [ $rc -eq 5 ]; then echo "no tests ran: treating as failure" >&2; exit 1; fi
exit $rc
