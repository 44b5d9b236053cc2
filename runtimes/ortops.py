"""rwkvc's fused ONNX Runtime kernels (custom-op domain `ai.rwkvc`): build once, register per session.

The library is compiled from rwkvc's own source (`native/ort_ops.cc`) with the host's C++ compiler, the
first time a session needs it, into the cache (`$RWKV_CACHE/ortops/<key>/`, keyed by the source, the
compiler flags and this CPU's instruction-set flags, since it is built with -march=native). An artifact
only names the domain it uses; rwkvc never loads code from an artifact.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

from rwkvc.emit_onnx import FUSED_DOMAIN as DOMAIN
from rwkvc.emit_onnx import FUSED_VERSION as VERSION
from rwkvc.errors import RwkvcError

SOURCES = ("ort_ops.cc", "ort_abi.h")
FLAGS = ["-std=c++17", "-O3", "-march=native", "-fopenmp-simd", "-fno-trapping-math", "-fno-math-errno", "-fPIC", "-shared", "-fvisibility=hidden", "-pthread"]


def _source_dir() -> Path:
    import rwkvc.native
    return Path(rwkvc.native.__file__).parent


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _cache_root() -> Path:
    return Path(os.environ.get("RWKV_CACHE") or Path.home() / ".cache" / "rwkvc")


def compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


@lru_cache(maxsize=None)
def library() -> str:
    """Path of the built library (building it on first use). RwkvcError if it cannot be built."""
    src = _source_dir()
    h = hashlib.sha256()
    for name in SOURCES:
        h.update((src / name).read_bytes())
    h.update(" ".join(FLAGS).encode())
    h.update(_cpu_flags().encode())
    out_dir = _cache_root() / "ortops" / h.hexdigest()[:16]
    lib = out_dir / "librwkvc_ort_ops.so"
    if not lib.exists():
        cxx = compiler()
        if cxx is None:
            raise RwkvcError("this artifact uses rwkvc's fused CPU kernels, which are built once with a C++ "
                             "compiler, and none was found: apt-get install g++ (or set CXX), or recompile with "
                             "--no-fused")
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".so.tmp")
        except OSError as e:
            raise RwkvcError(f"cannot write rwkvc's fused kernels into {out_dir} ({e.strerror}); set RWKV_CACHE "
                             "to a writable directory") from None
        os.close(fd)
        try:
            r = subprocess.run([cxx, *FLAGS, str(src / "ort_ops.cc"), "-o", tmp], capture_output=True, text=True)
            if r.returncode != 0:
                lines = r.stderr.strip().splitlines() or ["(no output)"]
                last = next((ln for ln in lines if "error" in ln), lines[-1])
                raise RwkvcError(f"building rwkvc's fused CPU kernels with {cxx} failed ({last[:200]}); "
                                 "recompile the artifact with --no-fused")
            os.replace(tmp, lib)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return str(lib)


def require(spec: dict) -> None:
    """Check an artifact's manifest["custom_ops"] against the kernels this rwkvc builds."""
    v = spec.get("version")
    if spec.get("domain") != DOMAIN or not isinstance(v, int) or not 1 <= v <= VERSION:
        raise RwkvcError(f"this artifact uses fused kernels {spec.get('domain')} v{v}; this rwkvc provides "
                         f"{DOMAIN} v1 to v{VERSION}: recompile the artifact with this rwkvc")
    lib = library()
    if ctypes.CDLL(lib).rwkvc_ort_ops_version() != VERSION:
        raise RwkvcError(f"{lib}: not version {VERSION} of rwkvc's fused kernels; delete it so it is rebuilt")


def register(so, threads: int | None = None) -> None:
    """Register the library into an onnxruntime.SessionOptions; `threads` for the kernels that split their
    work (the prefill's WKV; one setting per process, the last session's)."""
    so.register_custom_ops_library(library())
    ctypes.CDLL(library()).rwkvc_ort_ops_set_threads(int(threads or os.cpu_count() or 1))
