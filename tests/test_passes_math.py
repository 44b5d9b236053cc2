"""The compression passes' weight math on its own (no model): quantisers against their NumPy
dequantisation, the packed layouts against ONNX Runtime's kernels, SVD, GPTQ / AWQ, predictors, k-means."""
import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from rwkvc.passes import calib_quant, hhead, sparse_ffn, svd
from rwkvc.weights import int4, int8, lowrank


@pytest.fixture
def w(rng):
    return (rng.standard_normal((96, 160)) * 0.05).astype(np.float32)


def _session(nodes, inits, inputs):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 9
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])


def test_int8_roundtrip(w):
    q, s = int8.quantize_int8(w)
    assert q.dtype == np.int8 and s.shape == (96,) and np.abs(q).max() <= 127
    err = np.abs(int8.dequantize_int8(q, s) - w)
    assert np.all(err <= s[:, None] / 2 + 1e-7)          # round to nearest: at most half a step
    q0, s0 = int8.quantize_int8(np.zeros((3, 5), np.float32))
    assert np.all(q0 == 0) and np.all(s0 == 1)


@pytest.mark.parametrize("group", [16, 32, 64, 128])
def test_int4_roundtrip_and_padding(w, group):
    codes, scales, zeros = int4.quantize_int4(w, group)
    nb = -(-160 // group)
    assert codes.shape == (96, nb * group) and scales.shape == zeros.shape == (96, nb)
    assert codes.max() <= 15 and zeros.max() <= 15
    deq = int4.dequantize_int4(codes, scales, zeros, group, 160)
    step = np.repeat(scales, group, axis=1)[:, :160]
    assert np.all(np.abs(deq - w) <= step / 2 + 1e-6)
    # padding columns dequantise to exactly 0
    full = int4.dequantize_int4(codes, scales, zeros, group, nb * group)
    assert np.all(full[:, 160:] == 0)
    assert np.array_equal(int4.unpack_int4(int4.pack_int4(codes)), codes)


def test_int4_representation(w):
    rep = int4.Int4.from_dense(w, 32)
    assert rep.shape == (96, 160) and rep.packed.shape == (96, 5, 16) and rep.zeros.shape == (96, 3)
    codes, s, z = int4.quantize_int4(w, 32)
    assert np.allclose(rep.to_dense(), int4.dequantize_int4(codes, s, z, 32, 160))
    assert int4.effective_group(128, 32) == 32 and int4.effective_group(32, 300) == 32
    assert int4.Int4.from_dense(w[:, :24], 128).group == 32       # a narrow factor is not padded to 128


def test_matmulnbits_layout_matches_reference(w, rng):
    """ONNX Runtime's MatMulNBits on Int4's packed arrays = x @ to_dense().T (accuracy_level 0: exact)."""
    rep = int4.Int4.from_dense(w, 32, accuracy_level=0)
    x = rng.standard_normal((3, 160)).astype(np.float32)
    node = helper.make_node("MatMulNBits", ["x", "b", "s", "z"], ["y"], domain="com.microsoft", K=160, N=96,
                            bits=4, block_size=32, accuracy_level=0)
    s = _session([node], [numpy_helper.from_array(rep.packed, "b"), numpy_helper.from_array(rep.scales, "s"),
                          numpy_helper.from_array(rep.zeros, "z")], [("x", TensorProto.FLOAT, [3, 160])])
    np.testing.assert_allclose(s.run(None, {"x": x})[0], x @ rep.to_dense().T, rtol=1e-5, atol=1e-5)


def test_matmulinteger_lowering_matches_reference(w, rng):
    """DynamicQuantizeLinear + MatMulInteger + scales = x @ W_q.T up to the activation's 8-bit rounding, with
    the weights as the lowering gives them: uint8 codes q + 128, zero point 128 (an int8 B saturates on x86
    CPUs without VNNI: this bound failed by 20x on an AVX2-only EPYC)."""
    rep = int8.Int8.from_dense(w)
    x = rng.standard_normal((2, 160)).astype(np.float32)
    nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
             helper.make_node("MatMulInteger", ["xq", "b", "xz", "bz"], ["acc"]),
             helper.make_node("Cast", ["acc"], ["accf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["xs", "s"], ["sc"]), helper.make_node("Mul", ["accf", "sc"], ["y"])]
    s = _session(nodes, [numpy_helper.from_array(int8.u8_codes(rep.q.T), "b"), numpy_helper.from_array(np.array(int8.U8_ZERO, np.uint8), "bz"),
                         numpy_helper.from_array(rep.scale, "s")], [("x", TensorProto.FLOAT, [2, 160])])
    ref = x @ rep.to_dense().T
    assert np.abs(s.run(None, {"x": x})[0] - ref).max() <= 0.01 * np.abs(ref).max()


def test_svd_factor_exact_at_full_rank_and_energy(rng):
    a = rng.standard_normal((64, 48)).astype(np.float32)
    A, B = lowrank.svd_factor(a, 48)
    np.testing.assert_allclose(B @ A, a, atol=1e-4)
    low = (rng.standard_normal((64, 5)) @ rng.standard_normal((5, 48))).astype(np.float32)
    S = lowrank.singular_values(low)
    assert svd.rank_for_energy(S, 0.999999) == 5
    A, B = lowrank.svd_factor(low, 5)
    np.testing.assert_allclose(B @ A, low, atol=1e-4)
    assert svd.choose_rank((64, 48), None, 0.25, 0) == 12 and svd.choose_rank((64, 48), None, 7, 0) == 7
    assert svd.choose_rank((64, 48), S, 1.0, 0.5) <= 5
    assert svd.choose_rank((64, 48), lowrank.singular_values(a), 1.0, 1.0) == 49   # no saving: keep dense


def _hessian(rng, K, n=2000):
    """Correlated inputs with unequal channel scales (what makes calibration matter)."""
    base = rng.standard_normal((n, K)) @ rng.standard_normal((K, K)) / np.sqrt(K) + 0.3 * rng.standard_normal((n, K))
    x = (base * np.linspace(0.2, 3, K)).astype(np.float32)
    return x, x.T.astype(np.float64) @ x


def test_gptq_beats_rtn_on_output_error(w, rng):
    x, H = _hessian(rng, 160)
    ref = x @ w.T
    c, s, z = int4.quantize_int4(w, 32)
    rtn = np.mean((x @ int4.dequantize_int4(c, s, z, 32, 160).T - ref) ** 2)
    c, s, z = calib_quant.gptq_int4(w, H, 32)
    gq = np.mean((x @ int4.dequantize_int4(c, s, z, 32, 160).T - ref) ** 2)
    assert gq < 0.8 * rtn
    q, sc = calib_quant.gptq_int8(w, H)
    rtn8 = np.mean((x @ int8.dequantize_int8(*int8.quantize_int8(w)).T - ref) ** 2)
    assert np.mean((x @ int8.dequantize_int8(q, sc).T - ref) ** 2) < rtn8


def test_awq_no_worse_than_rtn(w, rng):
    x, _ = _hessian(rng, 160, 512)
    codes, sc, z, inv_s, alpha = calib_quant.awq_int4(w, x, 32)
    deq = int4.dequantize_int4(codes, sc, z, 32, 160)
    if inv_s is not None:
        deq = deq * inv_s[None, :]
    c0, s0, z0 = int4.quantize_int4(w, 32)
    ref = x @ w.T
    assert np.mean((x @ deq.T - ref) ** 2) <= np.mean((x @ int4.dequantize_int4(c0, s0, z0, 32, 160).T - ref) ** 2) + 1e-12


def test_sparse_thresholds_reach_recall(rng):
    T, F = 400, 64
    contrib = torch.as_tensor(rng.random((T, F)) ** 4, dtype=torch.float32)
    p = torch.clamp(contrib + 0.05 * torch.as_tensor(rng.standard_normal((T, F)), dtype=torch.float32), 0, 1)
    est = contrib + 0.2 * torch.as_tensor(rng.standard_normal((T, F)), dtype=torch.float32)
    for recall in (0.9, 0.99):
        thr, q, st = sparse_ffn.choose_thresholds(p, est, contrib, recall)
        qmask = (est > torch.quantile(est, q, dim=-1, keepdim=True)) if q < 1 else torch.zeros_like(p, dtype=torch.bool)
        mask = qmask | (p > thr)
        assert float((contrib * mask).sum() / contrib.sum()) >= recall - 1e-6
        assert st["fraction"] < 1.0


def test_sparse_thresholds_weigh_the_key_copy_bytes():
    """select=bytes: the key copy takes part only where the rows it saves outweigh its codes."""
    rng = np.random.default_rng(3)   # its own: the MLP alone must reach the recall (as on a trained model)
    T, F, recall = 400, 64, 0.9
    contrib = torch.as_tensor(rng.random((T, F)) ** 4, dtype=torch.float32)
    p = torch.clamp(contrib + 0.2 * torch.as_tensor(rng.standard_normal((T, F)), dtype=torch.float32), 1e-3, 1)
    est = contrib + 0.05 * torch.as_tensor(rng.standard_normal((T, F)), dtype=torch.float32)
    _, q_rows, st_rows = sparse_ffn.choose_thresholds(p, est, contrib, recall)
    _, q_mlp, st_mlp = sparse_ffn.choose_thresholds(p, None, contrib, recall)
    assert q_rows < 1.0 and q_mlp == 1.0 and st_rows["fraction"] < st_mlp["fraction"] < 1.0
    saved = (st_mlp["fraction"] - st_rows["fraction"]) * F   # rows a token the key copy saves
    # codes cheaper than the rows they save: kept; dearer: dropped, and the MLP alone reaches the recall
    _, q, st = sparse_ffn.choose_thresholds(p, est, contrib, recall, row_bytes=100.0, q_bytes=0.5 * saved * 100.0)
    assert q < 1.0 and st["fraction"] < st_mlp["fraction"]
    thr, q, st = sparse_ffn.choose_thresholds(p, est, contrib, recall, row_bytes=100.0, q_bytes=1.5 * saved * 100.0)
    assert q == 1.0 and st["fraction"] == st_mlp["fraction"]
    assert float((contrib * (p > thr)).sum() / contrib.sum()) >= recall - 1e-6


def test_mlp_predictor_learns(rng):
    X = rng.standard_normal((1500, 16)).astype(np.float32)
    Wk = rng.standard_normal((32, 16)).astype(np.float32)
    fires = (X @ Wk.T) > 0
    fc1, fc2 = sparse_ffn.train_mlp_predictor(X, fires, hidden=32, steps=300)
    acc = float(((sparse_ffn.mlp_prob(fc1, fc2, torch.as_tensor(X)) > 0.5).numpy() == fires).mean())
    assert acc > 0.85


def test_cluster_vocab_and_distillation(rng):
    centers = rng.standard_normal((8, 24))
    W = (np.repeat(centers, 40, axis=0) + 0.05 * rng.standard_normal((320, 24))).astype(np.float32)
    labels = hhead.cluster_vocab(W, 8, iters=10)
    assert labels.shape == (320,) and set(labels.tolist()) == set(range(8))
    # rows generated from one centre end up together
    for c in range(8):
        assert len(set(labels[c * 40:(c + 1) * 40].tolist())) == 1
    X = rng.standard_normal((300, 24)).astype(np.float32)
    Wc, kl = hhead.distill_cluster_head(W, labels, X, 8, steps=200)
    assert Wc.shape == (8, 24) and kl < 0.05


def test_within_cluster_prior(rng):
    W = rng.standard_normal((60, 8)).astype(np.float32)
    labels = np.arange(60) % 6
    X = rng.standard_normal((50, 8)).astype(np.float32)
    lp = hhead.within_cluster_log_prior(W, labels, X, 6)
    for c in range(6):
        assert abs(np.exp(lp[labels == c]).sum() - 1) < 1e-5
    # the approximation's mass per cluster is the cluster head's: tokens of a cluster share p_c by q_t
    p = np.exp(lp)
    assert p.min() > 0


def test_head_blocks_cover_each_row_once():
    """The clustered head's block layout: every row in exactly one real slot of a block of its own cluster;
    padding slots repeat their cluster's last row and are marked -inf; empty clusters own no block."""
    from rwkvc.targets.onnx.head import head_blocks
    bounds = np.array([0, 5, 5, 21, 24, 24, 40])                 # sizes 5, 0, 16, 3, 0, 16
    bc, rows, pad = head_blocks(bounds, B=4)
    sizes = np.diff(bounds)
    assert bc.tolist() == [0, 0, 2, 2, 2, 2, 3, 5, 5, 5, 5]
    real = pad == 0
    assert sorted(rows[real].tolist()) == list(range(40))
    cluster = np.repeat(np.arange(len(sizes)), sizes)
    assert (cluster[rows] == bc[:, None]).all()
    assert np.isneginf(pad[~real]).all() and (rows[~real] == (bounds[1:] - 1)[bc[np.nonzero(~real)[0]]]).all()


@pytest.mark.parametrize("level", [0, 4])
def test_int8_lowerings_match_reference(w, rng, tmp_path, level):
    """Both cpu lowerings of an Int8 matrix (level 4: MatMulNBits bits=8 on the re-laid-out codes; level 0:
    DynamicQuantizeLinear + MatMulInteger) = x @ W_q.T up to the activations' 8-bit rounding, and neither
    stores the matrix as float."""
    import onnx

    from rwkvc import ir
    from rwkvc.targets.onnx.graph import Graph, WeightStore
    from rwkvc.targets.onnx.quant import emit_int8
    rep = int8.Int8.from_dense(w, accuracy_level=level)
    store = WeightStore(str(tmp_path / "weights.bin"))
    g = Graph(store)
    y = emit_int8(g, ir.Linear("m", rep), "x")
    g.nodes.append(helper.make_node("Identity", [y], ["y"]))
    store.close()
    graph = g.make("g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 160])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 9
    onnx.save(m, str(tmp_path / "m.onnx"))
    ops = {n.op_type for n in m.graph.node}
    assert ("MatMulNBits" in ops) == (level == 4) and ("MatMulInteger" in ops) == (level == 0)
    assert (tmp_path / "weights.bin").stat().st_size < 2 * w.size      # 1 byte a weight (+ scales, alignment)
    x = rng.standard_normal((3, 160)).astype(np.float32)
    out = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    ref = x @ rep.to_dense().T
    assert np.abs(out - ref).max() <= 0.01 * np.abs(ref).max()


def test_weight_kinds_are_one_closed_table_the_onnx_lowering_covers():
    """Every IR weight kind is one class of rwkvc.weights, listed once in WEIGHT_KINDS; the ONNX lowering's
    tables cover exactly those kinds (no pass adds or patches any), and the cpu and cuda targets declare them."""
    import rwkvc.passes  # noqa: F401  (importing every pass changes nothing below)
    from rwkvc.targets import get_target
    from rwkvc.targets.onnx import kinds
    from rwkvc.weights import WEIGHT_KINDS
    assert set(WEIGHT_KINDS) == {"dense", "lowrank", "int8", "int4", "factored", "scaled", "clustered", "lazy",
                                 "deepembed", "deepembed-lazy"}
    assert all(cls.kind == k and cls.__module__.startswith("rwkvc.weights.") for k, cls in WEIGHT_KINDS.items())
    assert set(kinds.LINEAR) == set(WEIGHT_KINDS) - {"lazy", "deepembed", "deepembed-lazy"}
    assert set(kinds.EMBEDDERS) == {"dense", "lazy"} and set(kinds.DEEP_TABLES) == {"deepembed", "deepembed-lazy"}
    assert kinds.LOWERED == set(WEIGHT_KINDS)
    assert get_target("cpu").capabilities.weight_kinds == get_target("cuda").capabilities.weight_kinds == kinds.LOWERED


@pytest.mark.parametrize("K, nb", [(1, 4), (37, 8), (300, 64), (513, 128)])
def test_in_place_cholesky_and_inverse_match_torch(K, nb):
    """GPTQ's factor without a second K x K buffer: the blocked in-place Cholesky and triangular inverse
    against torch's (float64), and an indefinite matrix reported, not factored."""
    g = torch.Generator().manual_seed(K)
    X = torch.randn(2 * K + 3, K, generator=g)
    H = X.T @ X + 0.1 * torch.eye(K)
    A = H.clone()
    assert calib_quant._cholesky_lower_(A, nb)
    L = torch.linalg.cholesky(H.double())
    assert torch.equal(torch.triu(A, 1), torch.zeros_like(A))
    assert float((A.double() - L).abs().max()) <= 1e-5 * float(L.abs().max())
    calib_quant._invert_lower_(A, nb)
    Linv = torch.linalg.inv(L)
    assert torch.equal(torch.triu(A, 1), torch.zeros_like(A))
    assert float((A.double() - Linv).abs().max()) <= 1e-4 * float(Linv.abs().max())
    H[K // 2, K // 2] = -1.0
    assert not calib_quant._cholesky_lower_(H.clone(), nb)
