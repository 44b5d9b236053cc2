"""rwkvc's fused CPU kernels (runtimes/ortops/, domain ai.rwkvc) in the cpu target's step graph.

The fused step must compute what the plain-ONNX step computes (float tolerance: it reorders float32 sums
and uses its own exp), agree with the artifact's own prefill, and the options around it must fail clearly.
The parity tests against the official package (test_v7_parity.py) run the fused step too: it is the
default wherever g++ exists.
"""
import dataclasses
import json

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
    assert ("ai.rwkvc", "Rwkv7WkvPrefill") in step_ops(fused, "prefill")
    assert not any(dom == "ai.rwkvc" for dom, _ in step_ops(plain) | step_ops(plain, "prefill"))
    man = json.loads((fused / "manifest.json").read_text())
    assert man["custom_ops"] == {"domain": "ai.rwkvc", "version": ortops.VERSION, "entry_points": ["batch_prefill", "batch_step", "prefill", "step"]}
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
    for threads in (1, 2):   # one session at a time: the kernels follow the newest session's count
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



def test_compressed_kernels_avx2_path(small, tmp_path, avx2_build):
    """The sparse FFN and clustered head kernels without AVX-512 (an AVX2 build: their vpmaddwd dot products,
    the 1-bit estimate's two-vector nibble tables, the scalar compaction and thresholds) against the plain graph, float32
    and int8 rows, as the native build is held above."""
    (tmp_path / "f32").mkdir()
    (tmp_path / "i8").mkdir()
    test_compressed_step_kernels_match_the_plain_graph(small, tmp_path / "f32", SPARSE_HHEAD,
                                                       {"Rwkv7SparseFfnQF32", "Rwkv7ClusteredHeadTopF32"})
    test_int8_rows_match_the_plain_graph(small, tmp_path / "i8")
