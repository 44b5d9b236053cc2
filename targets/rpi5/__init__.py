"""`rpi5`: Raspberry Pi 5 (Cortex-A76, aarch64, NEON) through TVM; a self-contained artifact.

    DIR/
      run                 native runner (C++ over the TVM runtime; tokenizer + sampler built in)
      lib/                libtvm_runtime.so, libtvm_ffi.so (aarch64, from the apache-tvm wheels; rpath $ORIGIN/lib)
      model.so            the Relax VM executable + kernels, cross-compiled with aarch64-linux-gnu-g++
      weights.bin         parameters, page-aligned, memory-mapped by the runner: float32 (float16 with
                          --dtype float16) and, for compressed IR, packed int8 / 4-bit codes with their scales
      params.json         the parameter index (name, shape, offset), in the VM's params order
      init_state.bin      only with a tuned state (`--state`): float32 shift (L,2,C) then wkv (L,H,N,N),
                          the runner's initial state (manifest "init_state_raw")
      tokenizer/, manifest.json

On the Pi: `DIR/run --prompt TEXT -n 100`. On an x86 host, `rwkvc run DIR` runs the same binary under
qemu-aarch64 (runtime `tvm-native`). The lowering is targets/tvm/ (from the IR, not the ONNX); the runner's
C++ sources and a Makefile to build it by hand are in runner/.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

from rwkvc import ir
from rwkvc.errors import RwkvcError

from ..base import Capabilities
from ..tvm import WEIGHT_DTYPES, versions, weight_kinds

RUNNER_DIR = Path(__file__).resolve().parent / "runner"
RUNNER_SOURCES = ("rwkv_run.cc", "rwkv_model.h", "sampler.h", "world_tokenizer.h")
CROSS_CXX = "aarch64-linux-gnu-g++"
RUNTIME_LIBS = ("libtvm_runtime.so", "libtvm_ffi.so")
SETUP_HINT = "run scripts/setup_tvm.sh (apt: g++-aarch64-linux-gnu qemu-user; pip: apache-tvm; the aarch64 TVM wheels)"


def aarch64_dir() -> Path:
    """Where scripts/setup_tvm.sh unpacked the aarch64 TVM runtime (lib/ + include/)."""
    return Path(os.environ.get("RWKVC_AARCH64_DIR", Path.home() / ".cache" / "rwkvc" / "aarch64"))


def check_toolchain() -> tuple[str, Path]:
    cxx = shutil.which(os.environ.get("RWKVC_AARCH64_CXX", CROSS_CXX))
    if cxx is None:
        raise RwkvcError(f"--target rpi5 needs the cross compiler {CROSS_CXX} (apt-get install g++-aarch64-linux-gnu); "
                         f"or {SETUP_HINT}")
    d = aarch64_dir()
    missing = [f"lib/{f}" for f in RUNTIME_LIBS if not (d / "lib" / f).exists()]
    missing += [] if (d / "include" / "tvm" / "ffi" / "function.h").exists() else ["include/tvm/ffi"]
    if missing:
        raise RwkvcError(f"--target rpi5 needs the aarch64 TVM runtime in {d} (missing {missing[0]}); {SETUP_HINT} "
                         "or set RWKVC_AARCH64_DIR")
    return cxx, d


def build_runner(cxx: str, tvm_dir: Path) -> Path:
    """The native runner for aarch64, built once per (sources, compiler, TVM runtime) and cached."""
    h = hashlib.sha256()
    for f in RUNNER_SOURCES:
        h.update((RUNNER_DIR / f).read_bytes())
    h.update(subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.encode())
    for f in RUNTIME_LIBS:
        h.update(hashlib.sha256((tvm_dir / "lib" / f).read_bytes()).digest())
    out = tvm_dir / "build" / h.hexdigest()[:16] / "run"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"run.tmp{os.getpid()}")
    cmd = [cxx, "-std=c++17", "-O2", "-mcpu=cortex-a76", f"-I{tvm_dir / 'include'}", str(RUNNER_DIR / "rwkv_run.cc"),
           "-o", str(tmp), f"-L{tvm_dir / 'lib'}", "-Wl,--no-as-needed", "-ltvm_ffi", "-ltvm_runtime",
           "-Wl,-rpath,$ORIGIN/lib"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"building the native runner failed:\n{' '.join(cmd)}\n{r.stderr[-4000:]}")
    os.replace(tmp, out)
    return out


class Rpi5Target:
    name = "rpi5"
    description = "Raspberry Pi 5 (Cortex-A76) via Apache TVM, with a native C++ runner"

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            weight_kinds=weight_kinds(),
            # float16: matrices and embedding stored in fp16 (half the bytes and memory traffic),
            # widened to fp32 in registers; all arithmetic and the state stay fp32
            dtypes=WEIGHT_DTYPES,
            versions=versions(), runtime="tvm-native",
            extras={
                # Cortex-A76: NEON (4 x f32 lanes), dot product and fp16 arithmetic (the last two are
                # for the int8 / fp16 kernels; the fp32 kernels use NEON FMA)
                "llvm": {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a76",
                         "mattr": ["+neon", "+dotprod", "+fullfp16"]},
                # 16 output columns (4 q registers) x 4 rows = 16 accumulators of the 32 q registers
                "kernel": {"panel": 16, "rows": 4, "lanes": 4},
            })

    def compile(self, model: ir.Model, out_dir: str, options: dict, progress=None) -> dict:
        from ..tvm import KernelShape, check_lowerable, compile_model, import_tvm
        check_lowerable(model)
        import_tvm()
        from tvm.support import cc
        cxx, tvm_dir = check_toolchain()
        runner = build_runner(cxx, tvm_dir)
        caps = self.capabilities
        ks = KernelShape(**caps.extras["kernel"], weights=options.get("dtype") or "float32")
        fields = compile_model(model, out_dir, caps.extras["llvm"], ks, fcompile=cc.cross_compiler(cxx),
                               progress=progress)
        out = Path(out_dir)
        (out / "lib").mkdir()
        for f in RUNTIME_LIBS:
            shutil.copyfile(tvm_dir / "lib" / f, out / "lib" / f)
        shutil.copyfile(runner, out / "run")
        os.chmod(out / "run", 0o755)
        if model.init_state is not None:  # the runner starts from it (Python reads init_state.npz)
            import numpy as np
            with open(out / "init_state.bin", "wb") as f:
                f.write(np.ascontiguousarray(model.init_state.shift, np.float32).tobytes())
                f.write(np.ascontiguousarray(model.init_state.wkv, np.float32).tobytes())
            fields = {**fields, "init_state_raw": "init_state.bin"}
        return {**fields, "runtime": "tvm-native", "runner": "run", "arch": "aarch64",
                "runtime_libs": [f"lib/{f}" for f in RUNTIME_LIBS]}


TARGET = Rpi5Target()
