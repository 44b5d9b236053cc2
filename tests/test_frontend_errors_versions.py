"""Version detection for RWKV-4/5/6 and the frontend's errors on bad checkpoints: a mixture of two
versions' keys, shapes that disagree, missing keys or layers -- each one line naming the key."""
from pathlib import Path

import numpy as np
import pytest
import torch

from rwkvc.errors import RwkvcError
from rwkvc.frontend import detect_version, model_from_state_dict
from rwkvc.testing import (random_v4_state_dict, random_v5_state_dict, random_v6_state_dict, random_v7_state_dict,
                           save_state_dict)

MAKERS = {
    "4": lambda: random_v4_state_dict(n_layer=2, n_embd=64, vocab_size=300),
    "5.0": lambda: random_v5_state_dict(n_layer=2, n_embd=64, head_size=32, vocab_size=300, version="5.0"),
    "5.1": lambda: random_v5_state_dict(n_layer=2, n_embd=64, head_size=32, vocab_size=300, version="5.1"),
    "5.2": lambda: random_v5_state_dict(n_layer=2, n_embd=64, head_size=32, vocab_size=300),
    "6": lambda: random_v6_state_dict(n_layer=2, n_embd=64, head_size=32, vocab_size=300, dim_maa=16, dim_decay=32),
}


def one_line_error(sd, match):
    with pytest.raises(RwkvcError, match=match) as e:
        model_from_state_dict(sd)
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize("version", list(MAKERS))
def test_versions_detected_and_hyper_parameters_inferred(version):
    sd = MAKERS[version]()
    m = model_from_state_dict(sd)
    c = m.config
    assert c.version == version
    assert (c.n_layer, c.n_embd, c.vocab_size) == (2, 64, 300)
    assert c.ffn_dim == sd["blocks.0.ffn.key.weight"].shape[0]
    assert c.head_size == (64 if version == "4" else 32)
    if version == "6":
        assert dict(c.lora) == {"maa": 16, "w": 32}
    assert detect_version(sd).name == version[0]


def test_head_size_inferred_from_decay_shapes():
    sd = random_v5_state_dict(n_layer=1, n_embd=128, head_size=64, vocab_size=300)
    assert model_from_state_dict(sd).config.n_head == 2
    sd = random_v6_state_dict(n_layer=1, n_embd=96, head_size=32, vocab_size=300)
    assert model_from_state_dict(sd).config.n_head == 3


@pytest.mark.parametrize("base, extra, names", [
    ("5.2", "blocks.0.att.time_maa_x", ("v6", "v5", "blocks.0.att.time_maa_x", "blocks.0.att.time_mix_k")),
    ("4", "blocks.0.att.k_k", ("v7", "v4", "blocks.0.att.k_k", "blocks.0.att.time_first")),
    ("6", "blocks.0.att.r_k", ("v7", "v6", "blocks.0.att.r_k", "blocks.0.att.time_maa_x")),
    ("4", "blocks.0.att.time_maa_x", ("v6", "v4", "blocks.0.att.time_maa_x", "blocks.0.att.time_first")),
])
def test_mixed_versions_are_refused_naming_both_keys(base, extra, names):
    sd = MAKERS[base]()
    sd[extra] = torch.zeros(1, 1, 64)
    msg = one_line_error(sd, "mixes keys of RWKV")
    for n in names:
        assert n in msg, (n, msg)


@pytest.mark.parametrize("base, extra", [
    ("6", "blocks.0.att.time_first"),          # a v4/v5.1 key in a v6 file
    ("5.2", "blocks.1.att.time_decay_w1"),     # a v6 key in layer 1 only
    ("4", "blocks.1.att.gate.weight"),         # a v5 key in a v4 file
])
def test_foreign_keys_are_named(base, extra):
    sd = MAKERS[base]()
    sd[extra] = torch.zeros(64, 64)
    one_line_error(sd, f"unexpected key '{extra}' in an RWKV-{base[0]} checkpoint")


@pytest.mark.parametrize("version, key, shape, match", [
    ("4", "blocks.1.att.time_decay", (32,), r"'blocks.1.att.time_decay' has shape \(32,\), expected \(64,\)"),
    ("4", "blocks.1.ffn.key.weight", (128, 64), r"'blocks.1.ffn.key.weight' has shape \(128, 64\), expected \(256, 64\)"),
    ("5.2", "blocks.1.att.time_faaaa", (2, 16), r"'blocks.1.att.time_faaaa' has shape \(2, 16\), expected \(2, 32\)"),
    ("5.2", "head.weight", (299, 64), r"'head.weight' has shape \(299, 64\), expected \(300, 64\)"),
    ("5.1", "blocks.1.att.time_decay", (4,), r"'blocks.1.att.time_decay' has shape \(4,\), expected \(2,\)"),
    ("6", "blocks.1.att.time_maa_w2", (5, 8, 64), r"'blocks.1.att.time_maa_w2' has shape \(5, 8, 64\), expected \(5, 16, 64\)"),
    ("6", "blocks.0.att.time_decay_w2", (16, 64), r"'blocks.0.att.time_decay_w2' has shape \(16, 64\), expected \(32, 64\)"),
    ("6", "blocks.1.att.ln_x.weight", (32,), r"'blocks.1.att.ln_x.weight' has shape \(32,\), expected \(64,\)"),
    ("6", "blocks.0.att.time_faaaa", (3, 32), r"time_faaaa has shape \(3, 32\) but n_embd is 64"),
    ("6", "blocks.0.att.time_maa_w1", (64, 33), r"'blocks.0.att.time_maa_w1' has shape \(64, 33\): its width must be 5 x"),
    ("5.2", "blocks.0.att.time_decay", (3, 32), r"'blocks.0.att.time_decay' has shape \(3, 32\): its first dimension"),
])
def test_disagreeing_shapes_are_named(version, key, shape, match):
    sd = MAKERS[version]()
    sd[key] = torch.zeros(*shape)
    one_line_error(sd, match)


@pytest.mark.parametrize("version, key", [
    ("4", "blocks.1.att.time_first"),
    ("5.2", "blocks.1.att.gate.weight"),
    ("6", "blocks.1.att.time_decay_w1"),
    ("6", "blocks.0.ffn.receptance.weight"),
])
def test_missing_keys_are_named(version, key):
    sd = MAKERS[version]()
    del sd[key]
    one_line_error(sd, f"missing '{key}'")


def test_missing_layer_is_named():
    sd = random_v6_state_dict(n_layer=3, n_embd=64, head_size=32, vocab_size=300)
    sd = {k: v for k, v in sd.items() if not k.startswith("blocks.1.")}
    one_line_error(sd, r"no keys for blocks.1 \(layers 0..2 expected\)")


def test_partial_time_state_is_refused():
    sd = random_v6_state_dict(n_layer=2, n_embd=64, head_size=32, vocab_size=300, time_state=True)
    del sd["blocks.1.att.time_state"]
    one_line_error(sd, "time_state")
    sd = random_v6_state_dict(n_layer=2, n_embd=64, head_size=32, vocab_size=300, time_state=True)
    sd["blocks.1.att.time_state"] = torch.zeros(2, 32, 16)
    one_line_error(sd, r"'blocks.1.att.time_state' has shape \(2, 32, 16\), expected \(2, 32, 32\)")


def test_nan_is_refused_naming_the_tensor():
    sd = MAKERS["5.2"]()
    sd["blocks.1.att.time_decay"][0, 0] = float("nan")
    one_line_error(sd, "tensor 'blocks.1.att.time_decay' holds NaN")


def test_v7_still_detected():
    assert model_from_state_dict(random_v7_state_dict(n_layer=1, n_embd=64, head_size=32, vocab_size=300)).config.version == "7"


def test_inspect_reports_version_and_time_state(tmp_path):
    from rwkvc.inspect import inspect_path
    for version, sd in (("4", MAKERS["4"]()), ("5.2", MAKERS["5.2"]()),
                        ("6", random_v6_state_dict(n_layer=2, n_embd=64, head_size=32, vocab_size=300, time_state=True))):
        p = save_state_dict(sd, tmp_path / f"v{version}.pth")
        info = inspect_path(p)
        assert info["version"] == f"v{version}"
        assert f"RWKV-v{version} checkpoint" in info["_text"]
        assert "compressions" in info and not info["compressions"]
        assert ("time_state" in info["_text"]) == (version == "6")
        assert "RWKV-Lite" not in info["_text"]
    assert "no heads (RWKV-4)" in inspect_path(tmp_path / "v4.pth")["_text"]
    # and an artifact of a v6 model reports its version
    import rwkvc
    art = rwkvc.compile(tmp_path / "v6.pth", tmp_path / "art6")
    assert inspect_path(str(art))["version"] == "v6"
    assert Path(art, "init_state.npz").exists()
