"""rwkvc under faults, damage and misuse, through the real CLI in subprocesses: each case asserts the exit
status, one `error:` line on stderr with no traceback, and what is on disk afterwards."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import one_error_line, tree
from rwkvc.testing import save_random_v7

ENV = {k: v for k, v in os.environ.items() if k != "RWKVC_THREADS"}


def rwkvc(*args, cwd=None, env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rwkvc.cli", *map(str, args)], cwd=cwd, env=env or ENV,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("faults")
    save_random_v7(d / "m.pth", n_layer=1, n_embd=64, vocab_size=300)
    r = rwkvc("compile", d / "m.pth", "-o", d / "art", "-q")
    assert r.returncode == 0, r.stderr
    return d


def fresh_artifact(work: Path, tmp_path: Path) -> Path:
    import shutil
    art = tmp_path / "art"
    shutil.copytree(work / "art", art)
    return art


# -- outputs: --force, concurrency, kills, permissions, full disks ---------------------------------------
def test_force_replaces_only_an_artifact(work, tmp_path):
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "chapter1.tex").write_text("years of work")
    r = rwkvc("compile", work / "m.pth", "-o", thesis, "--force", "-q")
    one_error_line(r, "not an rwkvc artifact")
    assert tree(thesis) == {"chapter1.tex": b"years of work"}
    art = fresh_artifact(work, tmp_path)
    r = rwkvc("compile", work / "m.pth", "-o", art, "--force", "-q")
    assert r.returncode == 0, r.stderr
    assert json.loads((art / "manifest.json").read_text())["format"] == "rwkvc-artifact"


def test_force_onto_the_current_directory_is_refused(work, tmp_path):
    art = fresh_artifact(work, tmp_path)
    before = tree(art)
    r = rwkvc("compile", work / "m.pth", "-o", ".", "--force", "-q", cwd=art)
    one_error_line(r, "current directory")
    assert tree(art) == before


def test_concurrent_compiles_to_one_output_do_not_both_succeed(work, tmp_path):
    out = tmp_path / "same"
    cmd = [sys.executable, "-m", "rwkvc.cli", "compile", str(work / "m.pth"), "-o", str(out), "-q"]
    procs = [subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 2], results
    err = next(e for rc, e in results if rc == 2)
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err
    assert json.loads((out / "manifest.json").read_text())["format"] == "rwkvc-artifact"
    assert [p.name for p in tmp_path.iterdir()] == ["same"]     # no temporary directory left


def test_a_killed_compile_leaves_nothing_a_later_one_keeps(tmp_path):
    big = save_random_v7(tmp_path / "big.pth", n_layer=4, n_embd=512, vocab_size=20000)
    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, "-m", "rwkvc.cli", "compile", big, "-o", str(out), "-q"], env=ENV,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".out.tmp-*")) and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    assert p.poll() is None, "the compile finished before it could be killed"
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not out.exists()
    assert list(tmp_path.glob(".out.tmp-*"))          # the dead compile's directory, until the next one
    r = rwkvc("compile", big, "-o", out, "-q")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.pth", "out"]


def test_artifacts_follow_the_umask(work, tmp_path):
    r = subprocess.run(["sh", "-c", f"umask 022 && {sys.executable} -m rwkvc.cli compile {work / 'm.pth'} "
                        f"-o {tmp_path / 'a'} -q"], env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o755
    assert {p.stat().st_mode & 0o777 for p in (tmp_path / "a").rglob("*") if p.is_file()} == {0o644}


@pytest.fixture
def tiny_disk(tmp_path):
    """A 3 MB tmpfs (root and mount(8) needed; skipped with the reason where the machine refuses)."""
    d = tmp_path / "disk"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(d)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {r.stderr.strip() or r.returncode}")
    yield d
    subprocess.run(["umount", "-l", str(d)], capture_output=True)


def test_a_full_disk_during_compile_is_one_line_and_leaves_nothing(tmp_path, tiny_disk):
    big = save_random_v7(tmp_path / "big.pth", n_layer=2, n_embd=256, vocab_size=5000)   # ~ 9 MB of weights
    r = rwkvc("compile", big, "-o", tiny_disk / "art", "-q")
    one_error_line(r, "No space left", "nothing was written")
    assert list(tiny_disk.iterdir()) == []


# -- damage ------------------------------------------------------------------------------------------
def flip_a_byte(p: Path, at: int) -> None:
    with open(p, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0x40]))


@pytest.mark.parametrize("name", ["weights.bin", "step.onnx", "tokenizer/rwkv_vocab_v20230424.txt"])
def test_a_same_size_edit_is_found_by_every_command(work, tmp_path, name):
    art = fresh_artifact(work, tmp_path)
    r = rwkvc("run", art, "-p", "a", "-n", "2")          # a first load: the stat record of large files
    assert r.returncode == 0, r.stderr
    flip_a_byte(art / name, (art / name).stat().st_size // 2)
    for cmd in (["run", art, "-p", "a", "-n", "2"], ["verify", art, "-q"], ["bench", art, "--tokens", "2",
                "--prefill", "4", "--repeat", "1"], ["eval", art, "--data", work / "ids.npy"]):
        if cmd[0] == "eval":
            np.save(work / "ids.npy", np.arange(1, 40, dtype=np.int64))
        one_error_line(rwkvc(*cmd), name, "damaged")


def test_verify_reports_a_healthy_artifact(work):
    r = rwkvc("verify", work / "art", "-q")
    assert r.returncode == 0, r.stderr
    assert "verified" in r.stdout


@pytest.mark.parametrize("edit, words", [
    (lambda m: m["entry_points"].__setitem__("step", "../../etc/passwd.onnx"), ["step", "inside the artifact"]),
    (lambda m: m["entry_points"].__setitem__("step", "/tmp/x.onnx"), ["inside the artifact"]),
    (lambda m: m["files"].__setitem__("../outside", {"sha256": "0" * 64, "bytes": 1}), ["outside", "inside"]),
    (lambda m: m.__setitem__("files", ["step.onnx"]), ["'files'"]),
    (lambda m: m.__setitem__("model", "big"), ["'model'"]),
    (lambda m: m["tokenizer"].__setitem__("file", 7), ["tokenizer"]),
])
def test_a_manifest_that_escapes_or_has_wrong_types_is_refused(work, tmp_path, edit, words):
    art = fresh_artifact(work, tmp_path)
    m = json.loads((art / "manifest.json").read_text())
    edit(m)
    (art / "manifest.json").write_text(json.dumps(m))
    one_error_line(rwkvc("run", art, "-p", "a", "-n", "1"), *words)


# -- bad options -----------------------------------------------------------------------------------------
def test_state_out_is_checked_before_generation(work, tmp_path):
    r = rwkvc("run", work / "art", "-p", "a", "-n", "5", "--state-out", tmp_path / "missing" / "s.npz")
    one_error_line(r, "no such directory")
    assert r.stdout == ""
    r = rwkvc("run", work / "art", "-p", "a", "-n", "5", "--state-out", tmp_path)
    one_error_line(r, "is a directory")
    assert r.stdout == ""


def test_calibration_ids_must_be_integer_arrays(work, tmp_path):
    np.save(tmp_path / "f.npy", np.arange(100, dtype=np.float32))
    np.save(tmp_path / "p.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    for f, words in (("f.npy", ["float32", "integer"]), ("p.npy", ["not a NumPy array of token ids"])):
        r = rwkvc("compile", work / "m.pth", "-o", tmp_path / "o", "--passes", "int8(method=gptq)", "--calib", tmp_path / f, "-q")
        one_error_line(r, *words)
        assert not (tmp_path / "o").exists()


def test_integer_checkpoints_are_refused(tmp_path):
    sd = torch.load(save_random_v7(tmp_path / "m.pth", n_layer=1, n_embd=64, vocab_size=300), weights_only=True)
    sd["blocks.0.att.key.weight"] = sd["blocks.0.att.key.weight"].to(torch.int8)
    torch.save(sd, tmp_path / "int.pth")
    one_error_line(rwkvc("compile", tmp_path / "int.pth", "-o", tmp_path / "o", "-q"), "blocks.0.att.key.weight", "int8")


@pytest.mark.parametrize("args, env, words", [
    (["--threads", "-2"], {}, ["threads"]),
    (["--ban", "99999999"], {}, ["99999999", "vocabulary"]),
    (["-n", "abc"], {}, ["'-n'", "abc"]),
    ([], {"RWKVC_THREADS": "abc"}, ["RWKVC_THREADS"]),
])
def test_bad_run_options_are_one_line(work, args, env, words):
    one_error_line(rwkvc("run", work / "art", "-p", "a", *args, env={**ENV, **env}), *words)


def test_piping_into_head_is_a_normal_end(work):
    r = subprocess.run(f"{sys.executable} -m rwkvc.cli run {work / 'art'} -p a -n 200 --seed 1 | head -c 1; "
                       "exit ${PIPESTATUS[0]}", shell=True, executable="/bin/bash", env=ENV, capture_output=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout) == 1 and b"Traceback" not in r.stderr and b"Exception" not in r.stderr


def test_dump_ir_onto_a_file_is_refused_before_work(work, tmp_path):
    (tmp_path / "ir.txt").write_text("mine")
    r = rwkvc("compile", work / "m.pth", "-o", tmp_path / "o", "--passes", "int8", "--dump-ir", tmp_path / "ir.txt", "-q")
    one_error_line(r, "--dump-ir")
    assert (tmp_path / "ir.txt").read_text() == "mine" and not (tmp_path / "o").exists()
