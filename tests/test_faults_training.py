"""Training, state tuning, the scripts in training/ and the fused-kernel cache under faults, damage and
misuse, through the real scripts in subprocesses: each case asserts the exit status, one `error:` line on
stderr with no traceback (or the one line a repair prints), and what is on disk afterwards."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rwkvc import binidx
from helpers import one_error_line, tree
from rwkvc.testing import save_random_v7

ROOT = Path(__file__).resolve().parents[1]
ENV = {**{k: v for k, v in os.environ.items() if k != "RWKVC_THREADS"}, "OMP_NUM_THREADS": "1",
       "PYTHONUNBUFFERED": "1"}
TINY = ["--n_layer", "2", "--n_embd", "64", "--head_size_a", "32", "--ctx_len", "32", "--vocab_size", "512",
        "--random_seed", "1", "--enable_progress_bar", "0", "--accelerator", "cpu", "--lr_init", "3e-3",
        "--lr_final", "3e-4", "--warmup_steps", "2", "--micro_bsz", "4"]


def script(name: str, *args, env=None, timeout=300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "training" / name), *map(str, args)], env=env or ENV,
                          capture_output=True, text=True, timeout=timeout, **kw)


def temporaries(d: Path) -> list[str]:
    return sorted(p.name for p in d.rglob("*") if ".tmp" in p.name)


def assert_complete(proj: Path):
    """Every checkpoint and training state loads whole; metrics.jsonl is whole lines of JSON, not empty."""
    for p in proj.glob("rwkv-*"):
        if p.is_file() and not p.name.startswith("."):
            torch.load(p, map_location="cpu", weights_only=True)
    m = proj / "metrics.jsonl"
    if m.exists():
        text = m.read_text()
        assert text and text.endswith("\n")
        [json.loads(x) for x in text.splitlines()]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    rng = torch.Generator().manual_seed(0)
    docs = [[int(t) for t in torch.randint(1, 300, (int(n),), generator=rng)] + [0]
            for n in torch.randint(20, 200, (120,), generator=rng)]
    binidx.write_binidx(d / "syn", docs)
    return str(d / "syn")


def train_args(data: str, proj, epoch_steps=4, epoch_count=2):
    return ["--data_file", data, "--proj_dir", proj, "--epoch_steps", epoch_steps, "--epoch_count", epoch_count,
            *TINY]


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """A finished 8-step run: rwkv-0, rwkv-1, rwkv-final (+ the newest two training states)."""
    proj = tmp_path_factory.mktemp("trained") / "p"
    r = script("train.py", *train_args(data, proj))
    assert r.returncode == 0, r.stderr[-3000:]
    assert {"rwkv-0.pth", "rwkv-1.pth", "rwkv-final.pth", "rwkv-final.train-state.pt"} <= set(os.listdir(proj))
    return proj


def copy_of(trained: Path, tmp_path: Path) -> Path:
    proj = tmp_path / "p"
    shutil.copytree(trained, proj)
    return proj


# -- resume never writes over what it could not read ---------------------------------------------------
def test_a_truncated_newest_state_is_named_and_nothing_is_overwritten(data, trained, tmp_path):
    proj = copy_of(trained, tmp_path)
    state = proj / "rwkv-final.train-state.pt"
    state.write_bytes(state.read_bytes()[:state.stat().st_size // 2])
    before = tree(proj)
    r = script("train.py", *train_args(data, proj, epoch_count=3))
    one_error_line(r, str(state), "cannot be read", "--restart 1")
    assert tree(proj) == before


def test_restart_starts_over_where_a_state_is_unreadable(data, trained, tmp_path):
    proj = copy_of(trained, tmp_path)
    state = proj / "rwkv-final.train-state.pt"
    state.write_bytes(state.read_bytes()[:1000])
    r = script("train.py", *train_args(data, proj), "--restart", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" not in r.stdout and "--restart 1: starting again from step 0" in r.stdout
    assert_complete(proj)
    assert torch.load(state, weights_only=True)["step"] == 8       # the new run's, whole
    assert temporaries(proj) == []


def test_checkpoints_without_states_are_not_overwritten(data, trained, tmp_path):
    proj = copy_of(trained, tmp_path)
    for p in proj.glob("*.train-state.pt"):
        p.unlink()
    before = tree(proj)
    r = script("train.py", *train_args(data, proj))
    one_error_line(r, "no training state", "--restart 1")
    assert tree(proj) == before


def test_a_bad_restart_value_is_one_line(data, tmp_path):
    r = script("train.py", *train_args(data, tmp_path / "p"), "--restart", "2")
    one_error_line(r, "--restart 2", "0, 1")
    r = script("train.py", *train_args(data, tmp_path / "p"), "--epoch_steps", "many")
    one_error_line(r, "--epoch_steps", "many")
    assert not (tmp_path / "p").exists()
    (tmp_path / "f").write_text("a file")
    r = script("train.py", *train_args(data, tmp_path / "f" / "p"))
    one_error_line(r, "--proj_dir", "is not a directory")


# -- kills and full disks --------------------------------------------------------------------------
def test_sigkill_mid_training_leaves_whole_files_and_the_rerun_resumes(data, tmp_path):
    proj = tmp_path / "p"
    args = train_args(data, proj, epoch_steps=2, epoch_count=6)
    p = subprocess.Popen([sys.executable, str(ROOT / "training" / "train.py"), *map(str, args)], env=ENV,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while p.poll() is None and time.time() < deadline:      # kill it while it writes rwkv-1 if we can
        names = os.listdir(proj) if proj.is_dir() else []
        if any(n.startswith(".rwkv-1.") for n in names) or "rwkv-2.train-state.pt" in names:
            break
        time.sleep(0.002)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL and not (proj / "rwkv-final.pth").exists(), "not interrupted"
    assert_complete(proj)                      # whatever it left under its own names is whole
    r = script("train.py", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout
    assert temporaries(proj) == []             # the dead run's temporary file (if any) is gone
    assert_complete(proj)
    assert torch.load(proj / "rwkv-final.train-state.pt", weights_only=True)["step"] == 12


@pytest.fixture
def tiny_disk(tmp_path):
    """Mounts a tmpfs of the size asked for (root and mount(8) needed; skipped with the reason elsewhere)."""
    mounted = []

    def mount(kib: int) -> Path:
        d = tmp_path / f"disk{len(mounted)}"
        d.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(d)], capture_output=True,
                           text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here: {r.stderr.strip() or r.returncode}")
        mounted.append(d)
        return d
    yield mount
    for d in mounted:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


def test_a_full_disk_during_training_is_one_line_naming_what_was_kept(data, trained, tiny_disk):
    w = (trained / "rwkv-0.pth").stat().st_size
    s = (trained / "rwkv-final.train-state.pt").stat().st_size
    disk = tiny_disk((2 * w + s) // 1024 + 64)      # epoch 0's pair fits, epoch 1's state does not
    proj = disk / "p"
    r = script("train.py", *train_args(data, proj))
    one_error_line(r, "No space left on device", "rwkv-1.train-state.pt", "training stopped",
                   f"kept {proj / 'rwkv-0.pth'} (step 4)")
    assert temporaries(disk) == []
    assert_complete(proj)
    assert (proj / "rwkv-0.train-state.pt").is_file()
    # the rerun (once there is room) resumes from what was kept
    assert not (proj / "rwkv-final.pth").exists()


def test_a_disk_full_from_the_start_leaves_no_empty_metrics(data, tiny_disk):
    disk = tiny_disk(4)                              # one page: train-args.json, then nothing
    proj = disk / "p"
    r = script("train.py", *train_args(data, proj))
    one_error_line(r, "No space left on device", "no checkpoint was complete yet")
    assert temporaries(disk) == []
    assert not (proj / "metrics.jsonl").exists() or (proj / "metrics.jsonl").read_text()
    assert_complete(proj)


def test_state_tuning_refuses_an_unreadable_state_and_stops_in_one_line_on_a_full_disk(data, base_and_state,
                                                                                     tmp_path, tiny_disk):
    base, _ = base_and_state

    def tune(proj):
        return script("train.py", "--train_type", "states", "--load_model", base, "--data_file", data,
                      "--proj_dir", proj, "--ctx_len", "32", "--micro_bsz", "4", "--epoch_steps", "2",
                      "--epoch_count", "2", "--enable_progress_bar", "0", "--accelerator", "cpu",
                      "--lr_init", "0.01", "--lr_final", "0.001", "--random_seed", "1")
    proj = tmp_path / "st"
    r = tune(proj)
    assert r.returncode == 0, r.stderr[-3000:]
    state = proj / "rwkv-final.train-state.pt"
    state.write_bytes(state.read_bytes()[:100])
    before = tree(proj)
    one_error_line(tune(proj), str(state), "cannot be read", "--restart 1")
    assert tree(proj) == before
    disk = tiny_disk(4)
    one_error_line(tune(disk / "st"), "No space left on device", "state tuning stopped",
                   "no checkpoint was complete yet")
    assert temporaries(disk) == []
    assert_complete(disk / "st")


# -- the other scripts ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base_and_state(tmp_path_factory):
    from rwkvc.states import time_state_dict
    d = tmp_path_factory.mktemp("merge")
    base = save_random_v7(d / "base.pth", n_layer=1, n_embd=64, vocab_size=300)
    sd = torch.load(base, weights_only=True)
    H, N = sd["blocks.0.att.r_k"].shape
    torch.save(time_state_dict(torch.zeros(1, H, N, N)), d / "state.pth")
    return Path(base), d / "state.pth"


def test_merge_state_force_onto_a_directory_is_refused(base_and_state, tmp_path):
    base, state = base_and_state
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "chapter1.tex").write_text("years of work")
    for force in ([], ["--force"]):
        r = script("merge_state.py", base, state, thesis, *force)
        one_error_line(r, str(thesis), "is a directory")
        assert tree(thesis) == {"chapter1.tex": b"years of work"}
    r = script("merge_state.py", base, state, tmp_path / "missing" / "m.pth")
    one_error_line(r, "directory does not exist")
    r = script("merge_state.py", base, tmp_path / "nope.pth", tmp_path / "m.pth")
    one_error_line(r, "nope.pth not found")
    r = script("merge_state.py", base, state, tmp_path / "m.pth")
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(tmp_path)) == ["m.pth", "thesis"]


def test_merge_state_on_a_full_disk_leaves_nothing(base_and_state, tiny_disk):
    base, state = base_and_state
    disk = tiny_disk(64)
    r = script("merge_state.py", base, state, disk / "m.pth")
    one_error_line(r, "No space left on device", str(disk / "m.pth"))
    assert os.listdir(disk) == []


@pytest.mark.parametrize("name,args,words", [
    ("make_data.py", ["missing.jsonl", "1", "64"], ["missing.jsonl not found"]),
    ("make_data.py", ["in.jsonl", "x", "64"], ["n_epoch", "'x'"]),
    ("make_data.py", ["in.jsonl", "1", "64", "--out", "/dev/null/d/out"], ["/dev/null/d"]),
    ("prepare_orpo.py", ["--input_csv", "none.csv", "--output_save", "o.jsonl"], ["none.csv not found"]),
    ("prepare_orpo.py", ["--output_save", "o.jsonl"], ["--input_csv"]),
    ("state_tune.py", ["--load_model", "none.pth", "--data_file", "x"], ["none.pth not found"]),
    ("demo.py", ["--bogus"], ["--bogus"]),
])
def test_scripts_report_user_errors_in_one_line(tmp_path, name, args, words):
    (tmp_path / "in.jsonl").write_text(json.dumps({"text": "some text " * 50}) + "\n")
    r = script(name, *args, cwd=tmp_path)
    one_error_line(r, *words)
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl"]


# -- the fused-kernel cache ---------------------------------------------------------------------------
KERNELS = """
from rwkvc.abi import FUSED_DOMAIN, FUSED_VERSION
from rwkvc.runtimes import ortops
ortops.require({"domain": FUSED_DOMAIN, "version": FUSED_VERSION})
print(ortops.library())
"""


def test_a_damaged_kernel_library_is_rebuilt_with_one_line(tmp_path):
    from rwkvc.cache import cache_root
    from rwkvc.runtimes import ortops
    if ortops.compiler() is None:
        pytest.skip("no C++ compiler for rwkvc's fused kernels")
    env = {**ENV, "RWKV_CACHE": str(tmp_path / "cache")}
    key = ortops.cache_key(ortops._source_dir(), ortops.FLAGS)
    have = cache_root() / "ortops" / key          # a verified build of this key saves one compile (~30 s)
    if ortops._checked(have / ortops.LIBRARY) == "ok":
        shutil.copytree(have, tmp_path / "cache" / "ortops" / key)
    first = subprocess.run([sys.executable, "-c", KERNELS], env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0 and first.stderr == "", first.stderr[-2000:]
    lib = Path(first.stdout.strip())
    whole = lib.read_bytes()
    recorded = (lib.parent / (ortops.LIBRARY + ".sha256")).read_text().split()[0]
    assert hashlib.sha256(whole).hexdigest() == recorded
    lib.write_bytes(whole[:len(whole) // 2])        # truncated in place: mapping it would be a bus error
    r = subprocess.run([sys.executable, "-c", KERNELS], env=env, capture_output=True, text=True, timeout=600)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 0 and len(lines) == 1, r.stderr[-2000:]
    assert "damaged" in lines[0] and "rebuilt" in lines[0] and str(lib) in lines[0]
    rebuilt = lib.read_bytes()
    assert hashlib.sha256(rebuilt).hexdigest() == (lib.parent / (ortops.LIBRARY + ".sha256")).read_text().split()[0]
    assert len(rebuilt) > len(whole) // 2
    assert temporaries(tmp_path / "cache") == []
    again = subprocess.run([sys.executable, "-c", KERNELS], env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stderr == ""
