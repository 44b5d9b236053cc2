"""Helpers that more than one test module uses: the rpi5 toolchain check, IR builders for the lowering
tests, the logits comparison with its allowance for int8 rounding flips, the official package's model,
the CLI command, the one-line error check of the fault tests, and a child process's memory peak."""
from __future__ import annotations

import platform
import shutil
import subprocess
import sys

import numpy as np

from rwkvc import ir


def toolchain_missing() -> str | None:
    """Why the rpi5 target cannot be compiled and run here, or None."""
    try:
        import tvm  # noqa: F401
    except ImportError:
        return "Apache TVM is not installed (scripts/setup_tvm.sh)"
    from rwkvc.targets.rpi5 import CROSS_CXX, RUNTIME_LIBS, aarch64_dir
    if shutil.which(CROSS_CXX) is None:
        return f"{CROSS_CXX} is not installed (scripts/setup_tvm.sh)"
    if any(not (aarch64_dir() / "lib" / f).exists() for f in RUNTIME_LIBS):
        return f"the aarch64 TVM runtime is not in {aarch64_dir()} (scripts/setup_tvm.sh)"
    if platform.machine() not in ("aarch64", "arm64") and shutil.which("qemu-aarch64") is None:
        return "qemu-aarch64 is not installed (scripts/setup_tvm.sh)"
    return None


MISSING = toolchain_missing()


# ----------------------------------------------------------------------------------------------
# Int8 against the cpu artifact
#
# int8 with accuracy_level=0 is plain ONNX integer math on the cpu target (DynamicQuantizeLinear ->
# MatMulInteger: the activation quantised per tensor to uint8 with round-half-to-even, int32 sums), which
# the TVM kernels reproduce exactly, so the logits agree to float rounding. (The default level 4 is ONNX
# Runtime's MatMulNBits with its own internal int8 activation blocks, which no other runtime reproduces
# bit for bit; TVM computes the level-0 math for every int8 matrix.) One caveat is inherent to dynamic
# quantisation: the float work before a quantisation (layer norms, FMA contraction, which TVM's LLVM
# backend does and ONNX Runtime does not) differs by an ulp or so between the runtimes, and when an
# activation lies that close to a rounding step the two round it to neighbouring codes; the logits then
# move by ~1e-3..1e-2 relative (measured: 1 or 2 tokens in 400 on these random models; an exact PyTorch
# emulation of the integer math agrees bit for bit with ONNX Runtime, and TVM's quantiser matches it on
# 200 random and tie-planted tensors). So each step starts from the cpu artifact's state (a flip cannot
# contaminate later tokens) and the int8 checks allow at most INT8_FLIPS such tokens, each within
# FLIP_BOUND; a wrong scale, zero point, rounding or layout fails every token. int4 uses accuracy_level=1
# (fp32 activations on the cpu target; the TVM kernel always dequantises to fp32 in registers), which is
# continuous: strict 1e-4 on every token.

INT8_FLIPS, FLIP_BOUND = 1, 2e-2


def assert_logits_match(got, ref, what, flips=0):
    """Every row of got (n, V) within bound(ref row), except at most `flips` rows within FLIP_BOUND."""
    rel = np.array([float(np.abs(g - r).max()) / max(1.0, float(np.abs(r).max())) for g, r in zip(got, ref)])
    over = np.flatnonzero(rel > 1e-4)
    assert len(over) <= flips and (rel <= FLIP_BOUND).all(), \
        f"{what}: rows {over.tolist()} differ by {rel[over].tolist()} (relative; bound 1e-4, {flips} rounding flips allowed)"


# ----------------------------------------------------------------------------------------------
# IR builders


def with_sparse_predictors(model, seed=0):
    """RWKV-Lite's FFN predictors on every layer (an MLP and a 1-bit copy of the key, as the sparse-ffn pass
    makes them): a random model has no sparsity to calibrate, so they are made up; the lowering is the point."""
    from rwkvc.arch import lite
    rng = np.random.default_rng(seed)
    for blk in model.blocks:
        K = np.asarray(blk.ffn.lin["key"].weight.w, np.float32)
        F, C_ = K.shape
        codes, scale, zero = lite.quantise(K, 1)
        blk.ffn.sparse = ir.SparseFFN(fc1=rng.standard_normal((32, C_)).astype(np.float32) / C_ ** 0.5,
                                      fc2=rng.standard_normal((F, 32)).astype(np.float32) / 32 ** 0.5,
                                      mlp_threshold=0.6, q_codes=codes, q_scale=float(scale), q_zero=float(zero),
                                      q_bits=1, q_quantile=0.9)
    return model


def compressed_ir(ckpt, prep, recipe, vocab):
    """The IR of ckpt after `recipe` (calibrated on random tokens), with made-up sparse predictors first
    when prep is "sparse"."""
    from rwkvc.frontend import load_model
    from rwkvc.passes import PassContext
    from rwkvc.pipeline import parse_recipe, run_passes
    model = load_model(ckpt)
    if prep == "sparse":
        model = with_sparse_predictors(model)
    calib = np.random.default_rng(1).integers(0, vocab, 2048)
    return run_passes(model, parse_recipe(recipe), PassContext(calib_tokens=calib, progress=False))


def fp16_rounded_ir(model: ir.Model) -> ir.Model:
    """The IR whose fp32 lowering equals the fp16-weights lowering exactly: matrices and the (ln0-folded)
    embedding rounded to fp16, so both artifacts hold the same numbers."""
    from rwkvc.weights.embedding import folded_embedding
    r16 = lambda a: np.asarray(a, np.float16).astype(np.float32)  # noqa: E731
    model.emb.weight = ir.Dense(r16(folded_embedding(model)))
    model.ln0 = None
    for lin in model.linears():
        lin.weight = ir.Dense(r16(lin.weight.w))
    return model


def one_error_line(r, *words: str) -> str:
    """A subprocess that failed with status 2 and exactly one stderr line `error: ...` holding every word
    (no traceback): how rwkvc's commands and scripts report what the user or the environment can fix."""
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def tree(d) -> dict[str, bytes]:
    """Every file under d (relative path -> bytes): what is on disk, to compare before and after."""
    from pathlib import Path
    d = Path(d)
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


_SHARED_ARTIFACTS: dict = {}


def state_dict_digest(sd: dict) -> str:
    """A digest of a state dict's names, dtypes, shapes and values (torch.save's bytes vary with the path)."""
    import hashlib

    import torch
    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k].detach().contiguous().cpu()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def compile_shared(sd: dict, ckpt, out_dir, target: str, options: dict | None = None, dtype: str | None = None):
    """rwkvc.compile(ckpt, out_dir, target=target, options=options, dtype=dtype) once per test session for each
    (state dict, target, options, dtype): modules that check the same checkpoint's artifact (the parity matrix
    against the reference, tests/test_tvm456.py against the official package) share one TVM compile (~10 s
    each). sd is the checkpoint's state dict; a compile error is raised again on every use."""
    import rwkvc
    key = (state_dict_digest(sd), target, repr(sorted((options or {}).items())), dtype)
    if key not in _SHARED_ARTIFACTS:
        try:
            _SHARED_ARTIFACTS[key] = rwkvc.compile(ckpt, out_dir, target=target, options=options or {}, dtype=dtype)
        except Exception as e:  # noqa: BLE001  (re-raised on every use)
            _SHARED_ARTIFACTS[key] = e
    if isinstance(_SHARED_ARTIFACTS[key], Exception):
        raise _SHARED_ARTIFACTS[key]
    return _SHARED_ARTIFACTS[key]


def official_rwkv(path_pth: str):
    """The official package's model for a .pth file ('cpu fp32'); it appends '.pth' itself."""
    import contextlib
    import io
    with contextlib.redirect_stdout(io.StringIO()):
        from rwkv.model import RWKV
        return RWKV(str(path_pth)[:-4], "cpu fp32")


def rwkvc_cmd():
    return [sys.executable, "-m", "rwkvc.cli"]


_PEAK = """
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

try:                                    # restart the peak (VmHWM) here: what `setup` did is not measured
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = status("VmRSS")
except OSError:
    base = status("VmHWM")
"""


def child_peak(setup: str, work: str, *args, timeout=600) -> tuple[int, int]:
    """Run `setup` then `work` (Python source, sys.argv[1:] = args) in a new interpreter and return its resident
    bytes before `work` and its peak during it: the child's own VmHWM, reset after `setup` (ru_maxrss would
    include the forked test process's pages). A failing child fails the test with its stderr."""
    code = f"import sys\n{setup}\n{_PEAK}\n{work}\nprint(base, status('VmHWM'))\n"
    out = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stderr[-2000:]
    base, peak = map(int, out.stdout.split()[-2:])
    return base, peak
