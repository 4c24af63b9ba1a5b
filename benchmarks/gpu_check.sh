#!/usr/bin/env bash
# GPU checks in stages, several to a device call (each call well under its 10 minutes); see benchmarks/gpu_check.py.
#
#   bash benchmarks/gpu_check.sh prepare       # here, with internet: .device/ (COCO128-Seg, wheels) to carry
#   bash benchmarks/gpu_check.sh build-test bench sanitize --budget 420   # on the GPU machine, timeout_s 450
#   bash benchmarks/gpu_check.sh train --budget 210                       # at once after it, timeout_s 240
#
# Writes $OUT/<stage>.json and $OUT/<stage>.log ($OUT, else benchmarks/out); exit 1 when a stage failed, 2 for bad
# arguments, 130 when interrupted. Uses $PYTHON, else python3 (on the device machine: the one that holds torch).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec "${PYTHON:-python3}" benchmarks/gpu_check.py "$@"
