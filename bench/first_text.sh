#!/usr/bin/env bash
# A newcomer's time from a clone to the first generated text: clone, `bash scripts/setup.sh` into a new
# virtual environment (no system site packages, pip's cache off, so every Python package is downloaded and
# installed), then `rwkvc demo`, with rwkvc's caches (fused kernels, aarch64 TVM runtime, demo) new and empty.
# Prints the seconds of each phase.
#
#   bash bench/first_text.sh [REPO (default: this checkout)] [WORK (default: a new temporary directory)]
#
# apt packages that setup.sh needs and finds installed are not reinstalled: on a machine without them add
# the apt time (setup.sh prints what it installs).
set -euo pipefail
REPO=${1:-$(cd "$(dirname "$0")/.." && pwd)}
WORK=${2:-$(mktemp -d /tmp/rwkvc-first-text.XXXXXX)}
mkdir -p "$WORK"
export RWKV_CACHE="$WORK/cache" RWKVC_AARCH64_DIR="$WORK/aarch64"
stamp() { date +%s.%N; }
t0=$(stamp)
git clone -q "$REPO" "$WORK/rwkvc"
t1=$(stamp)
python3 -m venv "$WORK/venv"
(cd "$WORK/rwkvc" && PATH="$WORK/venv/bin:$PATH" PIP_NO_CACHE_DIR=1 PYTHON="$WORK/venv/bin/python" \
  bash scripts/setup.sh) > "$WORK/setup.log" 2>&1
t2=$(stamp)
(cd "$WORK" && PATH="$WORK/venv/bin:$PATH" \
  rwkvc demo --cache-dir "$WORK/demo-cache" -n 40) > "$WORK/demo.out" 2> "$WORK/demo.err"
t3=$(stamp)
python3 - "$t0" "$t1" "$t2" "$t3" <<'EOF'
import sys
t0, t1, t2, t3 = map(float, sys.argv[1:])
print(f"clone {t1 - t0:.1f} s, setup {t2 - t1:.1f} s, demo {t3 - t2:.1f} s, clone to first text {t3 - t0:.1f} s")
EOF
echo "logs and the demo's text: $WORK"
