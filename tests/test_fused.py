"""rwkvc's fused CPU kernels (runtimes/ortops/, domain ai.rwkvc) in the cpu target's step graph.

The fused step must compute what the plain-ONNX step computes (float tolerance: it reorders float32 sums
and uses its own exp), agree with the artifact's own prefill, and the options around it must fail clearly.
The parity tests against the official package (test_v7_parity.py) run the fused step too: it is the
default wherever g++ exists.
"""
import dataclasses
import json
import platform

import numpy as np
import onnx
import pytest

import rwkvc
from rwkvc.errors import RwkvcError
from rwkvc.runtimes import ortops
from rwkvc.testing import save_random_v7
from helpers import FLIP_BOUND, INT8_FLIPS, assert_logits_match

pytestmark = pytest.mark.skipif(ortops.compiler() is None, reason="no C++ compiler for the fused kernels")

SHAPES = {
    # n_layer, n_embd, head_size, vocab, low-rank dims
    "h64": (3, 128, 64, 1000, None),
    "h32-c96": (2, 96, 32, 777, {"w": 32, "a": 32, "v": 32, "g": 64}),
}


def step_ops(art, entry="step") -> set[tuple[str, str]]:
    m = onnx.load(str(art / f"{entry}.onnx"), load_external_data=False)
    return {(n.domain, n.op_type) for n in m.graph.node}


@pytest.fixture(scope="module", params=list(SHAPES))
def pair(request, tmp_path_factory):
    L, C, N, V, dims = SHAPES[request.param]
    d = tmp_path_factory.mktemp(request.param)
    ckpt = save_random_v7(d / "m.pth", n_layer=L, n_embd=C, head_size=N, vocab_size=V, dims=dims, seed=C + N)
    fused = rwkvc.compile(ckpt, d / "fused", target="cpu")
    plain = rwkvc.compile(ckpt, d / "plain", target="cpu", options={"fused": False})
    return ckpt, fused, plain, V


def test_default_cpu_step_is_fused_and_plain_has_no_custom_ops(pair):
    _, fused, plain, _ = pair
    ops = step_ops(fused)
    assert {("ai.rwkvc", "Rwkv7Mix6"), ("ai.rwkvc", "Rwkv7WkvStep"), ("ai.rwkvc", "Rwkv7Mix1")} <= ops
    assert ("ai.rwkvc", "Rwkv7WkvSeq") in step_ops(fused, "prefill")
    assert not any(dom == "ai.rwkvc" for dom, _ in step_ops(plain) | step_ops(plain, "prefill"))
    man = json.loads((fused / "manifest.json").read_text())
    assert man["custom_ops"] == {"domain": "ai.rwkvc", "version": ortops.VERSION, "entry_points": ["prefill", "step"]}
    assert "custom_ops" not in json.loads((plain / "manifest.json").read_text())
    onnx.checker.check_model(str(fused / "step.onnx"), full_check=True)
    from rwkvc.inspect import inspect_artifact
    assert f"rwkvc kernels ai.rwkvc v{ortops.VERSION}" in inspect_artifact(fused)["_text"]
    assert "rwkvc kernels" not in inspect_artifact(plain)["_text"]


def test_fused_step_and_prefill_match_the_plain_graphs(pair):
    _, fused, plain, V = pair
    toks = np.random.default_rng(V).integers(0, V, 40).tolist()
    a, b = rwkvc.load(fused), rwkvc.load(plain)
    sa = sb = None
    for i, t in enumerate(toks):
        la, sa = a.forward([t], sa)
        lb, sb = b.forward([t], sb)
        scale = max(1.0, float(np.abs(lb).max()))
        assert float(np.abs(la - lb).max()) <= 2e-5 * scale, f"token {i}"
    np.testing.assert_allclose(sa.wkv, sb.wkv, rtol=0, atol=2e-5 * max(1.0, float(np.abs(sb.wkv).max())))
    np.testing.assert_allclose(sa.shift, sb.shift, rtol=0, atol=2e-5)
    for chunks in ([40], [1, 17, 22]):     # the fused prefill (token by token) against the plain one (chunked)
        sp = sq = None
        pos = 0
        for c in chunks:
            lp, sp = a.forward(toks[pos:pos + c], sp)
            lq, sq = b.forward(toks[pos:pos + c], sq)
            pos += c
            assert float(np.abs(lp - lq).max()) <= 2e-5 * max(1.0, float(np.abs(lq).max())), chunks
        assert float(np.abs(lp - la).max()) <= 2e-5 * max(1.0, float(np.abs(lp).max()))
        np.testing.assert_allclose(sp.wkv, sq.wkv, rtol=0, atol=2e-5 * max(1.0, float(np.abs(sq.wkv).max())))
        np.testing.assert_allclose(sp.wkv, sa.wkv, rtol=0, atol=2e-5 * max(1.0, float(np.abs(sa.wkv).max())))


def test_fused_with_sparse_ffn_and_int8_runs_the_packed_graph(pair, tmp_path):
    """sparse-ffn + int8 through the fused step: the sparse FFN is one Rwkv7SparseFfnQ node over the packed
    int8 rows and predictors, and the logits are the plain graph's (each token from the plain graph's state,
    up to INT8_FLIPS tokens whose 8-bit activation rounding flips, as in test_int8_rows_match_the_plain_graph)."""
    from rwkvc.targets.onnx import LoweringPolicy
    ckpt, _, _, V = pair
    calib = np.random.default_rng(V + 1).integers(0, V, 384)
    model = passes_model(ckpt, "sparse-ffn(recall=0.9,steps=40,tokens=256,max_fraction=1),int8", calib)
    assert all(blk.ffn.sparse is not None for blk in model.blocks)
    art = lower(model, tmp_path / "q", LoweringPolicy(fused=True))
    plain = lower(model, tmp_path / "p", LoweringPolicy(fused=False))
    ops = step_ops(art)
    assert {("ai.rwkvc", "Rwkv7WkvStep"), ("ai.rwkvc", "Rwkv7SparseFfnQ")} <= ops
    sparse = [n for n in onnx.load(str(art / "step.onnx"), load_external_data=False).graph.node
              if n.op_type == "Rwkv7SparseFfnQ"]
    assert len(sparse) == len(model.blocks)
    assert not any(dom == "ai.rwkvc" for dom, _ in step_ops(plain))
    m, mp = rwkvc.load(art), rwkvc.load(plain)
    logits, state = m.forward([1, 2, 3])
    logits2, _ = m.forward([4], state)
    assert np.isfinite(logits2).all() and logits2.shape == (V,)
    got, ref, st = [], [], None
    for t in calib[-48:]:
        got.append(m.forward([int(t)], st)[0])
        lp, st = mp.forward([int(t)], st)
        ref.append(lp)
    assert_logits_match(np.stack(got), np.stack(ref), "fused sparse-ffn + int8", INT8_FLIPS)


def test_artifact_from_another_kernel_version_is_refused(pair, tmp_path):
    import shutil
    _, fused, _, _ = pair
    d = tmp_path / "old"
    shutil.copytree(fused, d)
    man = json.loads((d / "manifest.json").read_text())
    man["custom_ops"]["version"] = ortops.VERSION + 1
    (d / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(RwkvcError, match="recompile the artifact"):
        rwkvc.load(d)


def test_fused_option_errors(pair, tmp_path):
    from rwkvc.cli import target_options
    with pytest.raises(RwkvcError, match="--target cpu"):
        target_options("tvm-host", True)
    from rwkvc.testing import random_v6_state_dict, save_state_dict
    v6 = save_state_dict(random_v6_state_dict(), tmp_path / "v6.pth")
    with pytest.raises(RwkvcError, match="cover RWKV-7 in float32, not RWKV-v6"):
        rwkvc.compile(v6, tmp_path / "x", target="cpu", options={"fused": True})
    assert not (tmp_path / "x").exists()
    plain = rwkvc.compile(v6, tmp_path / "y", target="cpu")      # the default: plain ONNX where not covered
    assert "custom_ops" not in json.loads((plain / "manifest.json").read_text())
    # heads wider than the kernels' buffers: plain ONNX by default, a clear error when asked for
    wide = save_random_v7(tmp_path / "wide.pth", n_layer=1, n_embd=512, head_size=512, vocab_size=100)
    plain = rwkvc.compile(wide, tmp_path / "w", target="cpu")
    assert "custom_ops" not in json.loads((plain / "manifest.json").read_text())
    with pytest.raises(RwkvcError, match="heads of at most 256"):
        rwkvc.compile(wide, tmp_path / "w2", target="cpu", options={"fused": True})


def test_unwritable_cache_is_a_clear_error(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")          # a cache "directory" under a regular file: no one can create it, not even root
    monkeypatch.setenv("RWKV_CACHE", str(blocker / "cache"))
    ortops.library.cache_clear()
    try:
        with pytest.raises(RwkvcError, match="set RWKV_CACHE"):
            ortops.library()
    finally:
        ortops.library.cache_clear()


def test_without_a_compiler_compile_falls_back_or_refuses(pair, tmp_path, monkeypatch, capsys):
    from rwkvc import host
    ckpt = pair[0]
    monkeypatch.setattr(host, "compiler", lambda: None)
    art = rwkvc.compile(ckpt, tmp_path / "fallback", target="cpu")
    assert "custom_ops" not in json.loads((art / "manifest.json").read_text())
    assert "no C++ compiler found" in capsys.readouterr().err
    with pytest.raises(RwkvcError, match="no C\\+\\+ compiler"):
        rwkvc.compile(ckpt, tmp_path / "forced", target="cpu", options={"fused": True})
    assert not (tmp_path / "forced").exists()


# ------------------------------------------------------------------------------------------------
# op sets v2 and v3: the compression passes' step kernels (Rwkv7SparseFfn*, Rwkv7ClusteredHead*) and the
# quantised products (Rwkv7MatVecQ, Rwkv7MatVecSet)

SPARSE_HHEAD = "sparse-ffn(recall=0.9,steps=40,tokens=256,max_fraction=1),hhead(k=16,p=0.9,min_k=2,steps=40,tokens=256)"


def random_model(d, C, seed):
    """A 2-layer random RWKV-7 of width C with calibration tokens."""
    ckpt = save_random_v7(d / "m.pth", n_layer=2, n_embd=C, head_size=64, vocab_size=1000, seed=seed,
                          dims={"w": 32, "a": 32, "v": 32, "g": 64})
    return ckpt, np.random.default_rng(seed + 1).integers(0, 1000, 384)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return random_model(tmp_path_factory.mktemp("v2"), 128, 11)


def passes_model(ckpt, recipe, calib):
    from rwkvc.frontend import load_model
    from rwkvc.passes import PassContext
    from rwkvc.pipeline import parse_recipe, run_passes
    return run_passes(load_model(ckpt), parse_recipe(recipe), PassContext(calib_tokens=calib, progress=False))


def lower(model, out, fused):
    """The cpu artifact of `model`; fused: True / False (this host's policy with the fused kernels on / off)
    or a LoweringPolicy, pinned."""
    from rwkvc.artifact import compile_to_dir
    from rwkvc.targets import get_target
    options = {"fused": fused} if isinstance(fused, bool) else {"lowering": fused}
    return compile_to_dir(model, get_target("cpu"), out, force=True, options=options)


def step_logits(art, toks):
    m, st, out = rwkvc.load(art), None, []
    for t in toks:
        lg, st = m.forward([int(t)], st)
        out.append(lg)
    return np.stack(out), st


def assert_close(got, ref, rel):
    assert float(np.abs(got - ref).max()) <= rel * max(1.0, float(np.abs(ref).max()))


@pytest.mark.parametrize("recipe,ops", [
    # float32 rows: the fused kernels make the plain graph's numbers, up to float summation order
    (SPARSE_HHEAD, {"Rwkv7SparseFfnQF32", "Rwkv7ClusteredHeadTopF32"}),
    # a float32 MLP predictor (RWKV-Lite's checkpoints load as one) keeps op set 2's kernel
    (SPARSE_HHEAD.replace("max_fraction=1", "max_fraction=1,predictor=fp32"), {"Rwkv7SparseFfnF32"}),
])
def test_compressed_step_kernels_match_the_plain_graph(small, tmp_path, recipe, ops):
    ckpt, calib = small
    model = passes_model(ckpt, recipe, calib)
    fused, plain = lower(model, tmp_path / "f", True), lower(model, tmp_path / "p", False)
    assert {("ai.rwkvc", o) for o in ops} <= step_ops(fused)
    assert not {n for _, n in step_ops(fused)} & {"NonZero", "TopK", "ScatterElements"}   # no bookkeeping left
    toks = calib[-48:]
    lf, sf = step_logits(fused, toks)
    lp, sp = step_logits(plain, toks)
    assert_close(lf, lp, 2e-5)
    assert_close(sf.wkv, sp.wkv, 2e-5)
    # and the artifact's own prefill (plain ONNX for these parts) agrees with its fused step
    last, _ = rwkvc.load(fused).forward(toks.tolist())
    assert_close(last, lf[-1], 2e-5)
    # a greedy decode through the top-token step (no logits written) is the argmax chain of the logits
    m = rwkvc.load(fused)
    lg, st = m.forward(toks[:8].tolist())
    tok, st2 = int(np.argmax(lg)), st
    for _ in range(40):
        lg, st = m.forward([tok], st)
        got, st2 = m.greedy_step(tok, st2)
        assert got == int(np.argmax(lg))
        np.testing.assert_array_equal(st2.wkv, st.wkv)
        tok = got
    assert m.runtime._io("step")[4]     # the step has the top-token head
    res = []                             # and a greedy generation takes that step
    list(m.stream(toks[:8].tolist(), n=24, temperature=0, token_stop=(), result=res))
    lg, st = m.forward(toks[:8].tolist())
    ban = [i for i in m.tokenizer.unused_ids if i < lg.size]
    want = []
    for _ in range(24):
        lg[ban] = -np.inf
        want.append(int(np.argmax(lg)))
        lg, st = m.forward([want[-1]], st)
    assert res[0].tokens == want


def head_top_graph(V, C, K, prior):
    """One Rwkv7ClusteredHeadTopF32 node: x (C,), z (K,), mode (1,) -> logits, top; random clusters of a
    random vocabulary order, log prior per token or none."""
    from onnx import TensorProto as T
    from onnx import helper
    rng = np.random.default_rng(V + K)
    sizes = rng.multinomial(V - K, np.ones(K) / K) + 1
    bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int32)
    order = rng.permutation(V).astype(np.int32)            # row r holds token order[r]
    tc = np.empty(V, np.uint16)
    tc[order] = np.repeat(np.arange(K), sizes)
    rows = (rng.standard_normal((V, C)) * 0.05).astype(np.float32)
    if prior:   # a coarse prior: ties within a cluster
        lq_row = np.round(rng.standard_normal(V), 1).astype(np.float32)
        lq = np.empty(V, np.float32)
        lq[order] = lq_row
        mlq = np.array([lq_row[a:b].max() for a, b in zip(bounds[:-1], bounds[1:])], np.float32)
    else:
        lq, mlq = np.zeros(0, np.float32), np.zeros(0, np.float32)
    inits = [helper.make_tensor(n, dt, a.shape, a.tobytes(), raw=True) for n, dt, a in [
        ("rows", T.FLOAT, rows), ("rs", T.FLOAT, np.zeros(0, np.float32)), ("bounds", T.INT32, bounds),
        ("rtok", T.INT32, order), ("tc", T.UINT16, tc), ("lq", T.FLOAT, lq), ("mlq", T.FLOAT, mlq)]]
    node = helper.make_node("Rwkv7ClusteredHeadTopF32", ["x", "z", "rows", "rs", "bounds", "rtok", "tc", "lq", "mlq",
                                                          "mode"], ["logits", "top"], domain="ai.rwkvc",
                            top_p=0.5, min_k=1, max_k=K)
    g = helper.make_graph([node], "head", [helper.make_tensor_value_info("x", T.FLOAT, [C]),
                                           helper.make_tensor_value_info("z", T.FLOAT, [K]),
                                           helper.make_tensor_value_info("mode", T.INT64, [1])],
                          [helper.make_tensor_value_info("logits", T.FLOAT, None),
                           helper.make_tensor_value_info("top", T.INT64, [1])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.rwkvc", 1)])
    return m.SerializeToString(), tc


@pytest.mark.parametrize("prior", [True, False])
def test_clustered_head_top_is_the_argmax_of_its_logits(prior):
    """The top token (Rwkv7ClusteredHeadTop) is np.argmax of the logits the head writes, ties included (the
    first token), whether an exact logit or a cluster not chosen wins; mode 1 writes no logits."""
    import onnxruntime as ort
    V, C, K = 3000, 32, 40
    so = ort.SessionOptions()
    ortops.register(so, 1)
    graph, tc = head_top_graph(V, C, K, prior)
    sess = ort.InferenceSession(graph, so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(5)
    unchosen_wins = 0
    for trial in range(300):
        x = (rng.standard_normal(C) * rng.choice([0.01, 1.0, 30.0])).astype(np.float32)
        z = (rng.standard_normal(K) * rng.choice([0.1, 2.0, 8.0])).astype(np.float32)
        logits, top = sess.run(None, {"x": x, "z": z, "mode": np.zeros(1, np.int64)})
        want = int(np.argmax(logits))
        assert int(top[0]) == want, trial
        none, top1 = sess.run(None, {"x": x, "z": z, "mode": np.ones(1, np.int64)})
        assert none.shape == (0,) and int(top1[0]) == want
        p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        ranked = np.argsort(-p, kind="stable")
        before = np.cumsum(p[ranked]) - p[ranked]                   # the mass before each rank
        taken = set(ranked[:max(1, int((before < 0.5).sum()))].tolist())
        unchosen_wins += int(tc[want]) not in taken
    assert unchosen_wins >= 10, unchosen_wins   # the unchosen-cluster path was exercised


# op set v3: Rwkv7MatVecQ / Rwkv7MatVecSet compute what MatMulNBits computes at accuracy level 4 (x quantised
# to int8 per block, an integer dot product per block, then the scales)

def one_node_model(node, inits, K, N, T="T") -> bytes:
    """A model of one product node: x (T, K) -> y (T, N)."""
    from onnx import TensorProto, helper
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [T, K])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [T, N])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1),
                                               helper.make_opsetid("ai.rwkvc", 1)]).SerializeToString()


def run_reference_and_fused(make, xs) -> list[list[np.ndarray]]:
    """[reference outputs, fused outputs] for inputs xs, make(fused) giving each model (2 intra-op threads)."""
    import onnxruntime as ort
    out = []
    for fused in (False, True):
        so = ort.SessionOptions()
        so.intra_op_num_threads = 2
        ortops.register(so, 2)
        sess = ort.InferenceSession(make(fused), so, providers=["CPUExecutionProvider"])
        out.append([sess.run(None, {"x": x})[0] for x in xs])
    return out


def nbits_graph(K, N, bits, G, zeros, fused, seed):
    """One product y = W x: MatMulNBits(accuracy_level=4), or the same initializers through Rwkv7MatVecQ."""
    from onnx import helper, numpy_helper
    from rwkvc.weights.int4 import pack_int4, quantize_int4
    rng = np.random.default_rng(seed)
    nb = -(-K // G)
    if bits == 4:
        codes, sc, z = quantize_int4(rng.standard_normal((N, K)).astype(np.float32), G)
        packed, zp = pack_int4(codes.reshape(N, nb, G)), pack_int4(z)
    else:
        packed, zp = rng.integers(0, 256, (N, nb, G), dtype=np.uint8), None
        sc = (rng.random((N, nb)) * 0.01).astype(np.float32)
    inits = [numpy_helper.from_array(packed, "w"), numpy_helper.from_array(sc.astype(np.float32), "s")]
    z = zp if zeros else None
    if fused:
        inits.append(numpy_helper.from_array(z if z is not None else np.zeros(0, np.uint8), "z"))
        node = helper.make_node("Rwkv7MatVecQ", ["x", "w", "s", "z"], ["y"], domain="ai.rwkvc", bits=bits, block=G)
    else:
        if z is not None:
            inits.append(numpy_helper.from_array(z, "z"))
        node = helper.make_node("MatMulNBits", ["x", "w", "s"] + ["z"] * (z is not None), ["y"],
                                domain="com.microsoft", K=K, N=N, bits=bits, block_size=G, accuracy_level=4)
    return one_node_model(node, inits, K, N, 1)


@pytest.mark.parametrize("K,N,bits,G,zeros", [
    (768, 768, 4, 32, True), (768, 768, 4, 32, False), (64, 768, 4, 32, True), (32, 130, 4, 32, True),
    (768, 300, 4, 16, True), (768, 200, 4, 64, False), (896, 100, 4, 128, True), (200, 50, 4, 32, True),
    (768, 4096, 4, 32, True), (128, 4099, 4, 32, True), (64, 1000, 4, 16, True),    # split over threads
    (128, 77, 4, 64, False), (128, 50, 4, 128, True), (192, 300, 4, 32, False), (896, 100, 4, 128, False), (64, 33, 8, 32, False), (32, 100, 8, 16, False),
    (768, 768, 8, 128, False), (3072, 96, 8, 128, False), (64, 768, 8, 64, False), (200, 40, 8, 64, False), (96, 70, 8, 32, False), (48, 33, 8, 16, False),
])
def test_matvec_q_computes_matmulnbits(K, N, bits, G, zeros):
    x = np.random.default_rng(K + N).standard_normal((1, K)).astype(np.float32)
    (ref,), (got,) = run_reference_and_fused(lambda fused: nbits_graph(K, N, bits, G, zeros, fused, seed=K * 7 + N), [x])
    assert float(np.abs(got - ref).max()) <= 2e-6 * float(np.abs(ref).max())   # measured ~5e-7: summation order


def q16_graph(K, N, G, zeros, fused, seed):
    """y = W x over T tokens: MatMulNBits(accuracy_level=4), or Rwkv7MatVecQ16 over the same matrix
    interleaved (rwkvc.weights.int4.interleave16; quantize_int4's scales are exact in float16)."""
    from onnx import helper, numpy_helper
    from rwkvc.weights.int4 import interleave16, pack_int4, quantize_int4
    rng = np.random.default_rng(seed)
    nb = -(-K // G)
    codes, sc, z = quantize_int4(rng.standard_normal((N, K)).astype(np.float32), G)
    packed, zp = pack_int4(codes.reshape(N, nb, G)), (pack_int4(z) if zeros else None)
    if zeros is None:   # the default zero point, 8: codes made with it
        codes, sc, _ = quantize_int4(rng.standard_normal((N, K)).astype(np.float32), G, np.full((N, nb), 0.046875, np.float32),
                                     np.full((N, nb), 8, np.uint8))
        packed = pack_int4(codes.reshape(N, nb, G))
    if fused:
        c16, s16, z16 = interleave16(packed, sc, zp, G)
        inits = [numpy_helper.from_array(c16, "w"), numpy_helper.from_array(s16, "s"), numpy_helper.from_array(z16, "z")]
        node = helper.make_node("Rwkv7MatVecQ16", ["x", "w", "s", "z"], ["y"], domain="ai.rwkvc", n=N, block=G)
    else:
        inits = [numpy_helper.from_array(packed, "w"), numpy_helper.from_array(sc, "s")]
        inits += [numpy_helper.from_array(zp, "z")] if zp is not None else []
        node = helper.make_node("MatMulNBits", ["x", "w", "s"] + ["z"] * (zp is not None), ["y"],
                                domain="com.microsoft", K=K, N=N, bits=4, block_size=G, accuracy_level=4)
    return one_node_model(node, inits, K, N)


@pytest.mark.parametrize("K,N,G,zeros", [
    (768, 768, 32, True), (768, 300, 16, False), (896, 100, 128, True), (200, 50, 32, True), (768, 70, 256, True),
    (64, 33, 64, None), (128, 4099, 32, True), (3072, 96, 128, None), (192, 768, 32, True)])
def test_matvec_q16_computes_matmulnbits(K, N, G, zeros):
    """Op set 7's interleaved layout: Rwkv7MatVecQ16 gives MatMulNBits' (accuracy level 4) numbers for one
    token (the step) and for several (the prefill: 4 tokens a pass, then the rest), with zero points, without
    (False: the pass's zero points dropped, so the default 8 applies to codes made with their own; None:
    codes made with 8), K not a multiple of the block, N not of 16, and rows split over threads."""
    rng = np.random.default_rng(K + N)
    xs = [rng.standard_normal((T, K)).astype(np.float32) for T in (1, 7, 1, 4)]
    out = run_reference_and_fused(lambda fused: q16_graph(K, N, G, zeros, fused, seed=K * 7 + N), xs)
    for ref, got in zip(*out):
        assert got.shape == ref.shape
        assert float(np.abs(got - ref).max()) <= 2e-6 * float(np.abs(ref).max())   # measured ~4e-7


def q16x8_graph(K, N, fused, seed):
    """y = W x over T tokens for an int8 matrix: MatMulNBits(bits=8, accuracy_level=4) as the cpu target
    emits it (rwkvc.targets.onnx.quant.int8_nbits_inputs), or Rwkv7MatVecQ16x8 over it interleaved."""
    from onnx import helper, numpy_helper
    from rwkvc.weights.int4 import effective_group
    from rwkvc.weights.int8 import INT8_BLOCK, interleave16_int8, quantize_int8, u8_codes
    q, sc = quantize_int8(np.random.default_rng(seed).standard_normal((N, K)).astype(np.float32))
    B = effective_group(INT8_BLOCK, K)
    nb = -(-K // B)
    if fused:
        c16, s16, z16 = interleave16_int8(q, sc, B)
        inits = [numpy_helper.from_array(c16, "w"), numpy_helper.from_array(s16, "s"), numpy_helper.from_array(z16, "z")]
        node = helper.make_node("Rwkv7MatVecQ16x8", ["x", "w", "s", "z"], ["y"], domain="ai.rwkvc", n=N, block=B, bits=8)
    else:
        codes = np.full((N, nb * B), 128, np.uint8)
        codes[:, :K] = u8_codes(q)
        inits = [numpy_helper.from_array(codes.reshape(N, nb, B), "w"),
                 numpy_helper.from_array(np.repeat(sc[:, None], nb, axis=1), "s")]
        node = helper.make_node("MatMulNBits", ["x", "w", "s"], ["y"], domain="com.microsoft", K=K, N=N, bits=8,
                                block_size=B, accuracy_level=4)
    return one_node_model(node, inits, K, N)


@pytest.mark.parametrize("K,N", [(768, 768), (768, 300), (200, 50), (3072, 96), (64, 33), (128, 4099), (96, 70)])
def test_matvec_q16x8_computes_matmulnbits(K, N):
    """Op set 7's interleaved int8 layout: Rwkv7MatVecQ16x8 gives MatMulNBits' 8-bit numbers (blocks of 128,
    or the smallest power of two >= 16 covering a smaller K) for one token and for several."""
    rng = np.random.default_rng(K + N)
    xs = [rng.standard_normal((T, K)).astype(np.float32) for T in (1, 6, 1)]
    out = run_reference_and_fused(lambda fused: q16x8_graph(K, N, fused, seed=K * 5 + N), xs)
    for ref, got in zip(*out):
        assert got.shape == ref.shape
        assert float(np.abs(got - ref).max()) <= 2e-6 * float(np.abs(ref).max())


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A model whose matrices are wide enough for rwkvc's 4-bit kernels (LoweringPolicy.matvec_min_k columns)."""
    return random_model(tmp_path_factory.mktemp("v3"), 256, 13)


@pytest.mark.parametrize("recipe,i16", [("int4(group=32)", True), ("int4(group=16)", True), ("int4(group=128)", True),
                                        ("svd(rank=0.5,targets=ffn),int4(group=64)", True),
                                        ("svd(rank=0.25),int4(group=32)", True),
                                        ("int4(group=32)", False), ("svd(rank=0.25),int4(group=128)", False),
                                        ("int8", True), ("svd(rank=0.5,targets=ffn),int8", True)])
def test_quantised_step_products_match_the_plain_graph(wide, tmp_path, recipe, i16):
    """The fused step with its 4-bit products in Rwkv7MatVecSet / Rwkv7MatVecQ16 nodes (op set 7's
    interleaved layout; i16 False: Rwkv7MatVecQ over MatMulNBits' layout) against the plain graph's
    MatMulNBits. Each product agrees to ~5e-7, but a product's output is the next one's input, which both
    quantise to 8 bits per block: an ulp of difference at a rounding boundary flips one 8-bit code, and such
    a token's logits then differ by up to ~1 % (each step from the plain graph's state). A wrong code, scale,
    zero point or layout moves every token. The fused prefill reads the interleaved matrices too
    (Rwkv7MatVecQ16 over 16 tokens), and the artifact holds one copy of each. int8 (level 4): the same with
    Rwkv7MatVecQ16x8 against MatMulNBits' 8-bit kernel."""
    from rwkvc.targets.onnx import LoweringPolicy
    ckpt, calib = wide
    model = passes_model(ckpt, recipe, calib)
    # rwkvc's matrix-vector kernels whatever this CPU would pick (LoweringPolicy.for_host)
    policy = LoweringPolicy(fused=True, matvec_q=True, matvec_i16=i16)
    fused, plain = lower(model, tmp_path / "f", policy), lower(model, tmp_path / "p", False)
    assert json.loads((fused / "manifest.json").read_text())["lowering"] == dataclasses.asdict(policy)
    ops = {n for d, n in step_ops(fused) if d == "ai.rwkvc"}
    single = "Rwkv7MatVecQ16x8" if "int8" in recipe else "Rwkv7MatVecQ16" if i16 else "Rwkv7MatVecQ"
    assert {"Rwkv7MatVecSet", single} <= ops
    if i16:
        pre = onnx.load(str(fused / "prefill.onnx"), load_external_data=False).graph
        assert any(n.op_type == single for n in pre.node)
        names = {t.name for t in pre.initializer} | {
            t.name for t in onnx.load(str(fused / "step.onnx"), load_external_data=False).graph.initializer}
        # never both layouts of a matrix (.q4 / .q4i, .q8b / .q8i)
        assert not any(n.endswith(".q4i") and n[:-1] in names or n.endswith(".q8i") and n[:-1] + "b" in names
                       for n in names)
        toks = [int(t) for t in calib[-16:]]
        got, ref = rwkvc.load(fused).forward(toks)[0], rwkvc.load(plain).forward(toks)[0]
        assert float(np.abs(got - ref).max()) <= FLIP_BOUND * max(1.0, float(np.abs(ref).max()))
    nbits = [n for n in onnx.load(str(fused / "step.onnx"), load_external_data=False).graph.node
             if n.op_type == "MatMulNBits"]   # the large narrow ones stay ONNX Runtime's
    attr = lambda n, k: next(a.i for a in n.attribute if a.name == k)  # noqa: E731
    assert all(attr(n, "K") < policy.matvec_min_k and attr(n, "K") * attr(n, "N") > policy.matvec_small
               for n in nbits)
    mf, mp = rwkvc.load(fused), rwkvc.load(plain)
    rel, st = [], None
    for t in calib[-48:]:
        got = mf.forward([int(t)], st)[0]
        ref, st = mp.forward([int(t)], st)
        rel.append(float(np.abs(got - ref).max()) / max(1.0, float(np.abs(ref).max())))
    rel = np.array(rel)
    assert (rel <= 1e-4).mean() >= 0.75 and rel.max() <= FLIP_BOUND, rel


def test_kernel_splits_over_threads_are_exact(tmp_path):
    """A 0.1B-wide layer (C 768, F 3072), where the kernels split their work over the intra-op threads:
    Rwkv7MatVecSet a level of products by 16-row groups, Rwkv7SparseFfnQ the predictors' scores, the fired
    key rows and the value channels, Rwkv7ClusteredHeadTop its exact rows (p=1: all 1000). Each output element is computed the same way whichever thread computes
    it, so two threads give one thread's logits and state bit for bit."""
    ckpt = save_random_v7(tmp_path / "m.pth", n_layer=1, n_embd=768, head_size=64, vocab_size=1000, seed=5,
                          dims={"w": 64, "a": 64, "v": 32, "g": 128})
    calib = np.random.default_rng(6).integers(0, 1000, 256)
    model = passes_model(ckpt, "svd(rank=0.25,targets=att.r+att.k+att.v+att.o),"
                               "sparse-ffn(recall=0.9,steps=20,tokens=128,max_fraction=1),hhead(k=16,p=1,steps=20,tokens=128),"
                               "int4(group=32)", calib)
    from rwkvc.targets.onnx import LoweringPolicy
    art = lower(model, tmp_path / "a", LoweringPolicy(fused=True, matvec_q=True))   # whatever this CPU would pick
    assert {("ai.rwkvc", "Rwkv7SparseFfnQ"), ("ai.rwkvc", "Rwkv7MatVecSet"),
            ("ai.rwkvc", "Rwkv7ClusteredHeadTop")} <= step_ops(art)
    runs = []
    for threads in (1, 2):   # one session at a time: the library's thread count is the last session's
        m, st, out = rwkvc.load(art, threads=threads), None, []
        for t in calib[:6]:
            lg, st = m.forward([int(t)], st)
            out.append(np.concatenate([lg, st.shift.ravel(), st.wkv.ravel()]))
        runs.append(np.stack(out))
        del m
    assert np.array_equal(runs[0], runs[1])


def test_int8_rows_match_the_plain_graph(small, tmp_path):
    """With int8 rows the fused kernels quantise their activations as the plain graph does
    (DynamicQuantizeLinear + MatMulInteger, what the TVM targets compute too): the same logits, up to one
    token whose 8-bit rounding of an activation can flip (test_rpi5's bound for int8)."""
    ckpt, calib = small
    model = passes_model(ckpt, SPARSE_HHEAD + ",int8", calib)
    fused, plain = lower(model, tmp_path / "f", True), lower(model, tmp_path / "p", False)
    assert {("ai.rwkvc", "Rwkv7SparseFfnQ"), ("ai.rwkvc", "Rwkv7ClusteredHeadTop")} <= step_ops(fused)
    mf, mp = rwkvc.load(fused), rwkvc.load(plain)
    got, ref, st = [], [], None
    for t in calib[-48:]:                  # each token from the plain graph's state: a flip stays one token's
        got.append(mf.forward([int(t)], st)[0])
        lp, st = mp.forward([int(t)], st)
        ref.append(lp)
    assert_logits_match(np.stack(got), np.stack(ref), "fused int8 rows", INT8_FLIPS)


def test_older_kernel_versions_still_load(pair, tmp_path):
    import shutil
    _, fused, plain, V = pair
    d = tmp_path / "v1"
    shutil.copytree(fused, d)
    man = json.loads((d / "manifest.json").read_text())
    man["custom_ops"]["version"] = 1      # an artifact of the first op set: its ops are all still here
    (d / "manifest.json").write_text(json.dumps(man))
    a, _ = rwkvc.load(d).forward([1, 2, 3])
    b, _ = rwkvc.load(plain).forward([1, 2, 3])
    assert_close(a, b, 2e-5)


def build_for(monkeypatch, march):
    """rwkvc's kernels built once more with -march=`march` instead of native (~15 s), for the test's length."""
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the other builds are x86-64 ones")
    monkeypatch.setattr(ortops, "FLAGS", [f if f != "-march=native" else "-march=" + march for f in ortops.FLAGS])
    ortops.library.cache_clear()


@pytest.fixture
def avx2_build(monkeypatch):
    """A plain AVX2 x86-64 build: the paths AVX2-only hosts run."""
    build_for(monkeypatch, "x86-64-v3")
    yield
    ortops.library.cache_clear()


@pytest.fixture
def sse_build(monkeypatch):
    """A baseline x86-64 build (SSE2 only): the portable loops other CPUs run."""
    build_for(monkeypatch, "x86-64")
    yield
    ortops.library.cache_clear()


def test_matvec_q16_portable_loops(sse_build):
    """Without AVX2 the interleaved layouts' portable loops give MatMulNBits' numbers too."""
    for case in [(768, 300, 32, True), (200, 50, 16, False), (64, 33, 64, None)]:
        test_matvec_q16_computes_matmulnbits(*case)
    for case in [(768, 300), (96, 70)]:
        test_matvec_q16x8_computes_matmulnbits(*case)


def test_matvec_q_portable_path(avx2_build):
    """Without AVX-512 VNNI the kernels take their AVX2 and portable paths: the same numbers."""
    for case in [(768, 768, 4, 32, True), (32, 130, 4, 32, True), (768, 300, 4, 16, True),
                 (896, 100, 4, 128, True), (768, 768, 8, 128, False), (96, 70, 8, 32, False)]:
        test_matvec_q_computes_matmulnbits(*case)
    for case in [(768, 768, 32, True), (200, 50, 32, True), (768, 300, 16, False), (64, 33, 64, None),
                 (896, 100, 128, True), (128, 4099, 32, True)]:   # the AVX2 path of the interleaved layouts
        test_matvec_q16_computes_matmulnbits(*case)
    for case in [(768, 300), (200, 50), (96, 70), (128, 4099)]:
        test_matvec_q16x8_computes_matmulnbits(*case)


def test_compressed_kernels_avx2_path(small, tmp_path, avx2_build):
    """The sparse FFN and clustered head kernels without AVX-512 (an AVX2 build: their vpmaddwd dot products,
    the 1-bit estimate's two-vector nibble tables, the scalar compaction and thresholds) against the plain graph, float32
    and int8 rows, as the native build is held above."""
    (tmp_path / "f32").mkdir()
    (tmp_path / "i8").mkdir()
    test_compressed_step_kernels_match_the_plain_graph(small, tmp_path / "f32", SPARSE_HHEAD,
                                                       {"Rwkv7SparseFfnQF32", "Rwkv7ClusteredHeadTopF32"})
    test_int8_rows_match_the_plain_graph(small, tmp_path / "i8")
