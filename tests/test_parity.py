"""The parity matrix: every lowering of RWKV-4, -5.2, -6 and -7 against rwkvc's PyTorch reference.

The centre is the readable reference model (rwkvc.reference.v4 ... v7) run over the whole token sequence
in one call with its recurrent WKV: its logits at every position and its final state. Each cell of
(lowering) x (version) x (mode) feeds the same tokens and compares with that centre:
    step      one token per call, the state carried between calls; logits at every token
    prefill   the tokens in chunks of several sizes (CHUNKS); logits after each chunk
and, in both modes, the final state. Bound: max |diff| <= TOLERANCES[(lowering, dtype)] * max(1, max |centre|)
for the logits and for each state tensor.

Lowerings:
    reference      the PyTorch reference itself, token by token (step) and with the chunked WKV form
                   (prefill, RWKV-7's `wkv7_chunked`, the form training uses)
    onnx-plain     target cpu, plain ONNX operators (LoweringPolicy(fused=False))
    onnx-fused     target cpu, rwkvc's fused ONNX Runtime kernels (LoweringPolicy(fused=True))
    tvm-host       target tvm-host (TVM, Relax VM in-process)
    rpi5           target rpi5 (TVM aarch64 library + the native runner) under qemu-aarch64
The cpu variants are pinned by the LoweringPolicy they compile with (compile option "lowering"), not left
to the host's CPU flags. A cell a lowering does not cover is marked xfail(strict=True) on the RwkvcError
its compile raises (GAPS), or skipped where there is nothing to run (SKIPS): the matrix shows every gap,
and a gap that closes fails until its mark is removed.
"""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

import rwkvc
from rwkvc.errors import RwkvcError
from rwkvc.testing import (random_v4_state_dict, random_v5_state_dict, random_v6_state_dict,
                           random_v7_state_dict, save_state_dict)

T = 32
CHUNKS = [1, 7, 16, 8]          # prefill chunk sizes (sum T): one token, odd, a power of two, the rest
REF_CHUNK_LEN = 8               # the reference's chunked WKV: 16 tokens span two chunks, 7 leave padding

VERSIONS = {
    # name: (state-dict maker, kwargs); two layers, vocabulary 1000
    "v4": (random_v4_state_dict, dict(n_layer=2, n_embd=64, vocab_size=1000)),
    "v5.2": (random_v5_state_dict, dict(n_layer=2, n_embd=64, head_size=32, vocab_size=1000)),
    "v6": (random_v6_state_dict, dict(n_layer=2, n_embd=64, head_size=32, vocab_size=1000)),
    "v7": (random_v7_state_dict, dict(n_layer=2, n_embd=128, head_size=64, vocab_size=1000)),
}
LOWERINGS = ("reference", "onnx-plain", "onnx-fused", "tvm-host", "rpi5")
MODES = ("step", "prefill")

# (lowering, weight dtype) -> relative bound on logits and state, against the reference's float32 centre.
# 1e-4 is the bound every artifact meets against the official `rwkv` package (test_v7_parity,
# test_v4_v6_parity); the reference's own chunked WKV reorders float32 sums only.
TOLERANCES = {
    ("reference", "float32"): 1e-5,
    ("onnx-plain", "float32"): 1e-4,
    ("onnx-fused", "float32"): 1e-4,
    ("tvm-host", "float32"): 1e-4,
    ("rpi5", "float32"): 1e-4,
}
DTYPE = "float32"

GAPS = {
    # (lowering, version): why compiling it raises RwkvcError
    **{("onnx-fused", v): "rwkvc's fused kernels cover RWKV-7 only: compiling with LoweringPolicy(fused=True) "
                          f"refuses {v}" for v in ("v4", "v5.2", "v6")},
}
SKIPS: dict = {
    # (lowering, version, mode): why there is nothing to run
}


def cpu_options(fused: bool) -> dict:
    """The cpu target's lowering, pinned whole (fused or plain, the matrix-vector kernels, the interleaved
    layouts): the graphs these cells check do not depend on the compiling host's CPU."""
    return {"lowering": policy(fused)}


def policy(fused: bool):
    from rwkvc.targets.onnx.policy import LoweringPolicy
    return LoweringPolicy(fused=fused, matvec_q=False, matvec_i16=True)


def tol(lowering: str, ref: np.ndarray) -> float:
    return TOLERANCES[(lowering, DTYPE)] * max(1.0, float(np.abs(ref).max()))


# ------------------------------------------------------------------------------------------------
# the centre: the reference model, the whole sequence in one call


def reference_model(version: str, sd: dict):
    from rwkvc.reference.v4 import RWKV4
    from rwkvc.reference.v5 import RWKV5
    from rwkvc.reference.v6 import RWKV6
    if version == "v7":
        from rwkvc.reference.v7 import RWKV7, config_from_state_dict
        m = RWKV7(config_from_state_dict(sd))
        m.load_state_dict({k: v.float() for k, v in sd.items()})
        return m.eval()
    return {"v4": RWKV4, "v5.2": RWKV5, "v6": RWKV6}[version].from_state_dict(sd).eval()


def state_arrays(state) -> tuple[np.ndarray, np.ndarray]:
    """(shift (L, 2, C), wkv (L, ...)) of a reference State (batch 1) or an artifact's ir.State."""
    if isinstance(state.shift, torch.Tensor):
        return state.shift[:, :, 0].numpy(), state.wkv[:, 0].numpy()
    return np.asarray(state.shift), np.asarray(state.wkv)


@pytest.fixture(scope="module")
def centres(tmp_path_factory):
    """version -> its checkpoint, tokens, reference model and centre, built once per module on first use."""
    built = {}

    def get(version: str) -> dict:
        if version not in built:
            make, kw = VERSIONS[version]
            sd = make(seed=sum(map(ord, version)), **kw)
            d = tmp_path_factory.mktemp("parity-" + version)
            tokens = np.random.default_rng(sum(map(ord, version))).integers(0, kw["vocab_size"], T).tolist()
            model = reference_model(version, sd)
            with torch.no_grad():
                logits, state = model(torch.tensor([tokens]))
            shift, wkv = state_arrays(state)
            built[version] = dict(version=version, dir=d, ckpt=save_state_dict(sd, d / "model.pth"), model=model, sd=sd,
                                  tokens=tokens, logits=logits[0].numpy(), shift=shift, wkv=wkv, artifacts={})
        return built[version]
    return get


# ------------------------------------------------------------------------------------------------
# the lowerings


def toolchain_missing(lowering: str) -> str | None:
    if lowering == "onnx-fused":
        from rwkvc.runtimes import ortops
        return None if ortops.compiler() is not None else "no C++ compiler for rwkvc's fused kernels"
    if lowering == "tvm-host":
        try:
            import tvm  # noqa: F401
        except ImportError:
            return "Apache TVM is not installed (scripts/setup_tvm.sh)"
    if lowering == "rpi5":
        from helpers import MISSING
        return MISSING
    return None


def artifact(centre, lowering: str):
    """The (version, lowering) artifact, compiled once per module (the TVM ones once per session, shared with
    tests/test_tvm456.py); a compile error is raised on every use."""
    cache = centre["artifacts"]
    if lowering in ("tvm-host", "rpi5"):
        from helpers import compile_shared
        return compile_shared(centre["sd"], centre["ckpt"], centre["dir"] / lowering, lowering)
    if lowering not in cache:
        target, options = {"onnx-plain": ("cpu", cpu_options(False)), "onnx-fused": ("cpu", cpu_options(True)),
                           "tvm-host": ("tvm-host", {}), "rpi5": ("rpi5", {})}[lowering]
        try:
            cache[lowering] = rwkvc.compile(centre["ckpt"], centre["dir"] / lowering, target=target, options=options)
        except RwkvcError as e:
            cache[lowering] = e
    if isinstance(cache[lowering], Exception):
        raise cache[lowering]
    return cache[lowering]


def check_graph(art, lowering: str) -> None:
    """The cpu artifact is the pinned lowering (its manifest records it): rwkvc's kernels in both graphs or
    in neither."""
    if lowering not in ("onnx-plain", "onnx-fused"):
        return
    import onnx
    assert rwkvc.load(art).manifest["lowering"] == policy(lowering == "onnx-fused").to_dict()
    for entry in ("step", "prefill"):
        g = onnx.load(str(art / f"{entry}.onnx"), load_external_data=False).graph
        custom = {n.op_type for n in g.node if n.domain == "ai.rwkvc"}
        assert bool(custom) == (lowering == "onnx-fused"), (entry, sorted(custom))


def chunked_wkv(model):
    """The parallel WKV form of the reference model's generation (RWKV-6 shares RWKV-5's)."""
    from rwkvc.reference import v4, v5, v6, v7
    forms = {v4.RWKV4: v4.wkv4_chunked, v5.RWKV5: v5.wkv5_chunked, v6.RWKV6: v5.wkv5_chunked,
             v7.RWKV7: v7.wkv7_chunked}
    return forms[type(model)]


def run_reference(centre, mode: str):
    """The reference by another route: token by token, or over CHUNKS with its parallel (chunked) WKV."""
    model, tokens, outs, state = centre["model"], centre["tokens"], [], None
    kw = {}
    if mode == "prefill":
        kw = {"wkv_fn": functools.partial(chunked_wkv(model), chunk_len=REF_CHUNK_LEN)}
    sizes = [1] * T if mode == "step" else CHUNKS
    pos = 0
    with torch.no_grad():
        for c in sizes:
            logits, state = model(torch.tensor([tokens[pos:pos + c]]), state, **kw)
            pos += c
            outs.append(logits[0, -1].numpy())
    return np.stack(outs), state


def run_artifact(art, centre, mode: str):
    m = rwkvc.load(art)
    try:
        tokens, outs, state, pos = centre["tokens"], [], None, 0
        for c in ([1] * T if mode == "step" else CHUNKS):
            logits, state = m.forward(tokens[pos:pos + c], state)
            pos += c
            assert logits.shape == (centre["logits"].shape[-1],) and logits.dtype == np.float32
            outs.append(logits)
        return np.stack(outs), state
    finally:
        close = getattr(m.runtime, "close", None)
        if close is not None:
            close()


def cells():
    for low in LOWERINGS:
        for v in VERSIONS:
            for mode in MODES:
                marks = []
                if (low, v) in GAPS:
                    marks.append(pytest.mark.xfail(strict=True, raises=RwkvcError, reason=GAPS[(low, v)]))
                yield pytest.param(low, v, mode, marks=marks, id=f"{low}-{v}-{mode}")


@pytest.mark.parametrize("lowering,version,mode", list(cells()))
def test_parity(centres, lowering, version, mode):
    if (lowering, version, mode) in SKIPS:
        pytest.skip(SKIPS[(lowering, version, mode)])
    missing = toolchain_missing(lowering)
    if missing:
        pytest.skip(missing)
    c = centres(version)
    if lowering == "reference":
        got, state = run_reference(c, mode)
    else:
        art = artifact(c, lowering)
        check_graph(art, lowering)
        got, state = run_artifact(art, c, mode)
    ends = np.cumsum([1] * T if mode == "step" else CHUNKS) - 1
    want = c["logits"][ends]
    for i, (g, w) in enumerate(zip(got, want)):
        diff, bound = float(np.abs(g - w).max()), tol(lowering, w)
        assert diff <= bound, f"after {ends[i] + 1} tokens: max |logit diff| {diff:.3g} > {bound:.3g}"
    shift, wkv = state_arrays(state)
    assert shift.shape == c["shift"].shape and wkv.shape == c["wkv"].shape, (shift.shape, wkv.shape)
    for name, a, ref in (("shift", shift, c["shift"]), ("wkv", wkv, c["wkv"])):
        diff, bound = float(np.abs(a - ref).max()), tol(lowering, ref)
        assert diff <= bound, f"final {name} state: max |diff| {diff:.3g} > {bound:.3g}"


def test_every_cell_is_covered_or_names_its_gap():
    """The matrix is the full product; every gap names a lowering and version the matrix has."""
    assert set(TOLERANCES) == {(low, DTYPE) for low in LOWERINGS}
    assert {low for low, _ in GAPS} <= set(LOWERINGS) and {v for _, v in GAPS} <= set(VERSIONS)
    assert {(low, v) for low, v, _ in SKIPS}.isdisjoint(GAPS)
    assert len(list(cells())) == len(LOWERINGS) * len(VERSIONS) * len(MODES)
