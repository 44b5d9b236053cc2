"""RWKV-Lite (compressed RWKV-5.2): the cpu artifact against rwkvc's PyTorch reference of the same maths
(the official package cannot run these files), plus exactness checks of each compression:

    factorised projections   exact SVD at full rank == the dense model
    sparse FFN               predictors that pass every unit == the dense FFN
    hierarchical head        every cluster chosen == the dense head; chosen clusters' tokens are exact
"""
import numpy as np
import pytest
import torch

import rwkvc
from rwkvc.artifact import compile_to_dir
from rwkvc.errors import RwkvcError
from rwkvc.frontend import load_model, model_from_state_dict
from rwkvc.reference.v5 import RWKV5, LiteOptions
from rwkvc.targets import get_target
from rwkvc.testing import random_v5_state_dict, save_state_dict

T = 32
V, K = 1000, 24
ATT = ("att.receptance", "att.key", "att.value", "att.gate")

VARIANTS = {
    # x059: relu^2 + diag on every time-mix projection and the FFN receptance, FFN predictors, clustered head
    "x059-sparse-hhead": dict(factorised=tuple((n, 16, True) for n in ATT + ("ffn.receptance",)), mlp_dim=16,
                              head_clusters=K),
    # x058: plain factorisation (no relu, no diag), dense head
    "x058": dict(factorised=tuple((n, 24, False) for n in ATT + ("ffn.receptance",))),
    # x0594: the FFN's key and value factorised too (relu^2 inside), predictors on a non-dense key
    "x0594-sparse": dict(factorised=tuple((n, 16, True) for n in ATT + ("ffn.receptance",))
                         + (("ffn.key", 32, False), ("ffn.value", 32, False)), mlp_dim=16),
}


def bound(ref):
    return 1e-4 * max(1.0, float(np.abs(ref).max()))


def compile_model(model, out):
    return rwkvc.load(compile_to_dir(model, get_target("cpu"), out))


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    sd = random_v5_state_dict(n_layer=2, n_embd=64, head_size=32, vocab_size=V, seed=len(request.param),
                              **VARIANTS[request.param])
    ckpt = save_state_dict(sd, d / "model.pth")
    labels = np.random.default_rng(7).integers(0, K, V)
    cls = None
    if VARIANTS[request.param].get("head_clusters"):
        cls = d / "model-cls.npy"
        np.save(cls, labels)
    m = compile_model(load_model(ckpt, cluster_file=cls), d / "art")
    tokens = np.random.default_rng(3).integers(0, V, T).tolist()
    ref = RWKV5.from_state_dict(sd, LiteOptions(clusters=labels if cls else None))
    ref_logits, _ = ref(torch.tensor([tokens]))
    return dict(name=request.param, sd=sd, ckpt=ckpt, cls=cls, m=m, tokens=tokens, ref=ref_logits[0].numpy())


def test_ir_holds_the_compressed_representations(variant):
    model = load_model(variant["ckpt"], cluster_file=variant["cls"])
    att = model.blocks[0].att.lin
    assert all(att[n].kind == "lowrank" for n in ("receptance", "key", "value", "gate"))
    assert att["output"].kind == "dense"
    lr = att["key"].weight
    assert (lr.act, lr.diag is not None) == (("relu2", True) if "x059" in variant["name"] or "x0594" in variant["name"]
                                             else (None, False))
    ffn = model.blocks[1].ffn
    assert ffn.lin["receptance"].kind == "lowrank"
    assert (ffn.sparse is not None) == ("sparse" in variant["name"])
    if "x0594" in variant["name"]:
        assert ffn.lin["key"].kind == ffn.lin["value"].kind == "lowrank" and ffn.lin["key"].weight.act == "relu2"
        assert ffn.sparse.q_codes is None      # the quantised-key predictor needs a dense key
    elif ffn.sparse is not None:
        assert ffn.sparse.q_codes.dtype == np.uint8 and set(np.unique(ffn.sparse.q_codes)) <= {0, 1}
    assert model.head.kind == ("clustered" if variant["cls"] else "dense")


def test_steps_match_reference(variant):
    m, state = variant["m"], None
    for i, t in enumerate(variant["tokens"]):
        logits, state = m.forward([t], state)
        ref = variant["ref"][i]
        diff = float(np.abs(logits - ref).max())
        assert diff <= bound(ref), f"{variant['name']} token {i}: {diff:.3g} > {bound(ref):.3g}"
    variant["step_state"] = state


@pytest.mark.parametrize("chunks", [[32], [1, 13, 18]])
def test_prefill_matches_reference_and_steps(variant, chunks):
    m, toks, state, pos = variant["m"], variant["tokens"], None, 0
    for c in chunks:
        logits, state = m.forward(toks[pos:pos + c], state)
        pos += c
        ref = variant["ref"][pos - 1]
        assert float(np.abs(logits - ref).max()) <= bound(ref)
    st = variant.get("step_state")
    if st is not None:
        np.testing.assert_allclose(state.wkv, st.wkv, rtol=0, atol=1e-5 * max(1.0, float(np.abs(st.wkv).max())))
        np.testing.assert_allclose(state.shift, st.shift, rtol=0, atol=1e-5)


def test_compressions_change_the_output(variant):
    """The sparse FFN and the clustered head are lossy: the reference without them differs (so the parity
    above is not vacuous)."""
    if "sparse" not in variant["name"] and not variant["cls"]:
        pytest.skip("lossless variant")
    dense, _ = RWKV5.from_state_dict(variant["sd"], LiteOptions(sparse_ffn=False))(torch.tensor([variant["tokens"]]))
    assert float(np.abs(dense[0].numpy() - variant["ref"]).max()) > 100 * bound(variant["ref"])


def test_full_rank_svd_factorisation_equals_dense(tmp_path):
    """A checkpoint factorised by exact SVD at full rank (x058 form: W = W2 W1) gives the dense logits."""
    sd = random_v5_state_dict(n_layer=2, n_embd=64, head_size=32, vocab_size=V, seed=11)
    fact = dict(sd)
    for i in range(2):
        for n in ATT + ("ffn.receptance",):
            k = f"blocks.{i}.{n}.weight"
            U, S, Vt = torch.linalg.svd(fact.pop(k).double())
            fact[f"blocks.{i}.{n}1.weight"] = (S.sqrt()[:, None] * Vt).float()    # (R, C)
            fact[f"blocks.{i}.{n}2.weight"] = (U * S.sqrt()).float()              # (C, R)
    dense_m = compile_model(model_from_state_dict(sd), tmp_path / "dense")
    fm = model_from_state_dict(fact)
    assert fm.blocks[1].att.lin["key"].kind == "lowrank" and fm.blocks[1].att.lin["key"].weight.rank == 64
    fact_m = compile_model(fm, tmp_path / "fact")
    toks = np.random.default_rng(5).integers(0, V, 16).tolist()
    a, sa = dense_m.forward(toks)
    b, sb = fact_m.forward(toks)
    assert float(np.abs(a - b).max()) <= bound(a)
    np.testing.assert_allclose(sa.wkv, sb.wkv, rtol=0, atol=1e-4 * max(1.0, float(np.abs(sa.wkv).max())))


def lite_model(tmp_path, **kw):
    sd = random_v5_state_dict(n_layer=2, n_embd=64, head_size=32, vocab_size=V, seed=13, mlp_dim=16,
                              head_clusters=K, **kw)
    labels = np.random.default_rng(8).integers(0, K, V)
    np.save(tmp_path / "cls.npy", labels)
    return sd, labels, model_from_state_dict(sd, cluster_file=tmp_path / "cls.npy")


def test_sparse_ffn_that_keeps_every_unit_is_the_dense_ffn(tmp_path):
    sd, _, model = lite_model(tmp_path)
    dense_model = model_from_state_dict(sd)                      # dense head: look at the FFN alone
    model.head = dense_model.head
    for blk in dense_model.blocks:
        blk.ffn.sparse = None
    dense = compile_model(dense_model, tmp_path / "dense")
    for blk in model.blocks:
        blk.ffn.sparse.mlp_threshold = -1.0                       # sigmoid(.) > -1: every unit predicted
    allm = compile_model(model, tmp_path / "all")
    toks = np.random.default_rng(2).integers(0, V, 12).tolist()
    a, _ = dense.forward(toks)
    b, _ = allm.forward(toks)
    assert float(np.abs(a - b).max()) <= bound(a)


def test_sparse_ffn_is_sparse(tmp_path):
    """With RWKV-Lite's thresholds the predictors keep a minority of the units (the point of it)."""
    from rwkvc.reference.v5 import ffn_active
    sd, _, model = lite_model(tmp_path)
    ref = RWKV5.from_state_dict(sd, LiteOptions())
    xk = torch.randn(1, 16, 64)
    act = ffn_active(xk, ref.blocks[0].ffn.key.weight, ref.blocks[0].mlp.fc1.weight, ref.blocks[0].mlp.fc2.weight,
                     ref.lite)
    frac = float(act.float().mean())
    assert 0.05 <= frac <= 0.6, frac


def test_clustered_head_with_every_cluster_is_the_dense_head(tmp_path):
    sd, labels, model = lite_model(tmp_path)
    model.head.weight.min_k = K                                   # every cluster exact
    for blk in model.blocks:
        blk.ffn.sparse = None
    dense_model = model_from_state_dict(sd)
    for blk in dense_model.blocks:
        blk.ffn.sparse = None
    np.testing.assert_array_equal(model.head.weight.to_dense(), dense_model.head.weight.w)
    a, _ = compile_model(dense_model, tmp_path / "dense").forward([5, 6, 7])
    b, _ = compile_model(model, tmp_path / "all").forward([5, 6, 7])
    assert float(np.abs(a - b).max()) <= bound(a)


def test_clustered_head_is_exact_on_chosen_clusters(tmp_path):
    sd, labels, model = lite_model(tmp_path)
    for blk in model.blocks:
        blk.ffn.sparse = None
    dense_model = model_from_state_dict(sd)
    for blk in dense_model.blocks:
        blk.ffn.sparse = None
    a, _ = compile_model(dense_model, tmp_path / "dense").forward([9, 10, 11])
    b, _ = compile_model(model, tmp_path / "hh").forward([9, 10, 11])
    exact = np.isclose(a, b, rtol=0, atol=bound(a))
    by_cluster = [exact[labels == c] for c in range(K)]
    # a cluster is either exact on all its tokens or approximated on all of them (one shared value)
    for c, ex in enumerate(by_cluster):
        assert ex.all() or not ex.any() or (labels == c).sum() == 1, c
    n_exact = sum(bool(ex.all()) for ex in by_cluster)
    assert 3 <= n_exact < K                                        # at least min_k clusters exact, not all


def test_cluster_file_errors(tmp_path):
    sd = random_v5_state_dict(n_layer=1, n_embd=64, head_size=32, vocab_size=V, head_clusters=K)
    np.save(tmp_path / "short.npy", np.zeros(V - 1, np.int64))
    with pytest.raises(RwkvcError, match="has 999 cluster labels but the model's vocabulary has 1000"):
        model_from_state_dict(sd, cluster_file=tmp_path / "short.npy")
    np.save(tmp_path / "big.npy", np.full(V, K, np.int64))
    with pytest.raises(RwkvcError, match=f"cluster id {K} is outside 0..{K - 1}"):
        model_from_state_dict(sd, cluster_file=tmp_path / "big.npy")
    with pytest.raises(RwkvcError, match="no such cluster file"):
        model_from_state_dict(sd, cluster_file=tmp_path / "missing.npy")
    plain = random_v5_state_dict(n_layer=1, n_embd=64, head_size=32, vocab_size=V)
    np.save(tmp_path / "ok.npy", np.zeros(V, np.int64))
    with pytest.raises(RwkvcError, match="no hierarchical head"):
        model_from_state_dict(plain, cluster_file=tmp_path / "ok.npy")
    # without a cluster file the head stays dense
    assert model_from_state_dict(sd).head.kind == "dense"


def test_unsupported_and_broken_lite_keys(tmp_path):
    sd = random_v5_state_dict(n_layer=1, n_embd=64, head_size=32, vocab_size=V,
                              factorised=(("ffn.key", 16, False), ("ffn.value", 16, False)))
    bad = dict(sd, **{"blocks.0.ffn.key_diag": torch.ones(64)})
    with pytest.raises(RwkvcError, match=r"'blocks.0.ffn.key_diag': a diagonal term on the non-square"):
        model_from_state_dict(bad)
    sd = random_v5_state_dict(n_layer=1, n_embd=64, head_size=32, vocab_size=V, factorised=(("att.key", 16, True),))
    broken = {k: v for k, v in sd.items() if k != "blocks.0.att.key2.weight"}
    with pytest.raises(RwkvcError, match=r"'blocks.0.att.key2.weight'"):
        model_from_state_dict(broken)
    wrong = dict(sd, **{"blocks.0.att.key2.weight": torch.zeros(64, 8)})
    with pytest.raises(RwkvcError, match=r"'blocks.0.att.key2.weight' has shape \(64, 8\), expected \(64, 16\)"):
        model_from_state_dict(wrong)


def test_inspect_reports_lite_compressions(variant):
    from rwkvc.inspect import inspect_checkpoint
    from pathlib import Path
    info = inspect_checkpoint(Path(variant["ckpt"]))
    assert info["version"] == "v5.2"
    comp = info["compressions"]
    assert comp["low_rank"]["ranks"]
    assert ("sparse_ffn" in comp) == ("sparse" in variant["name"])
    assert ("hierarchical_head" in comp) == bool(variant["cls"])
    assert "RWKV-Lite" in info["_text"]


def test_cli_compile_with_cluster_file(variant, tmp_path):
    """`rwkvc compile --cluster-file` gives the same artifact behaviour as the Python path."""
    import json
    import subprocess
    import sys
    if not variant["cls"]:
        pytest.skip("variant without a hierarchical head")
    r = subprocess.run([sys.executable, "-m", "rwkvc.cli", "compile", str(variant["ckpt"]), "-o", str(tmp_path / "a"),
                        "-q", "--cluster-file", str(variant["cls"])], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    import rwkvc
    got, _ = rwkvc.load(tmp_path / "a").forward(variant["tokens"])
    want, _ = variant["m"].forward(variant["tokens"])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * max(1.0, float(np.abs(want).max())))
    inspect = json.loads(subprocess.run([sys.executable, "-m", "rwkvc.cli", "inspect", str(tmp_path / "a"), "--json"],
                                        capture_output=True, text=True).stdout)
    assert inspect["target"] == "cpu"
