#!/usr/bin/env bash
# Runs a command inside pyseg's pinned virtual environment, creating it and building pyseg._C first.
#
#   scripts/with-env.sh python -m pytest
#
# The environment lives outside the checkout, keyed by requirements.txt, requirements-peer.txt (Ultralytics, for the
# tests and benchmarks only) and the Python version, and
# is reused across runs: $PYSEG_VENV, default ~/.cache/pyseg/venv-<key>. The extension is (re)built
# with `pip install --no-build-isolation -e .` each time (ccache makes unchanged sources cheap).
# Build flags pass through: FORCE_CUDA=1, FORCE_CPU=1, TORCH_CUDA_ARCH_LIST, MAX_JOBS.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
cache="${PYSEG_CACHE_DIR:-$HOME/.cache/pyseg}"
key="$({ cat "$root/requirements.txt" "$root/requirements-peer.txt"; "$python" -c 'import sys; print(sys.version_info[:2])'; } | sha256sum | cut -c1-16)"
venv="${PYSEG_VENV:-$cache/venv-$key}"

if [ ! -f "$venv/.pyseg-complete" ]; then
  echo "pyseg: creating the environment $venv (torch with CUDA 13.0 is large: a few minutes)" >&2
  rm -rf "$venv"
  "$python" -m venv "$venv"
  # (pip's notes about package-index folders of this machine that do not exist are dropped)
  "$venv/bin/pip" install --quiet --upgrade pip setuptools wheel 2> >(grep -v "is ignored: it is neither" >&2)
  "$venv/bin/pip" install --quiet -r "$root/requirements.txt" 2> >(grep -v "is ignored: it is neither" >&2)
  # the test-only peer (requirements-peer.txt): Ultralytics without the dependencies it declares, then the ones it
  # needs (see that file)
  peer="$(mktemp)"
  grep -E '^ultralytics==' "$root/requirements-peer.txt" >"$peer"
  "$venv/bin/pip" install --quiet --no-deps -r "$peer" 2> >(grep -v "is ignored: it is neither" >&2)
  grep -vE '^ultralytics==' "$root/requirements-peer.txt" >"$peer"
  "$venv/bin/pip" install --quiet -r "$peer" 2> >(grep -v "is ignored: it is neither" >&2)
  rm -f "$peer"
  touch "$venv/.pyseg-complete"
fi
export PATH="$venv/bin:$PATH"
export VIRTUAL_ENV="$venv"
export CCACHE_DIR="${CCACHE_DIR:-$cache/ccache}"
# pip builds in a fresh temporary folder each time: let ccache ignore it.
export CCACHE_BASEDIR="$root" CCACHE_NOHASHDIR=1
export CCACHE_SLOPPINESS="${CCACHE_SLOPPINESS:-include_file_mtime,include_file_ctime,time_macros}"
export MAX_JOBS="${MAX_JOBS:-2}"
if [ -z "${CUDA_HOME:-}" ]; then
  for candidate in /usr/local/cuda /usr/local/cuda-13.0; do
    if [ -x "$candidate/bin/nvcc" ]; then export CUDA_HOME="$candidate"; break; fi
  done
fi

echo "pyseg: building pyseg._C into $venv" >&2
log="$(mktemp)"
if ! (cd "$root" && pip install -v --no-build-isolation --no-deps -e . >"$log" 2>&1); then
  cat "$log" >&2
  echo "pyseg: building pyseg._C failed (log above); fix the error or set FORCE_CPU=1 to skip CUDA" >&2
  exit 1
fi
grep "pyseg setup:" "$log" | sort -u >&2 || true
rm -f "$log"
cd "$root"
exec "$@"
