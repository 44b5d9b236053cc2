"""rwkvc's fused ONNX Runtime kernels (custom-op domain `ai.rwkvc`): build once, register per session.

The kernels' C++ lies beside this module: ort_ops.cc, the library's one translation unit (the op table and
the exported entry points), includes one header per kernel family (mix.h, wkv.h, sparse_ffn.h,
clustered_head.h, matvec_ops.h) and the headers they share (common.h, act_dots.h, matvec_q.h,
matvec_q16.h, ort_abi.h). The library is compiled from these with the host's C++ compiler the first time a
session needs it, into the cache (`$RWKV_CACHE/ortops/<key>/`, keyed by every source file's name and
content, the compiler flags and this CPU's instruction-set flags, since it is built with -march=native),
with its sha256 beside it; a library that does not match it is rebuilt before anything loads it.
An artifact only names the domain it uses; rwkvc never loads code from an artifact.
"""
from __future__ import annotations

import ctypes
import fcntl
import hashlib
import os
import subprocess
import sys
import tempfile
from functools import lru_cache
from pathlib import Path

from rwkvc import host
from rwkvc.abi import FUSED_DOMAIN as DOMAIN
from rwkvc.abi import FUSED_VERSION as VERSION
from rwkvc.cache import cache_root
from rwkvc.errors import RwkvcError

MAIN = "ort_ops.cc"                  # the translation unit; it #includes the other sources
SOURCE_GLOBS = ("*.cc", "*.h")       # every source file, all covered by the cache key
LIBRARY = "librwkvc_ort_ops.so"
FLAGS = ["-std=c++17", "-O3", "-march=native", "-fopenmp-simd", "-fno-trapping-math", "-fno-math-errno", "-fPIC", "-shared", "-fvisibility=hidden", "-pthread"]


def _source_dir() -> Path:
    return Path(__file__).parent


def sources(src: Path) -> list[Path]:
    """The kernel source files in `src`, in name order."""
    return sorted({p for pattern in SOURCE_GLOBS for p in src.glob(pattern) if p.is_file()})


def cache_key(src: Path, flags: list[str]) -> str:
    """The build's cache key: every source file's name and content, the flags and this CPU's flags."""
    h = hashlib.sha256(b"rwkvc-ortops\0")
    for p in sources(src):
        data = p.read_bytes()
        h.update(f"{p.name}\0{len(data)}\0".encode())
        h.update(data)
    h.update(" ".join(flags).encode())
    h.update(host.cpu_flags().encode())
    return h.hexdigest()[:16]


def compiler() -> str | None:
    """The C++ compiler the kernels are built with (rwkvc.host.compiler); None when the host has none."""
    return host.compiler()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _checked(lib: Path) -> str:
    """'ok' when `lib` and its recorded sha256 (LIBRARY.sha256 beside it) agree, else what is wrong."""
    if not lib.exists():
        return "missing"
    try:
        want = (lib.parent / (LIBRARY + ".sha256")).read_text().split()[0]
    except (OSError, IndexError):
        return "its checksum is missing"
    try:
        return "ok" if _sha256(lib) == want else "its sha256 does not match"
    except OSError as e:
        return f"it cannot be read ({e.strerror})"


def _write_atomically(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def build(flags: list[str] | None = None, src: Path | None = None) -> str:
    """Path of the library built with `flags` (FLAGS when None) from the kernel sources in `src` (this
    package's when None: another checkout's runtimes/ortops for an A/B, bench/kernel_ab.py), building it into
    the cache unless it is there. RwkvcError if it cannot be built.

    The cache entry holds the library and its sha256 (LIBRARY.sha256, written after the library, both by
    rename): a library that does not match its checksum (truncated, damaged, or from a build that never
    recorded one) is never loaded, since mapping a truncated one crashes the process with a bus error; it
    is rebuilt, with one line on stderr saying so. Builds of one entry take a lock, so concurrent runs
    build it once."""
    flags = list(FLAGS if flags is None else flags)
    src = _source_dir() if src is None else Path(src)
    out_dir = cache_root() / "ortops" / cache_key(src, flags)
    lib = out_dir / LIBRARY
    if _checked(lib) == "ok":
        return str(lib)
    cxx = compiler()
    if cxx is None:
        raise RwkvcError("this artifact uses rwkvc's fused CPU kernels, which are built once with a C++ "
                         "compiler, and none was found: apt-get install g++ (or set CXX), or recompile with "
                         "--no-fused")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        lock = open(out_dir / ".lock", "a")
    except OSError as e:
        raise RwkvcError(f"cannot write rwkvc's fused kernels into {out_dir} ({e.strerror}); set RWKV_CACHE "
                         "to a writable directory") from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)             # another process may be building this entry
        problem = _checked(lib)
        if problem == "ok":
            return str(lib)
        try:
            _compile(cxx, flags, src, lib)
        except OSError as e:
            raise RwkvcError(f"cannot write rwkvc's fused kernels into {out_dir} ({e.strerror}); set "
                             "RWKV_CACHE to a writable directory with free space") from None
    if problem == "its checksum is missing":
        print(f"note: rebuilt rwkvc's fused kernel library {lib}: it had no checksum to verify it by", file=sys.stderr)
    elif problem != "missing":
        print(f"warning: rwkvc's fused kernel library {lib} was damaged ({problem}); rebuilt it", file=sys.stderr)
    return str(lib)


def _compile(cxx: str, flags: list[str], src: Path, lib: Path) -> None:
    """Compile into a temporary file beside `lib`, fsync it, rename it into place, then record its sha256."""
    fd, tmp = tempfile.mkstemp(dir=lib.parent, prefix=f".{LIBRARY}.", suffix=".tmp")
    os.close(fd)
    try:
        r = subprocess.run([cxx, *flags, str(src / MAIN), "-o", tmp], capture_output=True, text=True)
        if r.returncode != 0:
            lines = r.stderr.strip().splitlines() or ["(no output)"]
            last = next((ln for ln in lines if "error" in ln), lines[-1])
            raise RwkvcError(f"building rwkvc's fused CPU kernels with {cxx} failed ({last[:200]}); "
                             "recompile the artifact with --no-fused")
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        digest = _sha256(Path(tmp))
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _write_atomically(lib.parent / (LIBRARY + ".sha256"), f"{digest}  {LIBRARY}\n".encode())


@lru_cache(maxsize=None)
def library() -> str:
    """Path of the library built with FLAGS (building it on first use). RwkvcError if it cannot be built."""
    return build()


_chosen: str | None = None   # use_library's


def use_library(path: str | None) -> None:
    """Sessions registered from now on load the library at `path` instead (a build of build(flags, src): a
    benchmark's A/B of builds in one process, each serving its own sessions); None: library() again."""
    global _chosen
    _chosen = path


def _library() -> str:
    return _chosen or library()


def require(spec: dict) -> None:
    """Check an artifact's manifest["custom_ops"] against the kernels this rwkvc builds."""
    v = spec.get("version")
    if spec.get("domain") != DOMAIN or not isinstance(v, int) or not 1 <= v <= VERSION:
        raise RwkvcError(f"this artifact uses fused kernels {spec.get('domain')} v{v}; this rwkvc provides "
                         f"{DOMAIN} v1 to v{VERSION}: recompile the artifact with this rwkvc")
    lib = _library()
    if ctypes.CDLL(lib).rwkvc_ort_ops_version() != VERSION:
        raise RwkvcError(f"{lib}: not version {VERSION} of rwkvc's fused kernels; delete it so it is rebuilt")


def register(so, threads: int | None = None) -> None:
    """Register the library into an onnxruntime.SessionOptions; `threads` for the kernels that split their
    work (the prefill's WKV; one setting per process: that of the ONNX Runtime session made last)."""
    lib = _library()
    so.register_custom_ops_library(lib)
    ctypes.CDLL(lib).rwkvc_ort_ops_set_threads(int(threads or os.cpu_count() or 1))
