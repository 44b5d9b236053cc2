"""Bad input gets one clear line on stderr, a non-zero exit, no traceback, and nothing half-written."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from rwkvc.testing import random_v7_state_dict, save_random_v7

CLI = [sys.executable, "-m", "rwkvc.cli"]


def rwkvc(*args, cwd=None, inp=None):
    return subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True, cwd=cwd, input=inp,
                          timeout=300)


def assert_user_error(r, *words):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    err = r.stderr.strip()
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    for w in words:
        assert w.lower() in lines[0].lower(), (w, lines[0])


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    d = tmp_path_factory.mktemp("good")
    return save_random_v7(d / "m.pth", n_layer=2, n_embd=64, head_size=32, vocab_size=300, seed=1)


def no_leftovers(parent, name="out"):
    assert not (parent / name).exists()
    assert not [p for p in os.listdir(parent) if p.startswith(f".{name}.tmp-")]


def compile_fails(tmp_path, model, *words, extra=()):
    r = rwkvc("compile", model, "-o", tmp_path / "out", "-q", *extra)
    assert_user_error(r, *words)
    no_leftovers(tmp_path)


def test_missing_path(tmp_path):
    compile_fails(tmp_path, tmp_path / "nope.pth", "no such file")


def test_empty_file(tmp_path):
    (tmp_path / "e.pth").write_bytes(b"")
    compile_fails(tmp_path, tmp_path / "e.pth", "empty")


def test_truncated_file(tmp_path, good):
    data = open(good, "rb").read()
    (tmp_path / "t.pth").write_bytes(data[: len(data) // 2])
    compile_fails(tmp_path, tmp_path / "t.pth", "truncated")


def test_text_file(tmp_path):
    (tmp_path / "notes.pth").write_text("these are not weights\n")
    compile_fails(tmp_path, tmp_path / "notes.pth", "not a pytorch checkpoint")


def test_gpt2_state_dict(tmp_path):
    sd = {"wte.weight": torch.randn(100, 16), "wpe.weight": torch.randn(32, 16),
          "h.0.attn.c_attn.weight": torch.randn(16, 48), "ln_f.weight": torch.ones(16)}
    torch.save(sd, tmp_path / "gpt2.pth")
    compile_fails(tmp_path, tmp_path / "gpt2.pth", "not an rwkv checkpoint")


def test_missing_key(tmp_path):
    sd = random_v7_state_dict(n_layer=2, n_embd=64, head_size=32, vocab_size=300)
    del sd["blocks.1.att.k_a"]
    torch.save(sd, tmp_path / "m.pth")
    compile_fails(tmp_path, tmp_path / "m.pth", "blocks.1.att.k_a", "missing")


def test_wrong_shape(tmp_path):
    sd = random_v7_state_dict(n_layer=2, n_embd=64, head_size=32, vocab_size=300)
    sd["blocks.1.ffn.value.weight"] = torch.randn(64, 100)
    torch.save(sd, tmp_path / "m.pth")
    compile_fails(tmp_path, tmp_path / "m.pth", "blocks.1.ffn.value.weight")


def test_nan_weights(tmp_path):
    sd = random_v7_state_dict(n_layer=2, n_embd=64, head_size=32, vocab_size=300)
    sd["blocks.0.att.key.weight"][3, 5] = float("nan")
    torch.save(sd, tmp_path / "m.pth")
    compile_fails(tmp_path, tmp_path / "m.pth", "blocks.0.att.key.weight", "nan")


def test_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))
    torch.save({"emb.weight": Evil()}, tmp_path / "evil.pth")
    compile_fails(tmp_path, tmp_path / "evil.pth", "refused")
    assert not (tmp_path / "pwned").exists()


def test_unknown_target(tmp_path, good):
    compile_fails(tmp_path, good, "unknown target", "cpu", extra=("--target", "tpu9000"))


def test_unknown_pass(tmp_path, good):
    compile_fails(tmp_path, good, "unknown pass", extra=("--passes", "magic(x=1)"))


def test_unwritable_output_dir(tmp_path, good):
    if os.geteuid() == 0:
        target = "/proc/rwkvc-test-out"          # not writable even for root
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        target = ro / "out"
    r = rwkvc("compile", good, "-o", target, "-q")
    assert_user_error(r, "writ")
    assert not os.path.exists(target)


def test_existing_output_needs_force(tmp_path, good):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    r = rwkvc("compile", good, "-o", tmp_path / "out", "-q")
    assert_user_error(r, "--force")
    assert (tmp_path / "out" / "keep.txt").exists()
    r = rwkvc("compile", good, "-o", tmp_path / "out", "-q", "--force")   # --force replaces only an artifact
    assert_user_error(r, "not an rwkvc artifact")
    assert (tmp_path / "out" / "keep.txt").read_text() == "x"
    (tmp_path / "out" / "keep.txt").unlink()
    assert rwkvc("compile", good, "-o", tmp_path / "out", "-q").returncode == 0   # an empty directory is fine
    r = rwkvc("compile", good, "-o", tmp_path / "out", "-q", "--force")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "manifest.json").exists()


def test_run_errors(tmp_path, good):
    assert_user_error(rwkvc("run", tmp_path / "nothing"), "no such artifact")
    (tmp_path / "notart").mkdir()
    assert_user_error(rwkvc("run", tmp_path / "notart"), "not an rwkvc artifact")
    r = rwkvc("compile", good, "-o", tmp_path / "art", "-q")
    assert r.returncode == 0, r.stderr
    assert_user_error(rwkvc("run", tmp_path / "art", "--top-p", "1.5", "-n", "2"), "top_p")
    assert_user_error(rwkvc("run", tmp_path / "art", "--temperature", "-1", "-n", "2"), "temperature")
    assert_user_error(rwkvc("run", tmp_path / "art", "--state-in", tmp_path / "nostate.npz"), "no such state file")
    # a truncated weights file is noticed before ONNX Runtime sees it
    w = tmp_path / "art" / "weights.bin"
    w.write_bytes(w.read_bytes()[:100])
    assert_user_error(rwkvc("run", tmp_path / "art", "-n", "2"), "weights.bin", "truncated")


def test_bench_and_inspect_errors(tmp_path):
    assert_user_error(rwkvc("bench", tmp_path / "nothing"), "no such artifact")
    assert_user_error(rwkvc("inspect", tmp_path / "nothing.pth"), "no such file")
