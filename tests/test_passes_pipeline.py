"""The compression passes on a small random RWKV-7: recipes and their errors, every pass's lowering
against rwkvc's IR-level simulation (rwkvc.calib), the lossless settings, byte accounting, the CLI."""
import json
import subprocess

import numpy as np
import pytest

import rwkvc
from rwkvc.artifact import compile_to_dir
from rwkvc.bench import weight_traffic
from rwkvc.calib import IRRunner, ir_logits, load_tokens
from rwkvc.errors import RwkvcError
from rwkvc.frontend import load_model
from rwkvc.passes import PASSES, PassContext
from rwkvc.passes.presets import PRESETS, load_recipe_file, resolve
from rwkvc.pipeline import parse_recipe, run_passes
from rwkvc.targets import get_target
from rwkvc.testing import save_random_v7

from helpers import rwkvc_cmd

V = 1000
T = 24


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("passes")
    return save_random_v7(d / "m.pth", n_layer=2, n_embd=128, head_size=64, vocab_size=V, seed=3,
                          dims={"w": 32, "a": 32, "v": 32, "g": 64})


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(5).integers(0, V, T)


@pytest.fixture(scope="module")
def calib():
    return np.random.default_rng(6).integers(0, V, 384)


@pytest.fixture(scope="module")
def dense_logits(ckpt, tokens):
    return ir_logits(load_model(ckpt), tokens)


def artifact_logits(path, tokens):
    m = rwkvc.load(path)
    st, out = None, []
    for t in tokens:
        lg, st = m.forward([int(t)], st)
        out.append(lg)
    return np.stack(out)


def compiled(ckpt, recipe, calib, tmp_path):
    model = run_passes(load_model(ckpt), parse_recipe(recipe), PassContext(calib_tokens=calib, progress=False))
    path = compile_to_dir(model, get_target("cpu"), tmp_path / "art", force=True)
    return model, path


def tol(ref):
    return 1e-4 * max(1.0, float(np.abs(ref).max()))


# ------------------------------------------------------------------------------------------------
# recipes


def test_registry_and_recipe_errors():
    assert {"int8", "int4", "svd", "sparse-ffn", "hhead", "lazy-emb"} <= set(PASSES)
    cases = {
        "nope": "unknown pass 'nope'",
        "int4(group=33)": "out of range",
        "int4(groop=32)": "unknown argument 'groop'",
        "svd(rank=abc)": "is not a float",
        "int8,int8": "appears twice",
        "int4,svd": "cannot run after int4",
        "int8,sparse-ffn": "cannot run after int8",
        "hhead(p=0)": "out of range",
        "svd(targets=att.q)": "out of range",
        "int8(method=magic)": "out of range",
        "lazy-emb(storage=int2)": "out of range",
    }
    for text, msg in cases.items():
        with pytest.raises(RwkvcError, match=msg.replace("(", r"\(")):
            parse_recipe(text)
    r = parse_recipe("svd(rank=0.25),sparse-ffn(recall=0.99),hhead(k=200,p=0.95),int4(group=32),lazy-emb")
    assert [n for n, _ in r] == ["svd", "sparse-ffn", "hhead", "int4", "lazy-emb"]
    assert r[3][1]["group"] == 32 and r[2][1]["k"] == 200
    for name in PRESETS:
        parse_recipe(resolve(preset_name=name)[0])
    with pytest.raises(RwkvcError, match="unknown preset"):
        resolve(preset_name="tiny")
    with pytest.raises(RwkvcError, match="give one of"):
        resolve("int8", preset_name="int8")


def test_recipe_file(tmp_path):
    (tmp_path / "a.toml").write_text('passes = "svd(rank=0.5),int8"\ncalib = "c.txt"\n')
    text, calib = load_recipe_file(tmp_path / "a.toml")
    assert text == "svd(rank=0.5),int8" and calib == str(tmp_path / "c.txt")
    (tmp_path / "b.toml").write_text('[[pass]]\nname = "svd"\nrank = 0.5\ntargets = "att"\n[[pass]]\nname = "int4"\n'
                                     'group = 64\n')
    text, _ = load_recipe_file(tmp_path / "b.toml")
    assert parse_recipe(text)[1] == ("int4", {**parse_recipe("int4")[0][1], "group": 64})
    (tmp_path / "c.toml").write_text('passes = "int8"\npreset = "int4"\n')
    with pytest.raises(RwkvcError, match="exactly one"):
        load_recipe_file(tmp_path / "c.toml")
    (tmp_path / "d.toml").write_text('passes = [1, 2\n')
    with pytest.raises(RwkvcError, match="not a valid TOML"):
        load_recipe_file(tmp_path / "d.toml")


# ------------------------------------------------------------------------------------------------
# lossless settings give the dense logits


@pytest.mark.parametrize("recipe", ["svd(rank=1.0)", "hhead(k=16,p=1.0,steps=20,tokens=128)",
                                    "sparse-ffn(threshold=0)", "lazy-emb(storage=float32)"])
def test_lossless(ckpt, tokens, calib, dense_logits, tmp_path, recipe):
    model, path = compiled(ckpt, recipe, calib, tmp_path)
    got = artifact_logits(path, tokens)
    assert np.abs(got - dense_logits).max() <= tol(dense_logits)
    # and the prefill graph agrees with the step graph
    last, _ = rwkvc.load(path).forward(tokens.tolist())
    assert np.abs(last - got[-1]).max() <= tol(dense_logits)


# ------------------------------------------------------------------------------------------------
# each lowering computes what the IR says (rwkvc.calib's simulation of the same representations)


@pytest.mark.parametrize("recipe,bound", [
    ("int4(group=32,accuracy_level=0)", 1e-4),
    ("int4(group=128,accuracy_level=0,targets=att+ffn)", 1e-4),
    ("svd(rank=0.5),int4(group=32,accuracy_level=0)", 1e-4),
    ("int4(method=gptq,accuracy_level=0)", 1e-4),
    ("int4(method=awq,accuracy_level=0)", 1e-4),
    ("int8", 0.05),                                       # activations are quantised to 8 bits at run time
    ("int4(group=32)", 0.05),                              # accuracy_level 4: 8-bit activations
    ("sparse-ffn(recall=0.95,steps=50,quant=0,tokens=256,max_fraction=1)", 1e-4),
    ("sparse-ffn(recall=0.95,steps=50,quant=0,tokens=256,max_fraction=1),int8", 0.05),
    ("lazy-emb(storage=int8)", 0.05),
    ("hhead(k=16,p=0.9,min_k=2,steps=50,tokens=256)", 1e-4),
    ("hhead(k=16,p=0.9,min_k=2,steps=50,tokens=256,prior=uniform)", 1e-4),
])
def test_lowering_matches_ir(ckpt, tokens, calib, tmp_path, recipe, bound):
    model, path = compiled(ckpt, recipe, calib, tmp_path)
    sim = ir_logits(model, tokens)
    got = artifact_logits(path, tokens)
    assert np.abs(got - sim).max() <= bound * max(1.0, float(np.abs(sim).max())), recipe
    check_reports(model, recipe)


def check_reports(model, recipe):
    """Each pass's report: its name and the parameters it ran with (defaults filled in), the bytes and counts
    it states measured on the model it produced, and a summary line that says those numbers."""
    from rwkvc.passes.common import fmt_bytes, nbytes, selected
    assert [(r["name"], r["args"]) for r in model.passes] == parse_recipe(recipe)
    V, C, F = model.config.vocab_size, model.config.n_embd, model.config.ffn_dim
    lins = {lin.name: lin for lin in model.linears()}
    for r in model.passes:
        name, args = r["name"], r["args"]
        if name in ("int4", "int8"):
            bits = int(name[3])
            chosen = [lin.name for *_, lin in selected(model, args["targets"], args["layers"])]
            assert r["matrices"] == len(r["names"]) == len(chosen) and r["names"] == chosen
            assert args["targets"] != "all" or len(chosen) == len(lins)   # all: every matrix, the head too
            held = sum(nbytes(lins[n].weight.rows if lins[n].kind == "clustered" else lins[n].weight)
                       for n in r["names"])
            assert r["bytes_after"] == held and r["bytes_before"] > (4 if bits == 4 else 2) * held
            if len(model.passes) == 1:   # the dense float32 model went in
                assert r["bytes_before"] == 4 * sum(int(np.prod(lins[n].weight.shape)) for n in r["names"])
            what = f"group {args['group']}, " if bits == 4 else "per-channel, "
            assert r["summary"] == (f"{r['matrices']} matrices to int{bits} ({what}{args['method']}): "
                                    f"{fmt_bytes(r['bytes_before'])} -> {fmt_bytes(r['bytes_after'])} "
                                    f"({r['bytes_before'] / r['bytes_after']:.2f}x)")
            assert ("calibration" in r) == (args["method"] != "rtn")
        elif name == "svd":
            assert set(r["ranks"].values()) == {int(args["rank"] * C)}
            assert r["bytes_before"] == 4 * sum(int(np.prod(lins[n].weight.shape)) for n in r["ranks"])
            assert r["summary"] == (f"{r['matrices']} matrices factorised (rank {args['rank']:g}; ranks "
                                    f"{int(args['rank'] * C)}..{int(args['rank'] * C)}): {fmt_bytes(r['bytes_before'])}"
                                    f" -> {fmt_bytes(r['bytes_after'])} ({r['bytes_before'] / r['bytes_after']:.2f}x), "
                                    f"mean relative error {r['mean_relative_error']:.3f}")
        elif name == "sparse-ffn":
            L = model.config.n_layer
            assert r["ffn_bytes"] == L * 2 * F * C * 4 and r["dense_layers"] == []
            assert r["predictor_bytes"] == sum(b.ffn.sparse.stored_bytes() for b in model.blocks)
            assert 0 < r["mean_fraction"] < 1 and r["ffn_bytes_read_per_token"] < r["ffn_bytes"]
            assert r["summary"] == (f"{L} channel-mixes sparse (recall {args['recall']:g}): {r['mean_fraction']:.1%} "
                                    f"of FFN rows read on average; FFN bytes read per token {fmt_bytes(r['ffn_bytes'])}"
                                    f" -> {fmt_bytes(r['ffn_bytes_read_per_token'])} (predictors "
                                    f"{fmt_bytes(r['predictor_bytes'])})")
        elif name == "lazy-emb":
            row = {"float32": 4 * C, "float16": 2 * C, "int8": C + 4}[args["storage"]]
            assert r["storage"] == args["storage"] and r["bytes_read_per_token"] == row
            assert r["table_bytes_dense_f32"] == V * C * 4 and r["table_bytes_on_disk"] == V * row
            assert r["summary"] == (f"embedding {V}x{C} memory-mapped, rows in {args['storage']}: resident "
                                    f"{fmt_bytes(V * C * 4)} -> rows touched only ({row} B per token read)")
        elif name == "hhead":
            ch = model.head.weight
            assert r["clusters"] == args["k"] == len(ch.bounds) - 1 and r["head_bytes"] == V * C * 4
            assert (r["top_p"], r["min_k"]) == (args["p"], args["min_k"]) == (ch.top_p, ch.min_k)
            sizes = np.diff(ch.bounds)
            assert r["cluster_sizes"] == [int(sizes.min()), int(np.median(sizes)), int(sizes.max())]
            assert r["head_bytes_read_per_token"] < r["head_bytes"] and 0 < r["rows_fraction_read"] < 1
            assert r["summary"] == (f"head clustered into {args['k']} (sizes {sizes.min()}..{sizes.max()}), cluster "
                                    f"head KL {r['distill_kl']:.4f}; {r['clusters_chosen']:.1f} clusters = "
                                    f"{r['rows_fraction_read']:.1%} of head rows read per token on calibration "
                                    f"text; head bytes read {fmt_bytes(V * C * 4)} -> "
                                    f"{fmt_bytes(r['head_bytes_read_per_token'])}")
        else:
            raise AssertionError(f"no report check for pass {name}")


def test_reports_and_bytes(ckpt, calib, tmp_path):
    model, path = compiled(ckpt, "svd(rank=0.25),int4(group=32),lazy-emb(storage=int8)", calib, tmp_path)
    svd_r, q_r, e_r = model.passes
    assert svd_r["bytes_after"] < svd_r["bytes_before"] and set(svd_r["ranks"].values()) == {32}
    assert q_r["bytes_after"] * 5 < q_r["bytes_before"]
    assert e_r["bytes_read_per_token"] == 128 + 4
    kinds = {lin.kind for lin in model.linears()}
    assert kinds <= {"int4", "factored"} and model.emb.weight.kind == "lazy"
    man = json.loads((path / "manifest.json").read_text())
    assert [p["name"] for p in man["passes"]] == ["svd", "int4", "lazy-emb"]
    dense = compile_to_dir(load_model(ckpt), get_target("cpu"), tmp_path / "dense", force=True)
    wq, wd = weight_traffic(path), weight_traffic(dense)
    assert wq["weight_bytes_resident"] * 5 < wd["weight_bytes_resident"]
    assert wq["weight_bytes_read_per_token_by_part"]["embedding"] == 128 + 4
    # the packed weights stay packed in the file: no float copy of a quantised matrix (the step reads them
    # with MatMulNBits or rwkvc's kernels over the same bytes, the prefill with MatMulNBits, or both with
    # rwkvc's over the interleaved layout)
    import onnx
    for entry, products in (("step", {"MatMulNBits", "Rwkv7MatVecQ", "Rwkv7MatVecQ16", "Rwkv7MatVecSet"}),
                            ("prefill", {"MatMulNBits", "Rwkv7MatVecQ16"})):
        ops = {n.op_type for n in onnx.load(str(path / f"{entry}.onnx"), load_external_data=False).graph.node}
        assert ops & products and "DequantizeLinear" not in ops


def test_sparse_ffn_reads_only_predicted_rows(ckpt, calib, tmp_path):
    model, path = compiled(ckpt, "sparse-ffn(recall=0.9,steps=50,tokens=256,max_fraction=1)", calib, tmp_path)
    rep = model.passes[-1]
    assert 0 < rep["mean_fraction"] < 1
    run = IRRunner(model)
    list(run.forward(calib[:128], want_logits=False))
    for i in range(2):
        used, total = run.counters[f"ffn.{i}"]
        assert used < total
    import onnx
    rows = {"blocks.0.ffn.key.w", "blocks.0.ffn.value.wT_rows"}
    # the prefill gathers the used rows; the step reads them in rwkvc's fused kernel (or gathers them)
    g = onnx.load(str(path / "prefill.onnx"), load_external_data=False).graph
    assert rows <= {n.input[0] for n in g.node if n.op_type == "Gather"}
    g = onnx.load(str(path / "step.onnx"), load_external_data=False).graph
    fused = [n for n in g.node if n.op_type == "Rwkv7SparseFfnQF32"]
    assert rows <= ({n.input[0] for n in g.node if n.op_type == "Gather"} | {x for n in fused for x in n.input})
    assert weight_traffic(path)["weight_bytes_mapped"] > 0
    # the MLP predictor is stored as int8 codes and scales (no float32 copy), the report counts them so
    sp = model.blocks[0].ffn.sparse
    inits = {i.name: i for i in g.initializer}
    assert inits["blocks.0.ffn.mlp.fc1T.q8"].data_type == onnx.TensorProto.INT8
    assert "blocks.0.ffn.mlp.fc1T" not in inits
    q1, q2 = sp.fc_codes()
    np.testing.assert_array_equal(q1.astype(np.float32) * sp.fc1_scale[:, None], sp.fc1)
    np.testing.assert_array_equal(q2.astype(np.float32) * sp.fc2_scale[:, None], sp.fc2)
    assert rep["predictor_bytes"] == sum(model.blocks[i].ffn.sparse.stored_bytes() for i in range(2))
    codes = sp.q_codes.shape[0] * -(-sp.q_codes.shape[1] * sp.q_bits // 8) if sp.q_codes is not None else 0
    assert sp.stored_bytes() - codes < (sp.fc1.nbytes + sp.fc2.nbytes) / 3   # int8 and scales: ~a quarter


def test_hhead_and_int8_rows(ckpt, tokens, calib, dense_logits, tmp_path):
    model, path = compiled(ckpt, "hhead(k=16,p=0.9,steps=50,tokens=256),int8", calib, tmp_path)
    ch = model.head.weight
    assert ch.kind == "clustered" and ch.rows.kind == "int8" and ch.cluster.kind == "int8"
    assert sorted(ch.order.tolist()) == list(range(V))
    got = artifact_logits(path, tokens)
    assert got.shape == dense_logits.shape and np.isfinite(got).all()


def test_calibration_errors(ckpt):
    model = load_model(ckpt)
    with pytest.raises(RwkvcError, match="outside the model's vocabulary"):
        list(IRRunner(model).forward(np.array([5, V + 3])))
    with pytest.raises(RwkvcError, match="no such file"):
        load_tokens("/nonexistent/calib.txt")


# ------------------------------------------------------------------------------------------------
# the command line


def test_cli_compile_recipe_and_eval(ckpt, tmp_path):
    text = tmp_path / "calib.npy"           # token ids (the random model's vocabulary is small)
    np.save(text, np.random.default_rng(1).integers(0, V, 300))
    (tmp_path / "r.toml").write_text('passes = "svd(rank=0.5),int8(method=gptq),lazy-emb"\n')
    out = tmp_path / "art"
    r = subprocess.run(rwkvc_cmd() + ["compile", str(ckpt), "-o", str(out), "--recipe", str(tmp_path / "r.toml"),
                                      "--calib", str(text), "-q"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    # an impossible recipe fails before any work, with one line
    r = subprocess.run(rwkvc_cmd() + ["compile", str(ckpt), "-o", str(tmp_path / "x"), "--passes", "int4,svd"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "cannot run after int4" in r.stderr and not (tmp_path / "x").exists()
    r = subprocess.run(rwkvc_cmd() + ["eval", str(out), "--data", str(text), "--ref", str(ckpt), "--tokens", "40",
                                      "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["tokens"] == 40 and res["ppl"] > 0 and 0 <= res["top1_agreement"] <= 1 and res["mean_kl"] >= 0
    r = subprocess.run(rwkvc_cmd() + ["bench", str(out), "--tokens", "4", "--prefill", "8", "--repeat", "1"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "read per decoded token" in r.stdout
