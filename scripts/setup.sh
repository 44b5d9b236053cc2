#!/usr/bin/env bash
# Install everything rwkvc needs on a fresh Debian machine with Python 3.11 (idempotent).
#   system: g++ (DeepSpeed's CPU op), the aarch64 cross compiler + qemu (rpi5 target), bible-kjv (demo corpus)
#   python: torch (CPU), rwkvc with its extras: test (the official `rwkv` package is the test reference;
#           the `openai` client), train, tvm, serve (FastAPI, uvicorn, lm-eval), distill (transformers), plot
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

APT_PKGS="g++ g++-aarch64-linux-gnu qemu-user bible-kjv"
missing=""
for p in $APT_PKGS; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  echo "setup: apt-get install$missing" >&2
  $SUDO apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >&2
fi

# --no-compile: no byte-compiling of the ~21,000 installed modules now (Python does it for those it imports)
PIP="$PY -m pip install -q --no-compile"
# torch first and pinned: an unpinned torch pulls several GB of CUDA packages
$PY -c "import torch" 2>/dev/null || $PIP "torch==2.13.0" >&2
# the package itself, then its fused CPU kernels built (g++, ~20 s) while pip installs the dependencies
$PIP --no-deps -e . >&2
$PY -c "from rwkvc.runtimes import ortops; ortops.build()" >&2 &
kernels=$!
$PIP -e ".[test,train,tvm,serve,distill,plot]" >&2
wait "$kernels" || { echo "setup: building rwkvc's fused kernels failed (see above)" >&2; exit 1; }
bash scripts/setup_tvm.sh >&2   # aarch64 TVM runtime wheels, cross compiler, qemu (rpi5 target)
echo "setup: done" >&2
