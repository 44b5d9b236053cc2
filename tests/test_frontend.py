"""Frontend: safetensors input, and models whose weights exceed 2 GB (ONNX external data)."""
import numpy as np
import pytest
import torch

import rwkvc
from rwkvc.frontend import load_model
from rwkvc.testing import random_v7_state_dict


def test_safetensors_equals_pth(tmp_path):
    from safetensors.torch import save_file
    sd = random_v7_state_dict(n_layer=2, n_embd=64, head_size=32, vocab_size=500, dtype="bf16", seed=5)
    torch.save(sd, tmp_path / "m.pth")
    save_file(sd, str(tmp_path / "m.safetensors"))
    a = rwkvc.load(rwkvc.compile(tmp_path / "m.pth", tmp_path / "a"))
    b = rwkvc.load(rwkvc.compile(tmp_path / "m.safetensors", tmp_path / "b"))
    toks = list(range(1, 40))
    np.testing.assert_array_equal(a.forward(toks)[0], b.forward(toks)[0])
    assert str(load_model(tmp_path / "m.safetensors")) == str(load_model(tmp_path / "m.pth"))


def test_ir_is_printable_and_typed(tmp_path):
    sd = random_v7_state_dict(n_layer=2, n_embd=64, head_size=32, vocab_size=500)
    torch.save(sd, tmp_path / "m.pth")
    m = load_model(tmp_path / "m.pth")
    text = str(m)
    assert "RWKV-v7" in text and "block 1" in text and "receptance" in text and "dense 64x64" in text
    kinds = {lin.kind for lin in m.linears()}
    assert kinds == {"dense"}
    assert m.config.state_shapes() == {"shift": (2, 2, 64), "wkv": (2, 2, 32, 32)}


@pytest.mark.slow
def test_model_over_2gb(tmp_path):
    """6 layers x C=2048 with a 65536 vocabulary: 2.3 GB of fp32 weights in the artifact."""
    from rwkvc.reference.v7 import RWKV7, config_from_state_dict
    sd = random_v7_state_dict(n_layer=6, n_embd=2048, head_size=64, vocab_size=65536, dtype="fp16", seed=9)
    torch.save(sd, tmp_path / "big.pth")
    art = rwkvc.compile(tmp_path / "big.pth", tmp_path / "art")
    assert (art / "weights.bin").stat().st_size > 2 ** 31
    toks = [1, 500, 20000, 65535]
    logits, _ = rwkvc.load(art, threads=2).forward(toks)
    model = RWKV7(config_from_state_dict(sd))
    model.load_state_dict({k: v.float() for k, v in sd.items()})
    del sd
    with torch.no_grad():
        ref = model(torch.tensor([toks]), last_only=True)[0][0].numpy()
    assert np.isfinite(logits).all()
    assert float(np.abs(logits - ref).max()) <= 1e-4 * max(1.0, float(np.abs(ref).max()))
