"""How the runtime keeps its weights in memory (runtimes/onnxruntime.py, runtimes/hugepages.py, rwkvc/mapped.py):
the tables read by rows stay on disk, read ahead a call at a time and handed back; the weights the kernels read
in place are copied into huge pages."""
import numpy as np
import pytest

import rwkvc
from rwkvc.runtimes.ort_batch import BatchPool
from rwkvc.testing import save_random_v7



def _present_pages(a: np.ndarray) -> int:
    """Pages of `a` mapped into this process now (/proc/self/pagemap's present bit)."""
    import mmap
    import struct
    page = mmap.PAGESIZE
    first, last = a.ctypes.data // page, (a.ctypes.data + a.nbytes - 1) // page
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(first * 8)
        raw = f.read((last - first + 1) * 8)
    return sum(e >> 63 for e in struct.unpack(f"<{len(raw) // 8}Q", raw))


@pytest.fixture(scope="module")
def lazy(tmp_path_factory):
    """An int4 artifact whose int8 embedding stays on disk, read by rows (rows of 256 bytes)."""
    d = tmp_path_factory.mktemp("lazy")
    path = save_random_v7(d / "m.pth", n_layer=1, n_embd=256, head_size=64, vocab_size=65536, seed=5)
    return rwkvc.compile(path, d / "a", passes="int4(group=32),lazy-emb(storage=int8)")


def test_batched_steps_hand_the_embedding_pages_back(lazy):
    """A pool's steps count their tokens toward the runtime's release of the tables read by rows, as the
    own step does: 8 sequences through 100 steps of new tokens (800 rows, one a page) leave at most the rows
    read since the last release mapped, not all 800."""
    import sys
    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc/self/pagemap")
    m = rwkvc.load(lazy)
    table = m.runtime.mapped["emb.q8"]
    rows_a_page = 4096 // table.strides[0]
    pool = BatchPool(m.runtime, 8)
    for i in range(8):
        pool.add(m.forward(m.encode(f"sequence {i}"))[1])
    for s in range(100):
        pool.step((np.arange(8) + 8 * s) * rows_a_page + 3)       # each token's row on a page of its own
    touched = 800
    assert _present_pages(table) <= m.runtime.TABLE_RELEASE_TOKENS + 8 < touched


def test_rows_of_a_call_are_read_ahead_together(lazy):
    """The runtime reads ahead the embedding rows of a call's tokens (the tables a Gather indexes by `tokens`,
    rows of 256 bytes or more; not the per-row scales), and after read_ahead_rows the pages of those rows
    are in the page cache (mincore) where they were dropped from it."""
    import ctypes
    import mmap
    import time

    from rwkvc.mapped import drop_cached, read_ahead_rows
    m = rwkvc.load(lazy)
    assert [a.shape for a in m.runtime._token_tables] == [(65536, 256)]
    table = m.runtime._token_tables[0]
    page = mmap.PAGESIZE
    rows = np.array([40000, 50000, 60000, 70000, -1])    # the last two outside the table: ignored
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p)

    def cached(r):
        addr = (table.ctypes.data + int(r) * table.strides[0]) // page * page
        vec = ctypes.create_string_buffer(1)
        assert libc.mincore(addr, page, vec) == 0
        return vec.raw[0] & 1

    drop_cached(str(lazy / "weights.bin"), 0, (lazy / "weights.bin").stat().st_size)
    if any(cached(r) for r in rows[:3]):
        pytest.skip("this file system keeps the pages cached (fadvise DONTNEED has no effect)")
    read_ahead_rows(table, rows)
    deadline = time.monotonic() + 5
    while not all(cached(r) for r in rows[:3]) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert all(cached(r) for r in rows[:3])



def test_anonymous_copy_keeps_contents_and_hands_the_sources_back(tmp_path):
    """hugepages.anonymous_copy: the same values in one anonymous mapping, 2 MiB aligned, each source's pages
    handed back chunk by chunk as it is copied (the sources' mapped pages are gone afterwards)."""
    from rwkvc.mapped import release_array
    from rwkvc.runtimes import hugepages
    rng = np.random.default_rng(0)
    f = tmp_path / "w.bin"
    a, b = rng.standard_normal((2048, 1024)).astype(np.float32), rng.integers(0, 255, 3 << 20).astype(np.uint8)
    f.write_bytes(a.tobytes() + b.tobytes())
    mm = np.memmap(f, np.uint8, mode="r")
    src = {"a": mm[:a.nbytes].view(np.float32).reshape(a.shape), "b": mm[a.nbytes:]}
    for v in src.values():
        v.sum()                                   # mapped now
    released = []
    out, buf = hugepages.anonymous_copy(src, lambda x: (released.append(x.nbytes), release_array(x)))
    np.testing.assert_array_equal(out["a"], a)
    np.testing.assert_array_equal(out["b"], b)
    assert out["a"].ctypes.data % hugepages.HUGE_PAGE == 0 and max(released) <= hugepages.COPY_CHUNK
    assert sum(released) == a.nbytes + b.nbytes
    assert _present_pages(mm) == 0
    if hugepages.enabled():
        assert hugepages.huge_bytes(out["a"].ctypes.data, out["a"].ctypes.data + 1) > 0


def test_the_weights_read_in_place_live_in_huge_pages(lazy):
    """With huge pages (the default), the runtime's sessions read the weights from the anonymous copy, the
    embedding table read by rows from the file; the logits are those of the file mapping (huge_pages=False)."""
    from rwkvc.runtimes import hugepages
    if not hugepages.enabled():
        pytest.skip("transparent huge pages are off on this machine")
    a, b = rwkvc.load(lazy, huge_pages=False), rwkvc.load(lazy)
    assert a.runtime._anonymous is None and b.runtime._anonymous is not None
    base = np.frombuffer(b.runtime._anonymous, np.uint8)
    inside = lambda x: base.ctypes.data <= x.ctypes.data < base.ctypes.data + base.nbytes  # noqa: E731
    codes = [n for n in b.runtime.mapped if n.endswith(".q4i")]
    assert codes and all(inside(b.runtime.mapped[n]) for n in codes)
    assert not inside(b.runtime.mapped["emb.q8"])
    toks = b.encode("The weights in huge pages")
    la, sa = a.forward(toks)
    lb, sb = b.forward(toks)
    np.testing.assert_array_equal(lb, la)
    for _ in range(3):
        t = int(np.argmax(la))
        la, sa = a.forward([t], sa)
        lb, sb = b.forward([t], sb)
        np.testing.assert_array_equal(lb, la)


def test_no_copy_where_it_would_take_over_half_the_memory_available(lazy, monkeypatch):
    """Anonymous pages can only be swapped out, file pages dropped and read again: where the copy would take
    more than half the memory available at load, the weights stay in the file mapping (and still run)."""
    from rwkvc.runtimes import hugepages
    from rwkvc.runtimes import onnxruntime as ort_runtime
    if not hugepages.enabled():
        pytest.skip("transparent huge pages are off on this machine")
    monkeypatch.setattr(ort_runtime, "mem_available", lambda: 1 << 20)
    m = rwkvc.load(lazy)
    assert m.runtime._anonymous is None and m.runtime.huge_pages
    ref = rwkvc.load(lazy, huge_pages=False)
    toks = m.encode("short of memory")
    np.testing.assert_array_equal(m.forward(toks)[0], ref.forward(toks)[0])


def test_bench_reports_the_weights_in_huge_pages(lazy):
    """`rwkvc bench` says how much of the weights lies in 2 MiB pages: the copy's bytes, and 0 when the
    runtime keeps the file's pages (huge_pages=False)."""
    from rwkvc.bench import bench_artifact
    from rwkvc.runtimes import hugepages
    if not hugepages.enabled():
        pytest.skip("transparent huge pages are off on this machine")
    r = bench_artifact(lazy, n_decode=2, n_prefill=4, repeat=1)
    m = rwkvc.load(lazy)
    copied = np.frombuffer(m.runtime._anonymous, np.uint8).nbytes
    assert 0 < r["weight_bytes_huge_pages"] <= copied
    assert rwkvc.load(lazy, huge_pages=False).runtime.huge_page_bytes() == 0
