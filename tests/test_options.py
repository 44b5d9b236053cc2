"""Typed runtime options: one meaning of `threads`, RWKVC_THREADS honoured by the API and the CLI."""
from __future__ import annotations

import subprocess
import sys

import pytest

import rwkvc
from rwkvc.errors import RwkvcError
from rwkvc.options import RuntimeOptions
from rwkvc.testing import save_random_v7


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    d = tmp_path_factory.mktemp("opts")
    ckpt = save_random_v7(d / "m.pth", n_layer=1, n_embd=64, vocab_size=300)
    return rwkvc.compile(ckpt, d / "art", target="cpu", progress=False)


def test_threads_fall_back_to_the_environment(monkeypatch):
    monkeypatch.delenv("RWKVC_THREADS", raising=False)
    assert RuntimeOptions.resolve().threads is None
    monkeypatch.setenv("RWKVC_THREADS", "3")
    assert RuntimeOptions.resolve().threads == 3
    assert RuntimeOptions.resolve(1).threads == 1          # an explicit value wins


@pytest.mark.parametrize("bad", ["abc", "0", "-2", "1.5"])
def test_a_bad_rwkvc_threads_is_a_clear_error(monkeypatch, bad):
    monkeypatch.setenv("RWKVC_THREADS", bad)
    with pytest.raises(RwkvcError, match="RWKVC_THREADS"):
        RuntimeOptions.resolve()


@pytest.mark.parametrize("bad", [0, -2, 1.5, "2", True])
def test_bad_threads_are_refused(bad):
    with pytest.raises(RwkvcError, match="threads"):
        RuntimeOptions(threads=bad)


def test_load_honours_rwkvc_threads(artifact, monkeypatch):
    monkeypatch.setenv("RWKVC_THREADS", "1")
    m = rwkvc.load(artifact)
    assert m.options.threads == 1
    assert m.runtime.so.intra_op_num_threads == 1
    assert rwkvc.load(artifact, threads=2).options.threads == 2


def test_cli_reports_a_bad_rwkvc_threads_in_one_line(artifact):
    import os
    env = dict(os.environ, RWKVC_THREADS="abc")
    r = subprocess.run([sys.executable, "-m", "rwkvc.cli", "run", str(artifact), "--prompt", "a", "-n", "1"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and r.stderr.startswith("error: RWKVC_THREADS")


def test_api_misuse_raises_rwkvc_errors_of_the_matching_kind(artifact):
    from rwkvc.errors import RwkvcTypeError, RwkvcValueError
    m = rwkvc.load(artifact)
    with pytest.raises(RwkvcTypeError):
        m.forward([1.5, 2.0])
    with pytest.raises(TypeError):              # catchable as the built-in too
        m.forward([1], state="not a state")
    with pytest.raises(RwkvcValueError):
        m.forward([10 ** 6])
    with pytest.raises(ValueError):
        m.forward([])
    with pytest.raises(RwkvcError, match="vocabulary"):
        m.generate("a", n=2, token_ban=(10 ** 8,))


def test_compile_takes_the_dtype_as_an_argument_or_an_option_not_two(tmp_path):
    import json
    ckpt = save_random_v7(tmp_path / "m.pth", n_layer=1, n_embd=64, vocab_size=300)
    art = rwkvc.compile(ckpt, tmp_path / "a", options={"dtype": "float16"})
    assert json.loads((art / "manifest.json").read_text())["dtype"] == "float16"
    with pytest.raises(RwkvcError, match="dtype is given twice"):
        rwkvc.compile(ckpt, tmp_path / "b", dtype="float32", options={"dtype": "float16"})
    assert not (tmp_path / "b").exists()
