#!/usr/bin/env bash
# Every GPU check in one go, for a machine with a CUDA device (e.g. the device tool's H100):
# build from this working tree, run the CUDA tests (plain and under compute-sanitizer), then
# the op benchmark. Writes its logs under ${OUT:-benchmarks/out}.
#
#   bash benchmarks/gpu_check.sh
#
# Uses the python on PATH (its torch must be a CUDA build); never reuses a .so built elsewhere.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out="${OUT:-benchmarks/out}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/device.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$out/device.txt"

rm -f pyseg/_C*.so
export FORCE_CUDA=1 MAX_JOBS="${MAX_JOBS:-16}"
if ! pip install --no-build-isolation --no-deps -e . >"$out/build.log" 2>&1; then
  tail -50 "$out/build.log"
  echo "gpu_check: build failed" >&2
  exit 1
fi
python -c "import pyseg.ops as o; print(o.build_info())" | tee -a "$out/device.txt"

status=0
python -m pytest -q -m needs_cuda tests 2>&1 | tee "$out/tests_cuda.log" || status=1
compute-sanitizer --tool memcheck --error-exitcode 1 python -m pytest -q -m needs_cuda -x \
  tests/test_ops_rasterize.py tests/test_ops_assemble.py tests/test_ops_mask_loss.py -k "not coco128" \
  >"$out/sanitizer.log" 2>&1 || status=1
tail -5 "$out/sanitizer.log"
python benchmarks/bench_ops.py 2>&1 | tee "$out/bench_ops.txt" || status=1
exit "$status"
