#!/usr/bin/env bash
# Install what the TVM targets (`rpi5`, `tvm-host`) need on a fresh Debian/Ubuntu machine. Idempotent.
#
#   apt:  g++-aarch64-linux-gnu (cross compiler + aarch64 glibc), qemu-user (qemu-aarch64, to run the
#         Pi artifact's native runner on an x86 host for tests)
#   pip:  apache-tvm (TVM 0.27 with LLVM: x86 + aarch64 codegen), without touching torch
#   aarch64 wheels of apache-tvm and apache-tvm-ffi (libtvm_runtime.so, libtvm_ffi.so, C++ headers),
#         unpacked into $RWKVC_AARCH64_DIR (default ~/.cache/rwkvc/aarch64)
#
# Usage: bash scripts/setup_tvm.sh [--no-apt] [--no-pip]
set -euo pipefail

PY=${PYTHON:-python3}
CACHE=${RWKVC_AARCH64_DIR:-$HOME/.cache/rwkvc/aarch64}
DO_APT=1
DO_PIP=1
for a in "$@"; do
  case "$a" in
    --no-apt) DO_APT=0 ;;
    --no-pip) DO_PIP=0 ;;
    *) echo "setup_tvm.sh: unknown option $a (use --no-apt, --no-pip)" >&2; exit 2 ;;
  esac
done

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO=sudo; fi

if [ "$DO_APT" = 1 ]; then
  need=()
  command -v aarch64-linux-gnu-g++ >/dev/null || need+=(g++-aarch64-linux-gnu)
  command -v qemu-aarch64 >/dev/null || need+=(qemu-user)
  if [ ${#need[@]} -gt 0 ]; then
    echo "setup_tvm.sh: apt-get install ${need[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}"
  fi
fi

if [ "$DO_PIP" = 1 ]; then
  if ! "$PY" -c "import tvm, tvm.relax" >/dev/null 2>&1; then
    echo "setup_tvm.sh: pip install apache-tvm"
    # torch is pinned by the project; keep pip from upgrading it (or numpy) as a side effect
    cons=$(mktemp)
    "$PY" - >"$cons" <<'PYEOF'
import importlib.metadata as md
for p in ("torch", "numpy", "ml_dtypes"):
    try:
        print(f"{p}=={md.version(p)}")
    except md.PackageNotFoundError:
        pass
PYEOF
    "$PY" -m pip install -q -c "$cons" apache-tvm
    rm -f "$cons"
  fi
  # the aarch64 runtime libraries and headers for the Pi artifact (same versions as the host TVM)
  mkdir -p "$CACHE"
  if ! ls "$CACHE"/lib/libtvm_runtime.so >/dev/null 2>&1 || ! ls "$CACHE"/lib/libtvm_ffi.so >/dev/null 2>&1; then
    tvm_ver=$("$PY" -c "import importlib.metadata as m; print(m.version('apache-tvm'))")
    ffi_ver=$("$PY" -c "import importlib.metadata as m; print(m.version('apache-tvm-ffi'))")
    echo "setup_tvm.sh: fetching aarch64 wheels apache-tvm==$tvm_ver apache-tvm-ffi==$ffi_ver into $CACHE"
    rm -rf "$CACHE/wheels" "$CACHE/unpacked"
    "$PY" -m pip download -q --no-deps --only-binary=:all: \
      --platform manylinux_2_28_aarch64 --platform manylinux_2_17_aarch64 --python-version 3.11 \
      "apache-tvm==$tvm_ver" "apache-tvm-ffi==$ffi_ver" -d "$CACHE/wheels"
    "$PY" - "$CACHE" <<'PYEOF'
import glob, os, shutil, sys, zipfile
cache = sys.argv[1]
lib, inc = os.path.join(cache, "lib"), os.path.join(cache, "include")
os.makedirs(lib, exist_ok=True)
os.makedirs(inc, exist_ok=True)
for whl in glob.glob(os.path.join(cache, "wheels", "*.whl")):
    with zipfile.ZipFile(whl) as z:
        for n in z.namelist():
            base = os.path.basename(n)
            if base in ("libtvm_runtime.so", "libtvm_ffi.so"):
                with z.open(n) as src, open(os.path.join(lib, base), "wb") as dst:
                    shutil.copyfileobj(src, dst)
            # C++ headers: tvm_ffi/include/tvm/ffi/..., tvm/include/tvm/runtime/..., dlpack/dlpack.h
            for marker in ("/include/tvm/", "/include/dlpack/", "/3rdparty/dlpack/include/dlpack/"):
                i = n.find(marker)
                if i >= 0 and not n.endswith("/"):
                    rel = n[i + len(marker.rsplit("/", 2)[0]) + 1:] if marker.startswith("/3rdparty") else n[i + len("/include/"):]
                    dst = os.path.join(inc, rel)
                    os.makedirs(os.path.dirname(dst), exist_ok=True)
                    with z.open(n) as src, open(dst, "wb") as out:
                        shutil.copyfileobj(src, out)
                    break
missing = [f for f in ("libtvm_runtime.so", "libtvm_ffi.so") if not os.path.exists(os.path.join(lib, f))]
if missing:
    sys.exit(f"setup_tvm.sh: the aarch64 wheels hold no {missing[0]}")
print("setup_tvm.sh: aarch64 runtime in", lib)
PYEOF
  fi
fi
echo "setup_tvm.sh: done (aarch64 runtime: $CACHE)"
