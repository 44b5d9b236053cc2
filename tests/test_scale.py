"""Streaming compile: a checkpoint is read lazily, quantised weights wait in scratch files, and weights are
written block by block, so a compile holds about one matrix, not the model.

* the streamed compile writes the same bytes as one that loads everything (every tensor lazy and every
  quantised array spilled, on a tiny model);
* a compile in a child process of a model whose float32 weights take ~370 MB peaks at less than half of
  that above the interpreter's own footprint (the child's VmHWM, reset after its imports), where loading
  the model eagerly needs the bf16 file plus its float32 copy.
"""
import filecmp
import os

import numpy as np
import pytest

from rwkvc import mapped
from rwkvc.mapped import LazyArray, zero_pages
from rwkvc.pipeline import compile_checkpoint
from rwkvc.testing import save_random_v7

from helpers import child_peak


def test_lazy_array_behaves_as_its_array():
    a = np.arange(24, dtype=np.float32).reshape(6, 4)
    lz = LazyArray(lambda: a.copy(), a.shape, np.float32, rows=lambda i, j: a[i:j].copy(),
                   cols=lambda i, j: a[:, i:j].copy())
    assert lz.nbytes == a.nbytes and lz.shape == (6, 4) and len(lz) == 6
    assert np.array_equal(np.asarray(lz), a) and np.array_equal(lz[1:3], a[1:3]) and np.array_equal(lz[2], a[2])
    assert np.array_equal(lz * 2, a * 2) and np.array_equal(np.exp(lz), np.exp(a)) and np.array_equal(lz @ a.T, a @ a.T)
    assert np.array_equal(np.asarray(lz.T), a.T) and np.array_equal(lz.T[1:3], a.T[1:3])
    assert np.array_equal(np.concatenate(list(lz.T.row_blocks(max_bytes=20))), a.T)
    assert np.array_equal(np.concatenate([lz, lz]), np.concatenate([a, a]))


def test_zero_pages_are_writable_zeros_that_cost_nothing_until_written():
    """A runtime's zero initial state (Model.init_state): zeros in a mapping of their own, writable, each array
    apart; 64 MB of them read through stay out of the resident set (the system's zero page)."""
    def rss_anon():
        return next(int(ln.split()[1]) for ln in open("/proc/self/status") if ln.startswith("RssAnon")) * 1024
    a, b = zero_pages((4, 3)), zero_pages((4, 3))
    assert a.dtype == np.float32 and a.shape == (4, 3) and not a.any()
    a[1, 2] = 5
    assert a[1, 2] == 5 and not b.any()
    before = rss_anon()
    big = zero_pages((16, 1 << 20))
    assert float(big.sum()) == 0.0
    assert rss_anon() - before < 8 << 20
    big[:] = 1
    assert rss_anon() - before > 60 << 20


@pytest.mark.parametrize("recipe", [None, "int8(targets=head),int4(group=32),lazy-emb(storage=int8)"])
def test_streamed_compile_writes_the_same_bytes(tmp_path, monkeypatch, recipe):
    ckpt = save_random_v7(tmp_path / "m.pth", n_layer=2, n_embd=128, head_size=64, vocab_size=500, seed=1,
                          dtype="bf16", dims={"w": 32, "a": 32, "v": 32, "g": 64})
    import rwkvc.frontend as frontend
    eager = tmp_path / "eager"
    load = frontend.load_model
    monkeypatch.setattr(frontend, "load_model", lambda p, cluster_file=None, lazy=False: load(p, cluster_file))
    from rwkvc.passes import PassContext
    ctx = PassContext(progress=False)
    ctx.keep = lambda rep: rep                      # quantised weights stay in memory
    compile_checkpoint(ckpt, eager, passes=recipe, ctx=ctx)
    monkeypatch.setattr(frontend, "load_model", load)
    monkeypatch.setattr(mapped, "MIN_ELEMENTS", 1)  # every tensor lazy, every quantised array spilled
    monkeypatch.setattr(mapped, "SPILL_BYTES", 1)
    streamed = tmp_path / "streamed"
    compile_checkpoint(ckpt, streamed, passes=recipe)
    names = sorted(p.name for p in eager.iterdir() if p.is_file() and p.name != "manifest.json")
    assert "weights.bin" in names
    for n in names:
        assert filecmp.cmp(eager / n, streamed / n, shallow=False), n
    assert not [p for p in tmp_path.iterdir() if ".spill-" in p.name]   # the scratch directory is gone


COMPILE_IMPORTS = "import torch, onnx, numpy\nimport rwkvc.pipeline, rwkvc.frontend, rwkvc.artifact, rwkvc.passes, " \
    "rwkvc.targets.cpu, rwkvc.targets.onnx.build"


def test_compile_memory_stays_well_below_the_model(tmp_path):
    # fp32 weights: emb + head 2 x 32768 x 1024 x 4 B = 268 MB, two layers ~100 MB; the bf16 file ~185 MB.
    # The peak is the child's VmHWM (its own mm's high-water mark; ru_maxrss would include the forked test
    # process's), reset after the imports.
    ckpt = save_random_v7(tmp_path / "big.pth", n_layer=2, n_embd=1024, head_size=64, vocab_size=32768,
                          seed=0, dtype="bf16")
    fp32 = 2 * os.path.getsize(ckpt)
    base, peak = child_peak(COMPILE_IMPORTS, "rwkvc.pipeline.compile_checkpoint(sys.argv[1], sys.argv[2], progress=False)",
                            ckpt, tmp_path / "out")
    assert (tmp_path / "out" / "weights.bin").stat().st_size > 0.95 * fp32
    extra = peak - base
    print(f"interpreter {base / 1e6:.0f} MB, compile peak {peak / 1e6:.0f} MB: +{extra / 1e6:.0f} MB "
          f"for {fp32 / 1e6:.0f} MB of float32 weights")
    assert extra < fp32 / 2, f"compile used {extra / 1e6:.0f} MB above the interpreter for {fp32 / 1e6:.0f} MB of weights"


def test_safetensors_read_lazily_match(tmp_path):
    import torch
    from safetensors.torch import save_file

    from rwkvc.frontend import load_state_dict
    sd = {"a": torch.randn(3, 5).to(torch.bfloat16), "b": torch.randn(7), "c": torch.randn(2, 2).half()}
    save_file(sd, str(tmp_path / "m.safetensors"))
    got = load_state_dict(tmp_path / "m.safetensors", lazy=True)
    assert set(got) == set(sd) and all(torch.equal(got[k], sd[k]) for k in sd)
    assert np.array_equal(mapped.to_float32(got["a"]), sd["a"].float().numpy())


def _vma_rss_kb(addr: int) -> int:
    """Resident kB of the mapping (one /proc/self/smaps entry) that holds this address."""
    import re
    hit = False
    for line in open("/proc/self/smaps"):
        m = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
        if m:
            hit = int(m.group(1), 16) <= addr < int(m.group(2), 16)
        elif hit and line.startswith("Rss:"):
            return int(line.split()[1])
    raise AssertionError("no mapping holds the address")


def test_lazy_embedding_stays_on_disk_while_prompts_run(tmp_path):
    """The lazy-emb table (65536 rows of 256 int8 bytes, 16 MB) stays memory-mapped and only the pages of the
    rows read become resident: after 600 random prompt tokens and 300 decode steps (at most 900 pages, 3.7 MB
    even with no row sharing a page), far below the table, although the compile just wrote the file (its pages
    are in the page cache, in the large folios a fault would map whole)."""
    import rwkvc
    ckpt = save_random_v7(tmp_path / "m.pth", n_layer=1, n_embd=256, head_size=64, vocab_size=65536, seed=2,
                          dims={"w": 32, "a": 32, "v": 32, "g": 64})
    out = tmp_path / "a"
    compile_checkpoint(ckpt, out, passes="int8,lazy-emb(storage=int8)")
    m = rwkvc.load(out, threads=1)
    table = m.runtime.mapped["emb.q8"]
    assert table.nbytes == 65536 * 256
    rng = np.random.default_rng(0)
    _, st = m.forward(rng.integers(1, 65536, 600).tolist())
    for t in rng.integers(1, 65536, 300).tolist():
        _, st = m.forward([t], st)
    assert _vma_rss_kb(table.ctypes.data) < 4 * 1024
