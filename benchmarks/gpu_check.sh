#!/usr/bin/env bash
# GPU checks in stages, one per device call (each well under its 10 minutes); see benchmarks/gpu_check.py.
#
#   bash benchmarks/gpu_check.sh prepare       # here, with internet: .device/ (COCO128-Seg, wheels) to carry
#   bash benchmarks/gpu_check.sh build-test    # on the GPU machine; also: sanitize, bench, train (or several)
#
# Writes $OUT/<stage>.json and $OUT/<stage>.log ($OUT, else benchmarks/out); exit 1 when a stage failed.
# Uses $PYTHON, else python3 (on the device machine: the one that holds torch).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec "${PYTHON:-python3}" benchmarks/gpu_check.py "$@"
