"""`--target tvm-host`: the TVM lowering for the host CPU, run in-process by the Relax VM, against the
cpu (ONNX Runtime) artifact of the same IR. Bound: max |logit diff| <= 1e-4 * max(1, max |cpu logit|)
step by step and over prefill chunks; the state after a prefill equals the cpu artifact's."""
import numpy as np
import pytest

import rwkvc
from rwkvc import ir
from rwkvc.artifact import compile_to_dir
from rwkvc.frontend import load_model
from rwkvc.targets import get_target
from rwkvc.testing import save_random_v7

from helpers import INT8_FLIPS, assert_logits_match, compressed_ir, fp16_rounded_ir

tvm = pytest.importorskip("tvm", reason="Apache TVM is not installed (scripts/setup_tvm.sh)")

T = 40


def bound(ref):
    return 1e-4 * max(1.0, float(np.abs(ref).max()))


def lowrank_ir(model: ir.Model, rng) -> ir.Model:
    """Swap some matrices for LowRank ones (plain, relu2 activation, +diag) to cover that lowering."""
    C = model.config.n_embd
    b0 = model.blocks[-1]
    r = 24
    b0.att.lin["receptance"].weight = ir.LowRank(rng.standard_normal((r, C)).astype(np.float32) / C ** 0.5,
                                                 rng.standard_normal((C, r)).astype(np.float32) / r ** 0.5,
                                                 diag=rng.standard_normal(C).astype(np.float32) * 0.1)
    F = model.config.ffn_dim
    b0.ffn.lin["key"].weight = ir.LowRank(rng.standard_normal((r, C)).astype(np.float32) / C ** 0.5,
                                          rng.standard_normal((F, r)).astype(np.float32) / r ** 0.5, act="relu2")
    return model


CASES = {
    # name: (n_layer, n_embd, head_size, vocab, file dtype, low-rank dims, lowrank IR)
    "h64-v1000": (2, 128, 64, 1000, "fp32", None, False),
    "h32-c96-v1001-fp16-lowrank": (3, 96, 32, 1001, "fp16", {"w": 32, "a": 32, "v": 32, "g": 64}, True),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    L, C, N, V, dt, dims, lowrank = CASES[request.param]
    d = tmp_path_factory.mktemp(request.param)
    ckpt = save_random_v7(d / "model.pth", n_layer=L, n_embd=C, head_size=N, vocab_size=V, dtype=dt, dims=dims,
                          seed=L * 100 + C)
    model = load_model(ckpt)
    if lowrank:
        model = lowrank_ir(model, np.random.default_rng(0))
    cpu = compile_to_dir(model, get_target("cpu"), d / "cpu")
    host = compile_to_dir(model, get_target("tvm-host"), d / "host")
    tokens = np.random.default_rng(C).integers(0, V, T).tolist()
    m = rwkvc.load(cpu)
    logits, st = [], None
    for t in tokens:
        lg, st = m.forward([t], st)
        logits.append(lg)
    return dict(cpu=cpu, host=host, tokens=tokens, logits=np.stack(logits), state=st)


def test_manifest(case):
    m = rwkvc.load(case["host"]).manifest
    assert m["runtime"] == "tvm-host" and m["target"] == "tvm-host"
    assert set(m["entry_points"]) == {"step", "prefill"}
    assert {"model.so", "weights.bin", "params.json"} <= set(m["files"])


def test_step_by_step_matches_cpu(case):
    m = rwkvc.load(case["host"], threads=2)
    state = None
    for i, t in enumerate(case["tokens"]):
        logits, state = m.forward([t], state)
        assert logits.dtype == np.float32 and logits.shape == case["logits"][i].shape
        ref = case["logits"][i]
        diff = float(np.abs(logits - ref).max())
        assert diff <= bound(ref), f"token {i}: {diff:.3g} > {bound(ref):.3g}"
    ref = case["state"]
    np.testing.assert_allclose(state.shift, ref.shift, rtol=0, atol=1e-4)
    np.testing.assert_allclose(state.wkv, ref.wkv, rtol=0, atol=1e-4 * max(1.0, float(np.abs(ref.wkv).max())))


@pytest.mark.parametrize("chunks", [[T], [1, 7, 13, 19], [5] * 8])
def test_prefill_chunks_match_cpu(case, chunks):
    m = rwkvc.load(case["host"])
    toks, state, pos = case["tokens"], None, 0
    for c in chunks:
        logits, state = m.forward(toks[pos:pos + c], state)
        pos += c
        ref = case["logits"][pos - 1]
        assert float(np.abs(logits - ref).max()) <= bound(ref), f"after {pos} tokens"
    ref = case["state"]
    np.testing.assert_allclose(state.wkv, ref.wkv, rtol=0, atol=1e-4 * max(1.0, float(np.abs(ref.wkv).max())))


def test_pack_panels_round_trip():
    from rwkvc.targets.tvm import pack_panels
    w = np.arange(5 * 3, dtype=np.float32).reshape(5, 3)
    p = pack_panels(w, 4)                    # (2 panels, in 3, panel 4), last panel zero-padded
    assert p.shape == (2, 3, 4)
    np.testing.assert_array_equal(p.transpose(0, 2, 1).reshape(8, 3)[:5], w)
    assert not p[1, :, 1:].any()


def test_fp16_weights_match_the_rounded_model(tmp_path):
    """--dtype float16: half the weight bytes, fp32 arithmetic; lossless against the fp16-rounded IR."""
    ckpt = save_random_v7(tmp_path / "m.pth", n_layer=2, n_embd=64, head_size=32, vocab_size=500, seed=9)
    model = fp16_rounded_ir(load_model(ckpt))
    cpu = compile_to_dir(model, get_target("cpu"), tmp_path / "cpu")
    h16 = compile_to_dir(model, get_target("tvm-host"), tmp_path / "h16", dtype="float16")
    h32 = compile_to_dir(model, get_target("tvm-host"), tmp_path / "h32")
    assert rwkvc.load(h16).manifest["weight_dtype"] == "float16"
    size = lambda p: (p / "weights.bin").stat().st_size  # noqa: E731
    assert size(h16) < 0.6 * size(h32)
    toks = np.random.default_rng(1).integers(0, 500, 24).tolist()
    mc, mh = rwkvc.load(cpu), rwkvc.load(h16)
    sc = sh = None
    for t in toks:
        lc, sc = mc.forward([t], sc)
        lh, sh = mh.forward([t], sh)
        assert float(np.abs(lh - lc).max()) <= bound(lc)
    lc, _ = mc.forward(toks)
    lh, _ = mh.forward(toks)
    assert float(np.abs(lh - lc).max()) <= bound(lc)


# ----------------------------------------------------------------------------------------------
# Compressed IR: every weight kind the TVM lowering has, against the cpu artifact of the same IR.
# Bounds and the rounding-flip allowance of int8 are explained in tests/helpers.py.

COMPRESSED = {
    # name: (IR changes before the passes, recipe)
    # continuous: factored int4 (fp32 activations), AWQ's scaled input, the int8 lazy embedding: strict 1e-4
    "svd-int4-awq": (None, "svd(rank=0.25),int4(group=32,method=awq,accuracy_level=1),lazy-emb(storage=int8)"),
    # RWKV-Lite: sparse FFN (MLP + 1-bit key predictors), clustered head with int8 rows, int8 elsewhere
    "lite-int8": ("sparse", "hhead(k=24,p=0.9,min_k=2,max_k=12),int8(accuracy_level=0),lazy-emb(storage=float16)"),
}


@pytest.fixture(scope="module", params=list(COMPRESSED))
def ccase(request, tmp_path_factory):
    prep, recipe = COMPRESSED[request.param]
    d = tmp_path_factory.mktemp(request.param)
    V = 1000
    ckpt = save_random_v7(d / "model.pth", n_layer=2, n_embd=128, head_size=64, vocab_size=V, seed=21)
    model = compressed_ir(ckpt, prep, recipe, V)
    cpu = compile_to_dir(model, get_target("cpu"), d / "cpu")
    host = compile_to_dir(model, get_target("tvm-host"), d / "host")
    toks = np.random.default_rng(4).integers(0, V, T).tolist()
    return dict(name=request.param, cpu=cpu, host=host, tokens=toks, flips=INT8_FLIPS if "int8" in request.param else 0)


def test_compressed_steps_match_cpu(ccase):
    """Each token from the cpu artifact's state (so a rounding flip stays one token's)."""
    mc, mh = rwkvc.load(ccase["cpu"]), rwkvc.load(ccase["host"])
    got, ref, st = [], [], None
    for t in ccase["tokens"]:
        got.append(mh.forward([t], st)[0])
        lc, st = mc.forward([t], st)
        ref.append(lc)
    assert_logits_match(np.stack(got), np.stack(ref), ccase["name"], ccase["flips"])


@pytest.mark.parametrize("chunks", [[T], [3, 17, 20]])
def test_compressed_prefill_matches_cpu(ccase, chunks):
    """Prefill chunks from the cpu artifact's state after each chunk; int8 quantises per chunk on both."""
    mc, mh = rwkvc.load(ccase["cpu"]), rwkvc.load(ccase["host"])
    toks, st, pos, got, ref = ccase["tokens"], None, 0, [], []
    for c in chunks:
        got.append(mh.forward(toks[pos:pos + c], st)[0])
        lc, st = mc.forward(toks[pos:pos + c], st)
        ref.append(lc)
        pos += c
    assert_logits_match(np.stack(got), np.stack(ref), f"{ccase['name']} prefill {chunks}", ccase["flips"])


def test_lowering_covers_every_weight_kind():
    """Every IR weight kind (the closed rwkvc.weights.WEIGHT_KINDS) is a kind the TVM targets declare (the
    capabilities are data)."""
    from rwkvc.targets.tvm import weight_kinds
    from rwkvc.weights import WEIGHT_KINDS
    assert weight_kinds() == set(WEIGHT_KINDS)
    assert get_target("tvm-host").capabilities.weight_kinds == weight_kinds()

