"""RWKV-7a "DeepEmbed": the frontend, the reference, the cpu artifact (dense, lazy tables, int8 tables), the
TVM targets and `rwkvc inspect`, against the official `rwkv` package run with RWKV_DE_VERSION=1.

Bound: max |logit diff| <= 1e-4 * max(1, max |reference logit|) (the spine's), token by token and as
prefill chunks. int8 tables (lazy-emb(storage=int8)) are lossy: the artifact equals the reference model whose
merged table rows are the dequantised int8 rows within that bound, and the official logits within 3e-2
relative (measured 3.1e-3 on this model). The official package only reads RWKV_DE_VERSION when it is imported,
so it runs in a subprocess (rwkvc.testing.run_official_many).

Shapes: the official package views a table row as 32 x 32, so the tables are (V, 1024); V = 300, C = 64, two
layers keep them small.
"""
import numpy as np
import pytest
import torch

import rwkvc
from rwkvc.bench import weight_traffic
from rwkvc.errors import RwkvcError
from rwkvc.frontend import model_from_state_dict
from rwkvc.inspect import inspect_path
from rwkvc.testing import random_v7_state_dict, run_official_many, save_state_dict

from helpers import MISSING

L, C, N, V, D = 2, 64, 32, 300, 32
T = 24
CHUNKS = [7, 17]
DE_ENV = {"RWKV_V7_ON": "1", "RWKV_DE_VERSION": "1"}


def bound(ref):
    return 1e-4 * max(1.0, float(np.abs(ref).max()))


def rel(a, b):
    return float(np.abs(np.asarray(a) - b).max()) / max(1.0, float(np.abs(b).max()))


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    d = tmp_path_factory.mktemp("deepembed")
    sd = random_v7_state_dict(n_layer=L, n_embd=C, head_size=N, vocab_size=V, deep_embed=D, dtype="bf16", seed=7)
    ckpt = save_state_dict(sd, d / "m.pth")
    tokens = np.random.default_rng(11).integers(0, V, T).tolist()
    off = run_official_many([(ckpt, tokens, [CHUNKS])], DE_ENV)[0]
    return dict(dir=d, sd=sd, ckpt=ckpt, tokens=tokens, steps=off["steps"], chunks=off["chunks0"], arts={})


def artifact(case, name, target="cpu", passes=None, **options):
    """One compile per (name) for the module."""
    if name not in case["arts"]:
        case["arts"][name] = rwkvc.compile(case["ckpt"], case["dir"] / name, target=target, passes=passes,
                                           options=options or None)
    return case["arts"][name]


def run(art, tokens, **load):
    """(step-by-step logits (T, V), the logits after each prefill chunk, the final step state)."""
    m = rwkvc.load(art, **load)
    st, steps = None, []
    for t in tokens:
        lg, st = m.forward([t], st)
        steps.append(np.array(lg))
    chunk_st, pos, chunks = None, 0, []
    for c in CHUNKS:
        lg, chunk_st = m.forward(tokens[pos:pos + c], chunk_st)
        chunks.append(np.array(lg))
        pos += c
    return np.stack(steps), np.stack(chunks), st, chunk_st, m


def assert_close(got, ref, what):
    for i, (g, r) in enumerate(zip(got, ref)):
        diff = float(np.abs(g - r).max())
        assert diff <= bound(r), f"{what}, row {i}: max |diff| {diff:.3g} > {bound(r):.3g}"


# ----------------------------------------------------------------------------------------------
# frontend


def test_detected_by_keys_with_every_shape_in_the_ir(case):
    from rwkvc.frontend import detect_version
    sd = case["sd"]
    assert detect_version(sd).name == "7a"
    m = model_from_state_dict(sd)
    assert m.config.version == "7a" and all(b.att.version == "7" and b.ffn.version == "7a" for b in m.blocks)
    de = m.blocks[1].ffn.deep
    assert (de.rank, de.table.kind, de.table.shape, de.s1.shape, de.s2.shape, de.s0.shape) == \
        (D, "deepembed", (V, D * D), (C, D), (D, 4 * C), (4 * C,))
    # the merged table is the official load-time merge: s_emb + ln0(emb) @ s_emb_x^T
    e = torch.nn.functional.layer_norm(sd["emb.weight"].float(), (C,), sd["blocks.0.ln0.weight"].float(),
                                       sd["blocks.0.ln0.bias"].float())
    ref = sd["blocks.1.ffn.s_emb.weight"].float() + e @ sd["blocks.1.ffn.s_emb_x.weight"].float().T
    np.testing.assert_allclose(de.table.merged(), ref.numpy(), rtol=1e-5, atol=1e-5)
    # a plain RWKV-7 checkpoint (the same keys less the DeepEmbed ones) stays RWKV-7
    plain = {k: v for k, v in sd.items() if not any(s in k for s in (".s_emb", ".s0", ".s1", ".s2"))}
    assert detect_version(plain).name == "7" and model_from_state_dict(plain).blocks[0].ffn.deep is None


BAD = {
    "missing s2": (lambda sd: sd.pop("blocks.1.ffn.s2"), "missing 'blocks.1.ffn.s2'"),
    "missing s_emb": (lambda sd: sd.pop("blocks.0.ffn.s_emb.weight"), "missing 'blocks.0.ffn.s_emb.weight'"),
    "table width": (lambda sd: sd.update({"blocks.0.ffn.s_emb.weight": torch.zeros(V, 1000)}),
                    "'blocks.0.ffn.s_emb.weight' has shape (300, 1000), expected (300, 1024)"),
    "table rows": (lambda sd: sd.update({"blocks.1.ffn.s_emb.weight": torch.zeros(V - 1, D * D)}),
                   "'blocks.1.ffn.s_emb.weight' has shape (299, 1024), expected (300, 1024)"),
    "s_emb_x": (lambda sd: sd.update({"blocks.1.ffn.s_emb_x.weight": torch.zeros(C, D * D)}),
                "'blocks.1.ffn.s_emb_x.weight' has shape (64, 1024), expected (1024, 64)"),
    "s1": (lambda sd: sd.update({"blocks.0.ffn.s1": torch.zeros(C + 1, D)}),
           "'blocks.0.ffn.s1' has shape (65, 32), expected (64, D)"),
    "s0": (lambda sd: sd.update({"blocks.1.ffn.s0": torch.zeros(1, 1, 3)}),
           "'blocks.1.ffn.s0' has shape (1, 1, 3), expected (1, 1, 256)"),
    "rank": (lambda sd: sd.update({"blocks.1.ffn.s2": torch.zeros(16, 4 * C)}),
             "'blocks.1.ffn.s2' has shape (16, 256), expected (32, 256)"),
    "stray layer": (lambda sd: sd.update({"blocks.5.ffn.s0": torch.zeros(4 * C)}),
                    "unexpected key 'blocks.5.ffn.s0' in an RWKV-7a checkpoint of 2 layers"),
}


@pytest.mark.parametrize("what", list(BAD))
def test_malformed_checkpoint_is_one_clear_error(case, what):
    sd = dict(case["sd"])
    change, words = BAD[what]
    change(sd)
    with pytest.raises(RwkvcError) as e:
        model_from_state_dict(sd)
    msg = str(e.value)
    assert words in msg and "\n" not in msg, msg


def test_cli_names_the_bad_key_in_one_line(case, tmp_path, capsys):
    """`rwkvc compile` (its main, in process): one `error:` line naming the key and the shape, status 2,
    nothing written."""
    from rwkvc.cli import main
    sd = dict(case["sd"])
    sd["blocks.1.ffn.s1"] = torch.zeros(C, 8)
    bad = save_state_dict(sd, tmp_path / "bad.pth")
    with pytest.raises(SystemExit) as e:
        main(["compile", bad, "-o", str(tmp_path / "out"), "-q"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert "blocks.1.ffn.s1" in err[0] and "(64, 32)" in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------
# the reference and the cpu artifact against the official package


def test_reference_matches_official(case):
    from rwkvc.reference.v7 import RWKV7, config_from_state_dict
    sd = case["sd"]
    cfg = config_from_state_dict(sd)
    m = RWKV7(cfg)
    m.load_state_dict({k: v.float() for k, v in sd.items()})
    with torch.no_grad():
        logits, _ = m(torch.tensor([case["tokens"]]))
    assert cfg.deep_embed == D
    assert_close(logits[0].numpy(), case["steps"], "reference")
    # the DeepEmbed multiplier matters: the same weights without it are far outside the bound
    for blk in m.blocks:
        del blk.ffn.s_emb
    with torch.no_grad():
        plain, _ = m(torch.tensor([case["tokens"]]))
    assert rel(plain[0].numpy(), case["steps"]) > 100 * 1e-4


def test_calibration_runner_matches_official(case):
    """rwkvc.calib's IR runner (what calibrating passes such as hhead and gptq run) applies the DeepEmbed
    factor; sparse-ffn, whose lowerings have no place for it, refuses the model before calibrating."""
    from rwkvc.calib import ir_logits
    from rwkvc.passes import PassContext
    from rwkvc.pipeline import parse_recipe, run_passes
    model = model_from_state_dict(case["sd"])
    assert_close(ir_logits(model, case["tokens"]), case["steps"], "IR runner")
    with pytest.raises(RwkvcError, match="DeepEmbed channel-mix"):
        run_passes(model, parse_recipe("sparse-ffn"), PassContext(calib_tokens=np.arange(64), progress=False))


@pytest.mark.parametrize("name,passes,fused", [
    ("dense-fused", None, True), ("lazy-f32-plain", "lazy-emb(storage=float32)", False)])
def test_cpu_artifact_matches_official(case, name, passes, fused):
    art = artifact(case, name, passes=passes, fused=fused)
    steps, chunks, st, st2, m = run(art, case["tokens"])
    assert ("custom_ops" in m.manifest) == fused
    assert_close(steps, case["steps"], f"{name} step")
    assert_close(chunks, case["chunks"], f"{name} prefill {CHUNKS}")
    np.testing.assert_allclose(st2.wkv, st.wkv, rtol=1e-4, atol=1e-4 * max(1, float(np.abs(st.wkv).max())))
    held = m.runtime.held
    deep_held = sorted(k for k in held if ".s_emb." in k)
    if passes is None:     # dense tables: held in memory by the runtime, like the dense embedding
        assert deep_held == [f"blocks.{i}.ffn.s_emb.merged" for i in range(L)]
    else:                  # lazy: memory-mapped, never read into the process
        assert deep_held == [] and "emb.folded" not in held


def test_int8_tables_within_their_bound(case):
    """lazy-emb(storage=int8) on the DeepEmbed tables only: a quarter of the float32 bytes, the numbers of the
    reference with the dequantised rows, the official logits within 3e-2."""
    from rwkvc.reference.v7 import RWKV7, config_from_state_dict
    from rwkvc.weights.deepembed import fold_ln0
    from rwkvc.weights.int8 import dequantize_int8, quantize_int8
    art = artifact(case, "int8", passes="lazy-emb(storage=int8,tables=deep)")
    steps, chunks, *_ = run(art, case["tokens"])
    # the reference whose merged rows are the int8 ones: s_emb := dequant(merged) - ln0(emb) @ s_emb_x^T
    sd = {k: v.float() for k, v in case["sd"].items()}
    model = model_from_state_dict(case["sd"])
    x0 = torch.from_numpy(fold_ln0(model.emb.weight.w, model.ln0))
    for i, blk in enumerate(model.blocks):
        t = blk.ffn.deep.table
        q = torch.from_numpy(dequantize_int8(*quantize_int8(t.merged())))
        sd[f"blocks.{i}.ffn.s_emb.weight"] = q - x0 @ sd[f"blocks.{i}.ffn.s_emb_x.weight"].T
    ref = RWKV7(config_from_state_dict(sd))
    ref.load_state_dict(sd)
    with torch.no_grad():
        want = ref(torch.tensor([case["tokens"]]))[0][0].numpy()
    assert_close(steps, want, "int8 tables against the reference with int8 rows")
    assert_close(chunks, want[[CHUNKS[0] - 1, T - 1]], "int8 tables, prefill")
    assert 1e-4 < rel(steps, case["steps"]) <= 3e-2
    dense = inspect_path(artifact(case, "dense-fused", fused=True))["deep_embed"]
    lazy = inspect_path(art)["deep_embed"]
    assert (dense["storage"], dense["resident"], dense["bytes"]) == (["float32"], True, L * V * D * D * 4)
    assert (lazy["storage"], lazy["resident"], lazy["bytes"]) == (["int8"], False, L * V * (D * D + 4))
    assert lazy["bytes_read_per_token"] == L * (D * D + 4) and dense["bytes_read_per_token"] == L * D * D * 4
    # the graphs read the tables by token (rwkvc.bench.weight_traffic): memory-mapped, one row a token and layer
    wl, wd = weight_traffic(art), weight_traffic(artifact(case, "dense-fused", fused=True))
    assert wl["weight_bytes_mapped"] == L * V * (D * D + 4) and wd["weight_bytes_mapped"] == 0
    assert wd["weight_bytes_resident"] - wl["weight_bytes_resident"] == L * V * D * D * 4
    assert wd["weight_bytes_read_per_token"] - wl["weight_bytes_read_per_token"] == L * (D * D * 4 - (D * D + 4))


def test_inspect_shows_the_tables(case):
    """`rwkvc inspect` (the text it prints) on the checkpoint and on a lazy artifact."""
    text = inspect_path(case["ckpt"])["_text"]
    assert "RWKV-v7a" in text and f"DeepEmbed (RWKV-7a): {L} tables {V}x{D * D} (rank {D}" in text
    assert "deep-embed" in text
    art = artifact(case, "lazy-f32-plain", passes="lazy-emb(storage=float32)", fused=False)
    text = inspect_path(art)["_text"]
    assert f"DeepEmbed tables: {L} x {V}x{D * D} in float32, 2.5 MB (memory-mapped)" in text, text


def test_cuda_artifact_float16_on_the_cpu_provider(case):
    """The cuda target's float16 graphs (layer rescale, the multiplier in float16), run by the CPU provider."""
    art = artifact(case, "cuda", target="cuda")
    m = rwkvc.load(art, providers=["CPUExecutionProvider"])
    assert m.manifest["dtype"] == "float16"
    lg = m.forward(case["tokens"])[0]
    assert rel(lg, case["steps"][-1]) <= 1e-2


# ----------------------------------------------------------------------------------------------
# the TVM targets


needs_toolchain = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")


@pytest.mark.skipif(MISSING is not None and "TVM" in (MISSING or ""), reason=MISSING or "")
def test_tvm_host_int8_tables_equal_the_cpu_artifact(case):
    """tvm-host with the DeepEmbed tables in int8 (memory-mapped): the cpu artifact's numbers."""
    art = artifact(case, "tvm-int8", target="tvm-host", passes="lazy-emb(storage=int8,tables=deep)")
    steps, chunks, *_ = run(art, case["tokens"])
    ref_steps, ref_chunks, *_ = run(artifact(case, "int8", passes="lazy-emb(storage=int8,tables=deep)"), case["tokens"])
    assert_close(steps, ref_steps, "tvm-host int8 tables step")
    assert_close(chunks, ref_chunks, "tvm-host int8 tables prefill")


@needs_toolchain
def test_rpi5_under_qemu_matches_official(case):
    art = artifact(case, "pi", target="rpi5")
    steps, chunks, *_ = run(art, case["tokens"][:8])
    assert_close(steps, case["steps"][:8], "rpi5 step")
    assert_close(chunks[:1], case["chunks"][:1], "rpi5 prefill")
