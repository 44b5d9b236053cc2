"""Tests of the training module (training/, imported as rwkvc.training): tiny models, tiny data, 2 cores.

What is checked: binidx files (format, round trip, corrupt input), magic_prime (primality, 3n+2,
maximality), the magic-prime sample order, chunked WKV == recurrent WKV (fp64 and fp32, forward and
backward), the fused head loss == the plain one, the lr schedule, checkpoints that the official `rwkv`
package loads with matching logits, kill-and-resume == an uninterrupted run, a 2-process DeepSpeed
run on CPU (skipped only when deepspeed is not importable), and one-line errors for bad inputs.
"""
from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
from rwkvc import binidx
from rwkvc.errors import RwkvcError
from rwkvc.reference.v7 import RWKV7, wkv7_chunked, wkv7_recurrent
from rwkvc.training import data as tdata, model as tmodel
from rwkvc.training.config import TrainArgs, load_config_file, parse_args
from rwkvc.training.make_data import make_data
from rwkvc.training.train import main as train_main

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TRAIN = [sys.executable, str(ROOT / "training" / "train.py")]
# a tiny model: V 512 keeps every step and checkpoint small
TINY = ["--n_layer", "2", "--n_embd", "64", "--head_size_a", "32", "--ctx_len", "32", "--vocab_size", "512",
        "--random_seed", "1", "--enable_progress_bar", "0", "--accelerator", "cpu", "--lr_init", "3e-3",
        "--lr_final", "3e-4", "--warmup_steps", "2"]
DOCS = ["In the beginning God created the heaven and the earth.", "Ünïcode ✓ — 中文 text, emoji 🙂 and\nnewlines.",
        "short", "  leading and trailing spaces  ", "tabs\tand \"quotes\" and \\backslashes\\"]


def synthetic_binidx(prefix: Path, n_docs=120, vocab=300, seed=0) -> int:
    """Random token documents (ids < vocab, each ending in 0); returns the token count."""
    rng = np.random.default_rng(seed)
    docs = [list(rng.integers(1, vocab, rng.integers(20, 200))) + [0] for _ in range(n_docs)]
    binidx.write_binidx(prefix, docs)
    return sum(map(len, docs))


def run_train(args, **kw):
    return subprocess.run(TRAIN + [str(a) for a in args], capture_output=True, text=True, env=ENV, **kw)


# --------------------------------------------------------------------------------------------------
# binidx + make_data

def parse_idx(path: Path):
    """An independent reading of the Megatron .idx layout."""
    raw = path.read_bytes()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    version, code, n, m = struct.unpack("<QBQQ", raw[9:34])
    sizes = np.frombuffer(raw, "<i4", n, 34)
    pointers = np.frombuffer(raw, "<i8", n, 34 + 4 * n)
    doc_idx = np.frombuffer(raw, "<i8", m, 34 + 12 * n)
    assert len(raw) == 34 + 12 * n + 8 * m
    return version, code, sizes, pointers, doc_idx


def test_make_data_round_trip_and_idx_format(tmp_path):
    from rwkvc.tokenizer import WorldTokenizer
    tok = WorldTokenizer()
    src = tmp_path / "demo.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS) + "\n", encoding="utf-8")
    prefix, p = make_data(src, 3, 16, out=str(tmp_path / "out" / "demo"), seed=1, log=lambda *a: None)
    version, code, sizes, pointers, doc_idx = parse_idx(Path(prefix + ".idx"))
    assert (version, code) == (1, 8)
    assert len(sizes) == 3 * len(DOCS) and list(doc_idx) == list(range(len(sizes) + 1))
    assert list(pointers) == list(np.concatenate([[0], np.cumsum(sizes[:-1])]) * 2)
    bin_tokens = np.fromfile(prefix + ".bin", np.uint16)
    assert len(bin_tokens) == sizes.sum()
    texts = []
    for ptr, size in zip(pointers, sizes):
        seq = bin_tokens[ptr // 2: ptr // 2 + size]
        assert seq[-1] == 0 and 0 not in seq[:-1]
        texts.append(tok.decode([int(t) for t in seq[:-1]]))
    for e in range(3):  # every epoch is a permutation of the documents
        assert sorted(texts[e * len(DOCS):(e + 1) * len(DOCS)]) == sorted(DOCS)
    assert texts[:len(DOCS)] != texts[len(DOCS):2 * len(DOCS)] or texts[:len(DOCS)] != texts[-len(DOCS):]
    ds = binidx.MMapIndexedDataset(prefix)  # the reader agrees with the independent parse
    assert len(ds) == len(sizes) and np.array_equal(ds.tokens, bin_tokens)
    assert np.array_equal(ds.get(1, 2, 3), bin_tokens[pointers[1] // 2 + 2:pointers[1] // 2 + 5])
    assert p == binidx.magic_prime(len(bin_tokens), 16)


def test_make_data_command_line_like_rwkv_lm(tmp_path):
    (tmp_path / "demo.jsonl").write_text("".join(json.dumps({"text": t * 20}) + "\n" for t in DOCS))
    r = subprocess.run([sys.executable, str(ROOT / "training" / "make_data.py"), "demo.jsonl", "3", "64"],
                       cwd=tmp_path, capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr
    n_tok = len(np.fromfile(tmp_path / "demo.bin", np.uint16))
    assert (tmp_path / "demo.idx").is_file()
    assert f"### magic_prime = {binidx.magic_prime(n_tok, 64)} (for ctxlen 64)" in r.stdout
    r = subprocess.run([sys.executable, str(ROOT / "training" / "make_data.py"), "missing.jsonl", "1", "64"],
                       cwd=tmp_path, capture_output=True, text=True, env=ENV)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error:")


def test_plain_text_input(tmp_path):
    (tmp_path / "book.txt").write_text("one\n\n\ntwo two\n\n\nthree", encoding="utf-8")
    prefix, _ = make_data(tmp_path / "book.txt", 1, 4, out=str(tmp_path / "book"), doc_sep="\n\n\n",
                          log=lambda *a: None)
    assert len(binidx.MMapIndexedDataset(prefix)) == 3


def brute_magic_prime(data_len, ctx_len):
    def prime(n):
        return n > 1 and all(n % d for d in range(2, int(n ** 0.5) + 1))
    if data_len < 3 * ctx_len:
        return None
    cands = [p for p in range(2, data_len // ctx_len) if p % 3 == 2 and prime(p) and p <= data_len // ctx_len - 1]
    return max(cands) if cands else None


def test_magic_prime_is_the_largest_3n2_prime():
    for data_len in list(range(0, 400, 7)) + [1000, 4099, 65536, 123457]:
        for ctx_len in (1, 2, 3, 5, 16, 100):
            p = binidx.magic_prime(data_len, ctx_len)
            assert p == brute_magic_prime(data_len, ctx_len), (data_len, ctx_len)
            if p is not None:
                assert binidx.is_prime(p) and p % 3 == 2 and p * ctx_len + 1 <= data_len
    # the value RWKV-LM's demo script quotes for minipile (1498226207 tokens) at ctx_len 512
    assert binidx.magic_prime(1498226207, 512) == 2926181


def test_reader_rejects_missing_and_corrupt_files(tmp_path):
    synthetic_binidx(tmp_path / "d")
    good = (tmp_path / "d.idx").read_bytes()
    with pytest.raises(RwkvcError, match="not found"):
        binidx.MMapIndexedDataset(tmp_path / "nothing")
    for name, raw in (("magic", b"XXXXXXXXX" + good[9:]), ("trunc", good[:-5]), ("version", good[:9] + b"\x02" + good[10:]),
                      ("dtype", good[:17] + b"\x06" + good[18:])):
        (tmp_path / f"{name}.idx").write_bytes(raw)
        (tmp_path / f"{name}.bin").write_bytes((tmp_path / "d.bin").read_bytes())
        with pytest.raises(RwkvcError, match="corrupt"):
            binidx.MMapIndexedDataset(tmp_path / name)
    (tmp_path / "short.idx").write_bytes(good)
    (tmp_path / "short.bin").write_bytes((tmp_path / "d.bin").read_bytes()[:-2])
    with pytest.raises(RwkvcError, match="truncated or mismatched"):
        binidx.MMapIndexedDataset(tmp_path / "short")


# --------------------------------------------------------------------------------------------------
# sampling, schedule, config

def test_magic_prime_order_visits_every_window_once(tmp_path):
    n = synthetic_binidx(tmp_path / "d")
    d = tdata.TokenData(str(tmp_path / "d"), 16, 512, val_tokens=0)
    p = d.magic_prime
    assert p == binidx.magic_prime(n, 16)
    starts = [d.sample_start(ii) for ii in range(1, p + 1)]
    assert sorted(starts) == [i * 16 for i in range(p)]
    # two processes x micro_bsz 3 draw exactly the samples one process with micro_bsz 6 draws
    one = d.batch(12, 0, 1, 6)
    two = [d.batch(12, r, 2, 3) for r in range(2)]
    assert torch.equal(torch.stack([two[j % 2][j // 2] for j in range(6)]), one)
    assert one.shape == (6, 17) and one.dtype == torch.int64


def test_one_pass_of_training_reads_every_window_once(tmp_path):
    """train() with micro_bsz 4 reads, step after step, consecutive magic-prime samples, so one pass
    (epoch_count 0) covers every ctx_len window exactly once, as RWKV-LM's sampler does. With lr 0
    the weights never change, so each step's logged loss identifies the batch it was computed on."""
    from rwkvc.training.trainer import train
    synthetic_binidx(tmp_path / "d", n_docs=10, seed=3)
    T, B = 16, 4
    d = tdata.TokenData(str(tmp_path / "d"), T, 512, val_tokens=0)
    p = d.magic_prime
    steps = -(-p // B)
    assert p > 3 * B  # several steps, the last one partly past p
    # the batches of one pass hold each of the p windows once (rows past p wrap around and are not counted)
    rows = torch.cat([d.batch(s, 0, 1, B) for s in range(steps)])[:p]
    windows = {tuple(d.tokens[i * T:i * T + T + 1].tolist()) for i in range(p)}
    assert len(windows) == p and {tuple(r.tolist()) for r in rows} == windows
    # ... and train() reads exactly those batches
    args = TrainArgs(data_file=str(tmp_path / "d"), proj_dir=str(tmp_path / "p"), n_layer=1, n_embd=32,
                     head_size_a=32, ctx_len=T, vocab_size=512, micro_bsz=B, epoch_steps=steps, epoch_count=0,
                     epoch_save=0, val_tokens=0, lr_init=0.0, lr_final=0.0, warmup_steps=-1, random_seed=5,
                     accelerator="cpu", precision="fp32", wkv="chunked", chunk_len=8, enable_progress_bar=0)
    final = train(args, log=lambda *a: None)
    logged = [x["loss"] for x in map(json.loads, (tmp_path / "p" / "metrics.jsonl").read_text().splitlines())
              if "loss" in x]
    assert len(logged) == steps
    model = RWKV7(tmodel.model_config(args))
    model.load_state_dict(torch.load(final, weights_only=True))
    _, fn = tmodel.select_wkv("chunked", torch.device("cpu"), 8)
    with torch.no_grad():
        want = [tmodel.LMLoss(model, fn)(b[:, :-1], b[:, 1:]).item()
                for b in (d.batch(s, 0, 1, B) for s in range(steps))]
    np.testing.assert_allclose(logged, want, rtol=1e-5)
    assert len(set(np.round(want, 4))) == steps  # the check can tell batches apart


def test_held_out_tail_and_magic_prime_adjustment(tmp_path):
    n = synthetic_binidx(tmp_path / "d")
    d = tdata.TokenData(str(tmp_path / "d"), 16, 512, val_tokens=200)
    assert d.plan.train_len == n - 200 and d.plan.val_range == (n - 200, n)
    assert d.magic_prime == binidx.magic_prime(n - 200, 16)
    assert sum(w[1] - 1 for w in d.val_windows()) == 199
    full = binidx.magic_prime(n, 16)  # make_data's value for all the data: lowered, with a note
    d2 = tdata.TokenData(str(tmp_path / "d"), 16, 512, magic_prime_arg=full, val_tokens=2000)
    assert d2.magic_prime == binidx.magic_prime(n - 2000, 16) < full and "using" in d2.plan.note
    with pytest.raises(RwkvcError, match="3n\\+2"):
        tdata.TokenData(str(tmp_path / "d"), 16, 512, magic_prime_arg=13)


def test_lr_schedule():
    a = TrainArgs(lr_init=1e-3, lr_final=1e-4, warmup_steps=10, ctx_len=8, micro_bsz=2)
    lrs = [tmodel.lr_at(s, a, 100, 2) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-5)                   # warmup starts at 1%
    assert max(lrs) <= 1e-3 and lrs[10] == pytest.approx(1e-3 * (1e-1) ** (1 / 90))
    assert lrs[-1] == pytest.approx(1e-4)                   # exponential decay ends at lr_final
    assert all(x >= y for x, y in zip(lrs[10:], lrs[11:]))
    c = a.replace(my_exit_tokens=100 * 8 * 2)               # cosine over my_exit_tokens
    lrs = [tmodel.lr_at(s, c, 100, 2) for s in range(101)]
    assert lrs[10] == pytest.approx(1e-3) and lrs[100] == pytest.approx(1e-4) and lrs[55] == pytest.approx(5.5e-4)


def test_config_file_and_flags(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"n_layer": 3, "lr_init": 1, "data_file": "x"}))
    (tmp_path / "c.toml").write_text('n_layer = 5\nctx_len = 64\nproj_dir = "p"\n')
    a = parse_args(["--config", str(tmp_path / "c.json"), "--n_layer", "7"])
    assert (a.n_layer, a.lr_init, a.data_file) == (7, 1.0, "x")
    b = parse_args(["--config", str(tmp_path / "c.toml"), "--local_rank=1"])
    assert (b.n_layer, b.ctx_len, b.proj_dir, b.local_rank) == (5, 64, "p", 1)
    (tmp_path / "bad.json").write_text(json.dumps({"n_layers": 3}))
    with pytest.raises(RwkvcError, match="unknown setting 'n_layers'"):
        load_config_file(tmp_path / "bad.json")
    with pytest.raises(RwkvcError, match="--n_embd"):
        TrainArgs(n_embd=100, head_size_a=64)


# --------------------------------------------------------------------------------------------------
# the maths: chunked WKV and the fused head loss

def wkv_inputs(B, T, H, N, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    r, k, v = rnd(B, T, H, N), rnd(B, T, H, N), rnd(B, T, H, N)
    w = torch.exp(-torch.exp(-0.5 - torch.nn.functional.softplus(2 * rnd(B, T, H, N))))  # RWKV-7's range
    kk = torch.nn.functional.normalize(rnd(B, T, H, N), dim=-1)
    iclr = torch.sigmoid(rnd(B, T, H, N))
    return [r, w, k, v, -kk, kk * iclr, rnd(B, H, N, N)]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("T,chunk", [(64, 16), (50, 16), (37, 32), (5, 64), (24, 1), (96, 64)])
def test_chunked_wkv_equals_recurrent(dtype, tol, T, chunk):
    xs = [x.requires_grad_() for x in wkv_inputs(2, T, 3, 16, dtype, seed=T)]
    g = torch.Generator().manual_seed(1)
    gy, gs = torch.randn(2, T, 3, 16, generator=g, dtype=dtype), torch.randn(2, 3, 16, 16, generator=g, dtype=dtype)
    outs = []
    for fn in (wkv7_recurrent, lambda *a: wkv7_chunked(*a, chunk_len=chunk)):
        y, s = fn(*xs)
        grads = torch.autograd.grad((y * gy).sum() + (s * gs).sum(), xs)
        outs.append([y, s, *grads])
    for name, ref, got in zip(["y", "state", "dr", "dw", "dk", "dv", "da", "db", "dstate0"], *outs):
        rel = ((got - ref).abs().max() / ref.abs().max()).item()
        assert rel < tol, f"{name}: relative error {rel:.2e} >= {tol:.0e}"


def tiny_model(vocab=512, seed=0):
    from rwkvc.reference.v7 import V7Config
    cfg = V7Config(n_layer=2, n_embd=64, head_size=32, vocab_size=vocab, **V7Config.default_dims(64))
    return RWKV7(cfg).init_weights(seed=seed, scale=1.0)


def test_fused_head_loss_equals_plain_loss():
    import copy
    m1 = tiny_model()
    m2 = copy.deepcopy(m1)
    _, fn = tmodel.select_wkv("chunked", torch.device("cpu"), 8)
    plain, fused = tmodel.LMLoss(m1, fn, fused_head=False), tmodel.LMLoss(m2, fn, fused_head=True)
    m2.head.chunk_elems = 7 * 512  # several chunks
    x = torch.randint(0, 512, (3, 21), generator=torch.Generator().manual_seed(0))
    l1, l2 = plain(x[:, :-1], x[:, 1:]), fused(x[:, :-1], x[:, 1:])
    l1.backward()
    l2.backward()
    assert abs(l1.item() - l2.item()) < 1e-5
    for (name, p), q in zip(m1.named_parameters(), m2.parameters()):
        if p.grad is not None:
            assert ((p.grad - q.grad).abs().max() / p.grad.abs().max()).item() < 1e-4, name
    with torch.no_grad():
        assert abs(plain(x[:, :-1], x[:, 1:], reduction="sum").item()
                   - fused(x[:, :-1], x[:, 1:], reduction="sum").item()) < 1e-3
        assert torch.equal(m1(x)[0], m2(x)[0])  # outside the loss the head is a plain Linear
    assert list(m1.state_dict()) == list(m2.state_dict())


# --------------------------------------------------------------------------------------------------
# training runs (subprocesses, as users run them)

@pytest.fixture(scope="module")
def data_prefix(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    synthetic_binidx(d / "syn")
    return str(d / "syn")


@pytest.fixture(scope="module")
def single_run(data_prefix, tmp_path_factory):
    proj = tmp_path_factory.mktemp("single")
    r = run_train(["--data_file", data_prefix, "--proj_dir", proj, "--micro_bsz", "4", "--epoch_steps", "4",
                   "--epoch_count", "5", *TINY], timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return proj


OFFICIAL = r"""
import os, sys, json, torch
os.environ["RWKV_V7_ON"] = "1"; os.environ["RWKV_JIT_ON"] = "0"
from rwkv.model import RWKV
from rwkvc.reference.v7 import RWKV7, config_from_state_dict
path, tokens = sys.argv[1], json.loads(sys.argv[2])
sd = torch.load(path, map_location="cpu", weights_only=True)
ref = RWKV7(config_from_state_dict(sd))
ref.load_state_dict({k: v.float() for k, v in sd.items()})
with torch.no_grad():
    want, _ = ref(torch.tensor([tokens]), last_only=True)
got, state = RWKV(path[:-4], "cpu fp32").forward(tokens, None)
print(json.dumps({"rel": ((got - want[0]).abs().max() / want.abs().max()).item(), "n": len(sd)}))
"""


def test_checkpoint_loads_in_official_rwkv_package(single_run):
    pytest.importorskip("rwkv")
    final = single_run / "rwkv-final.pth"
    sd = torch.load(final, map_location="cpu", weights_only=True)
    want_keys = list(tiny_model().state_dict())
    assert list(sd) == want_keys and all(v.dtype == torch.float32 for v in sd.values())
    tokens = [int(t) for t in torch.randint(1, 512, (24,), generator=torch.Generator().manual_seed(3))]
    r = subprocess.run([sys.executable, "-c", OFFICIAL, str(final), json.dumps(tokens)], capture_output=True,
                       text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["rel"] < 1e-4 and out["n"] == len(want_keys)
    # the training run also left its record: metrics with validation loss, checkpoints per epoch
    lines = [json.loads(x) for x in (single_run / "metrics.jsonl").read_text().splitlines()]
    vals = [x["val_loss"] for x in lines if "val_loss" in x]
    assert len(vals) == 5 and all(np.isfinite(vals))
    assert vals[-1] < vals[0] - 0.02  # the held-out loss goes down
    assert {f"rwkv-{t}.pth" for t in (0, 1, 2, 3, 4, "final")} <= {p.name for p in single_run.iterdir()}


def test_kill_and_resume_matches_uninterrupted_run(data_prefix, single_run, tmp_path):
    args = ["--data_file", data_prefix, "--proj_dir", tmp_path, "--micro_bsz", "4", "--epoch_steps", "4",
            "--epoch_count", "5", *TINY]
    proc = subprocess.Popen(TRAIN + [str(a) for a in args], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state0 = tmp_path / "rwkv-0.train-state.pt"
    deadline = time.time() + 120
    while not state0.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert state0.exists() and not (tmp_path / "rwkv-final.pth").exists(), "the run was not interrupted"
    saved = torch.load(state0, weights_only=True)
    assert (saved["step"], saved["samples"]) == (4, 16)

    r = run_train(args, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    resumed = [x for x in (r.stdout + r.stderr).splitlines() if x.startswith("resumed from")]
    assert resumed and "step 4, 16 samples" in resumed[0] and f"lr {saved['lr']:.3g}" in resumed[0]
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    after = [x for x in lines if "loss" in x and x["step"] > 4]
    assert after[0]["step"] == 5 and after[0]["tokens"] == 5 * 4 * 32  # data position restored
    ref_lines = [json.loads(x) for x in (single_run / "metrics.jsonl").read_text().splitlines()]
    assert [x["lr"] for x in after if "val_loss" not in x] == [x["lr"] for x in ref_lines
                                                              if "loss" in x and x["step"] > 4]
    a = torch.load(tmp_path / "rwkv-final.pth", weights_only=True)
    b = torch.load(single_run / "rwkv-final.pth", weights_only=True)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


def test_deepspeed_two_processes_on_cpu(data_prefix, single_run, tmp_path):
    """Skipped only when deepspeed is not importable (`pip install deepspeed`)."""
    pytest.importorskip("deepspeed")
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(ROOT / "training" / "train.py"), "--data_file", data_prefix, "--proj_dir", str(tmp_path),
           "--micro_bsz", "2", "--epoch_steps", "4", "--epoch_count", "5", "--strategy", "deepspeed_stage_2",
           *TINY]
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    a = torch.load(tmp_path / "rwkv-final.pth", weights_only=True)
    b = torch.load(single_run / "rwkv-final.pth", weights_only=True)
    assert list(a) == list(b)
    assert all(a[k].shape == b[k].shape and a[k].dtype == b[k].dtype for k in a)
    # 2 processes x micro_bsz 2 draw the same samples as 1 x 4, so the weights agree too
    assert max(((a[k] - b[k]).abs().max() / (b[k].abs().max() + 1e-12)).item() for k in a) < 1e-4
    assert (tmp_path / "rwkv-final.ds").is_dir()


# --------------------------------------------------------------------------------------------------
# errors: one line, exit 2, no traceback, before any training

def assert_one_line_error(code, err, match):
    assert code == 2
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], err
    assert "Traceback" not in err


def test_bad_inputs_fail_with_one_line(data_prefix, tmp_path, capsys):
    # the real command line once (a fresh interpreter) ...
    r = run_train(["--data_file", tmp_path / "nope", "--proj_dir", tmp_path / "p", *TINY])
    assert_one_line_error(r.returncode, r.stderr, "nope.idx not found")
    assert not (tmp_path / "p").exists()
    # ... then the same entry point in-process for the other cases
    (tmp_path / "bad.idx").write_bytes(b"MMIDIDX\x00\x00garbage")
    (tmp_path / "bad.bin").write_bytes(b"")
    cases = [
        (["--data_file", tmp_path / "bad"], "is corrupt"),
        (["--data_file", data_prefix, "--ctx_len", "100000"], "--ctx_len 100000 is too long"),
        (["--data_file", data_prefix, "--vocab_size", "100"], "--vocab_size 100 is too small"),
    ]
    for extra, match in cases:
        capsys.readouterr()
        code = train_main([str(a) for a in [*TINY, "--proj_dir", tmp_path / "q", *extra]])
        assert_one_line_error(code, capsys.readouterr().err, match)
    assert not (tmp_path / "q").exists() or not any((tmp_path / "q").glob("rwkv-*"))


def test_gradient_checkpointing_keeps_names_and_gradients():
    import copy
    m1 = tiny_model()
    m2 = copy.deepcopy(m1)
    tmodel.enable_grad_checkpointing(m2)
    _, fn = tmodel.select_wkv("chunked", torch.device("cpu"), 8)
    x = torch.randint(0, 512, (2, 13), generator=torch.Generator().manual_seed(0))
    for m in (m1, m2):
        tmodel.LMLoss(m, fn)(x[:, :-1], x[:, 1:]).backward()
    assert list(m1.state_dict()) == list(m2.state_dict())
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert (p.grad is None) == (q.grad is None)
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)


def test_demo_data_parsing():
    """The demo's KJV split (skipped without Debian's bible-kjv: `apt-get install bible-kjv`)."""
    import shutil
    if shutil.which("bible") is None:
        pytest.skip("bible-kjv is not installed")
    from rwkvc.training import demo
    chs = demo.chapters(demo.bible_text())
    assert len(chs) == 1189 and chs[0][:2] == ("Genesis", 1) and chs[-1][:2] == ("Revelation", 22)
    assert chs[0][2].startswith("Genesis 1\n\n1 In the beginning God created the heaven and the earth.\n2 And")
    books = {b for b, _, _ in chs}
    assert len(books) == 66 and set(demo.HELD_OUT) <= books
