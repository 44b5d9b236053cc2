"""rwkvc's ONNX Runtime kernels one node at a time: each product kernel against ONNX Runtime's own
(MatMulNBits) on random codes, and the clustered head's top token against the argmax of its logits; the
native build, and the AVX2 and baseline x86-64 builds (their other code paths)."""
from __future__ import annotations

import numpy as np
import pytest

from rwkvc.runtimes import ortops

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


@pytest.mark.parametrize("op,M", [("Rwkv7Mix6B", 6), ("Rwkv7Mix1B", 1)])
def test_batched_mix_reads_its_row_of_the_whole_shift_state(op, M):
    """A batched mix with the attribute row (op set 10) on the step's whole shift state (B, R, C) gives what
    it gives on that row alone (B, C), its normalised rows as (B, 1, C); without the attribute (the graphs of
    op sets 8 and 9) it takes the row, as before."""
    import onnxruntime as ort
    from onnx import TensorProto as T
    from onnx import helper
    B, R, C = 5, 6, 48
    rng = np.random.default_rng(3)
    x, dx = rng.standard_normal((B, C)).astype(np.float32), rng.standard_normal((B, C)).astype(np.float32)
    lw, lb = rng.standard_normal(C).astype(np.float32), rng.standard_normal(C).astype(np.float32)
    shift, mix = rng.standard_normal((B, R, C)).astype(np.float32), rng.random((M, C)).astype(np.float32)
    so = ort.SessionOptions()
    ortops.register(so, 1)

    def run(prev, **attrs):
        outs = [f"o{i}" for i in range(2 + M)]
        node = helper.make_node(op, ["x", "dx", "lw", "lb", "prev", "mix"], outs, domain="ai.rwkvc", eps=1e-5, **attrs)
        feeds = {"x": x, "dx": dx, "lw": lw, "lb": lb, "prev": prev, "mix": mix}
        g = helper.make_graph([node], "mix", [helper.make_tensor_value_info(k, T.FLOAT, None) for k in feeds],
                              [helper.make_tensor_value_info(o, T.FLOAT, None) for o in outs])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.rwkvc", 1)])
        return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)

    s = x + dx
    n = (s - s.mean(1, keepdims=True)) / np.sqrt(s.var(1, keepdims=True) + 1e-5) * lw + lb
    for row in (0, 3, R - 1):
        whole, alone = run(shift, row=row), run(np.ascontiguousarray(shift[:, row]))
        assert whole[1].shape == (B, 1, C) and alone[1].shape == (B, C)
        np.testing.assert_array_equal(whole[1].reshape(B, C), alone[1])
        for a, b in zip(whole[2:] + whole[:1], alone[2:] + alone[:1]):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(alone[1], n, rtol=1e-4, atol=1e-5)
        for i in range(M):
            np.testing.assert_allclose(alone[2 + i], n + (shift[:, row] - n) * mix[i], rtol=1e-4, atol=1e-5)
