#!/usr/bin/env bash
# Runs pyseg's test suite; "no tests ran" (pytest exit 5) is a failure, not a pass.
set -uo pipefail
python -m pytest "$@"
status=$?
if [ "$status" -eq 5 ]; then
  echo "run-tests: pytest collected no tests: treating as a failure" >&2
  exit 1
fi
exit "$status"
