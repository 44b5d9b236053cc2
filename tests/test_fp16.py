"""float16 artifacts (cpu target, --dtype float16): weights and activations in fp16 with the official
package's layer rescaling, recurrences in float32. A 24-layer model stays finite and within 1e-2 (relative
to the largest fp32 logit) of the float32 artifact, also when its residual stream would overflow fp16."""
import json

import numpy as np
import pytest
import torch

import rwkvc
from rwkvc.targets import onnx as lowering
from rwkvc.targets.onnx import LoweringPolicy
from rwkvc.testing import (random_v4_state_dict, random_v5_state_dict, random_v6_state_dict, random_v7_state_dict,
                           save_state_dict)

L = 24
MAKERS = {
    "v4": lambda seed: random_v4_state_dict(n_layer=L, n_embd=64, vocab_size=500, seed=seed),
    "v5.2": lambda seed: random_v5_state_dict(n_layer=L, n_embd=64, head_size=32, vocab_size=500, seed=seed),
    "v6": lambda seed: random_v6_state_dict(n_layer=L, n_embd=64, head_size=32, vocab_size=500, dim_maa=16,
                                            dim_decay=32, seed=seed),
    "v7": lambda seed: random_v7_state_dict(n_layer=L, n_embd=64, head_size=32, vocab_size=500, seed=seed),
}
TOKENS = np.random.default_rng(0).integers(0, 500, 16).tolist()


def rel(a, b):
    return float(np.abs(a - b).max()) / max(1.0, float(np.abs(b).max()))


def compare(tmp_path, sd, name, tol=1e-2):
    ckpt = save_state_dict(sd, tmp_path / f"{name}.pth")
    m32 = rwkvc.load(rwkvc.compile(ckpt, tmp_path / f"{name}-fp32"))
    m16 = rwkvc.load(rwkvc.compile(ckpt, tmp_path / f"{name}-fp16", dtype="float16"))
    assert m16.manifest["dtype"] == "float16"
    s32 = s16 = None
    for t in TOKENS[:8]:                                   # token by token
        a, s32 = m32.forward([t], s32)
        b, s16 = m16.forward([t], s16)
        assert np.isfinite(b).all() and b.dtype == np.float32
        assert rel(b, a) <= tol, f"{name} step: {rel(b, a):.3g}"
    a, s32 = m32.forward(TOKENS[8:], s32)                   # and a prefill
    b, s16 = m16.forward(TOKENS[8:], s16)
    assert np.isfinite(b).all() and np.isfinite(s16.wkv).all() and np.isfinite(s16.shift).all()
    assert rel(b, a) <= tol, f"{name} prefill: {rel(b, a):.3g}"
    assert rel(s16.wkv, s32.wkv) <= tol and rel(s16.shift, s32.shift) <= tol     # states are interchangeable
    w32 = (tmp_path / f"{name}-fp32" / "weights.bin").stat().st_size
    w16 = (tmp_path / f"{name}-fp16" / "weights.bin").stat().st_size
    assert w16 < 0.6 * w32
    return a


@pytest.mark.parametrize("version", list(MAKERS))
def test_fp16_24_layers_close_to_fp32(tmp_path, version):
    compare(tmp_path, MAKERS[version](seed=5), version)


def residual_max(sd) -> float:
    """The largest |x| in the float32 residual stream of the v5 reference over TOKENS."""
    from rwkvc.reference.v5 import RWKV5
    ref = RWKV5.from_state_dict(sd)
    st = ref.zero_state()
    with torch.no_grad():
        x = ref.blocks[0].ln0(ref.emb(torch.tensor([TOKENS])))
        top = 0.0
        for i, blk in enumerate(ref.blocks):
            x = x + blk.att(blk.ln1(x), st.shift[i, 0], st.wkv[i])[0]
            x = x + blk.ffn(blk.ln2(x), st.shift[i, 1])[0]
            top = max(top, float(x.abs().max()))
    return top


def test_rescale_keeps_an_overflowing_residual_finite(tmp_path):
    """Outputs scaled up so the fp32 residual passes fp16's 65504: the rescaled fp16 artifact stays finite.
    It is less close than a normal model (1e-1): with residual entries near 1e4, fp16's 11-bit mantissa
    (a step of 8) drops the small contributions fp32 keeps; the rescale prevents overflow, not that."""
    sd = MAKERS["v5.2"](seed=6)
    for i in range(L):
        for k in (f"blocks.{i}.att.output.weight", f"blocks.{i}.ffn.value.weight"):
            sd[k] = sd[k] * 12000
    assert residual_max(sd) > 65504
    compare(tmp_path, sd, "big", tol=1e-1)


def test_without_rescale_the_same_model_overflows(tmp_path):
    """The control for the test above: emitted with rescale_every=0, fp16 overflows to inf/NaN."""
    from rwkvc.frontend import model_from_state_dict
    from rwkvc.runtimes.onnxruntime import OrtRuntime
    sd = MAKERS["v5.2"](seed=6)
    for i in range(L):
        for k in (f"blocks.{i}.att.output.weight", f"blocks.{i}.ffn.value.weight"):
            sd[k] = sd[k] * 20000
    model = model_from_state_dict(sd)
    results = {}
    for every in (0, 6):
        d = tmp_path / f"every{every}"
        d.mkdir()
        files = lowering.emit(model, str(d), dtype=np.float16, policy=LoweringPolicy(rescale_every=every))
        rt = OrtRuntime(d, {"entry_points": files, "providers": ["CPUExecutionProvider"]})
        logits, _ = rt.forward(np.array(TOKENS), rwkvc.ir.State.zeros(model.config))
        results[every] = bool(np.isfinite(logits).all())
    assert results == {0: False, 6: True}


def test_rescale_plan():
    cfg = rwkvc.ir.ModelConfig("5.2", 24, 64, 32, 500, 224)
    plan = lowering.rescale_plan(cfg, np.float16)
    assert "blocks.5.att.output" not in plan and plan["blocks.6.att.output"] == 2
    assert plan["blocks.23.ffn.value"] == 8 and plan["blocks.12.att.output"] == 4
    assert lowering.rescale_plan(cfg, np.float32) == {}
    assert lowering.rescale_plan(rwkvc.ir.ModelConfig("7", 24, 64, 32, 500, 224), np.float16) == plan


def test_fp16_weights_are_rescaled_in_the_artifact(tmp_path):
    sd = MAKERS["v4"](seed=7)
    ckpt = save_state_dict(sd, tmp_path / "m.pth")
    art = rwkvc.compile(ckpt, tmp_path / "a16", dtype="float16")
    import onnx
    m = onnx.load(str(art / "step.onnx"), load_external_data=False)
    ext = {t.name: {e.key: e.value for e in t.external_data} for t in m.graph.initializer if t.external_data}
    raw = (art / "weights.bin").read_bytes()

    def tensor(name, shape):
        e = ext[name]
        return np.frombuffer(raw, np.float16, int(e["length"]) // 2, int(e["offset"])).reshape(shape)

    w = sd["blocks.18.att.output.weight"].numpy().T                           # stored transposed
    np.testing.assert_allclose(tensor("blocks.18.att.output.wT", w.shape), (w / 8).astype(np.float16), rtol=0, atol=0)
    w0 = sd["blocks.0.att.output.weight"].numpy().T
    np.testing.assert_allclose(tensor("blocks.0.att.output.wT", w0.shape), w0.astype(np.float16), rtol=0, atol=0)
    assert json.loads((art / "manifest.json").read_text())["dtype"] == "float16"


def test_fp16_rwkv7_cuda_artifact_defaults_to_fp16(tmp_path):
    """The cuda target computes in float16 wherever the fp16 lowering exists, RWKV-7 included."""
    sd = random_v7_state_dict(n_layer=2, n_embd=64, head_size=32, vocab_size=300)
    art = rwkvc.compile(save_state_dict(sd, tmp_path / "v7.pth"), tmp_path / "out", target="cuda")
    assert json.loads((art / "manifest.json").read_text())["dtype"] == "float16"
