"""Transparent huge pages for the runtime's weights.

    collapse(regions)            advise and collapse anonymous regions (ONNX Runtime's packed weights)
    huge_bytes(lo, hi)           how much of an address range lies in huge pages now
    anonymous_copy(arrays, ...)  the weights read in place, copied from the file mapping into huge pages

A decode step streams every weight once. With 4 KiB pages that is one TLB entry per 4 KiB, and the page
walks cost part of the memory bandwidth; 2 MiB pages cut them 512-fold. Linux gives anonymous memory huge
pages only where it is advised to (the usual `madvise` THP mode), and ONNX Runtime does not ask for them,
so after a session has packed its weights the new large anonymous mappings are advised (MADV_HUGEPAGE)
and collapsed into huge pages now (MADV_COLLAPSE, Linux >= 6.1). Contents do not change. Where the kernel
has no THP or no MADV_COLLAPSE the calls fail and nothing happens.
"""
from __future__ import annotations

import ctypes
import os

MADV_HUGEPAGE, MADV_COLLAPSE = 14, 25
HUGE_PAGE = 2 << 20
COPY_CHUNK = 4 << 20


def anonymous_regions(min_bytes: int = 16 << 20) -> set[tuple[int, int]]:
    """The process's private writable anonymous mappings of at least min_bytes, as (start, end)."""
    out = set()
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 5 or not fields[1].startswith("rw") or not fields[1].endswith("p"):
                    continue                               # file-backed, named ([stack], [heap]...) or shared
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                if hi - lo >= min_bytes:
                    out.add((lo, hi))
    except OSError:
        pass
    return out


def enabled() -> bool:
    if os.environ.get("RWKVC_HUGE_PAGES", "1") == "0":
        return False
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def _madvise():
    """libc's madvise, or None where there is none."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc.madvise


def collapse(regions) -> int:
    """Advise and collapse the whole 2 MiB pages inside `regions` into huge pages; returns the bytes done."""
    madvise = _madvise()
    if madvise is None:
        return 0
    done = 0
    for lo, hi in regions:
        lo, hi = -(-lo // HUGE_PAGE) * HUGE_PAGE, hi // HUGE_PAGE * HUGE_PAGE
        if hi - lo < HUGE_PAGE or madvise(lo, hi - lo, MADV_HUGEPAGE) != 0:
            continue
        if madvise(lo, hi - lo, MADV_COLLAPSE) == 0:
            done += hi - lo
    return done


def huge_bytes(lo: int, hi: int) -> int:
    """AnonHugePages of this process's mappings that overlap [lo, hi) (/proc/self/smaps; 0 where unreadable)."""
    huge, cur = 0, (0, 0)
    try:
        with open("/proc/self/smaps") as f:
            for line in f:
                head = line.split()[0]
                if "-" in head and not head.endswith(":"):
                    cur = tuple(int(x, 16) for x in head.split("-"))
                elif head == "AnonHugePages:" and cur[0] < hi and lo < cur[1]:
                    huge += int(line.split()[1]) * 1024
    except OSError:
        return 0
    return huge


def anonymous_copy(arrays: dict, release) -> tuple[dict, object]:
    """{name: array} copied into one private anonymous mapping in huge pages (advised before the copy, so
    its faults take 2 MiB pages, and collapsed after it where some did not; each array on a 2 MiB-aligned
    run of whole pages), and the mapping (keep it as long as the copies are used). release(b) is called on
    each COPY_CHUNK bytes of a source right after their copy, so the peak is the copies plus one chunk.

    Why: the page cache maps a weight file in 4 KiB pages where its folios are small (most of a file read
    once), and a decode step that streams every weight then walks a page table entry per 4 KiB; the same
    bytes in anonymous 2 MiB pages decode a 1.5B int4 in 0.75-0.90x the time (bench/huge_pages.py,
    docs/benchmarks/big-models.md).
    Anonymous memory costs the same resident set as the mapped file pages it replaces, but is not shared
    with other processes mapping the same file."""
    import mmap

    import numpy as np
    sizes = {n: -(-a.nbytes // 4096) * 4096 for n, a in arrays.items()}
    total = sum(sizes.values())
    if not total:
        return dict(arrays), None
    buf = mmap.mmap(-1, total + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    raw = np.frombuffer(buf, np.uint8)
    off = (-raw.ctypes.data) % HUGE_PAGE
    madvise = _madvise()
    if madvise is not None:
        madvise(raw.ctypes.data + off, total // HUGE_PAGE * HUGE_PAGE, MADV_HUGEPAGE)
    out = {}
    for name, a in arrays.items():
        src = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
        for lo in range(0, src.size, COPY_CHUNK):   # a chunk at a time, its source pages handed back after it
            raw[off + lo:off + min(src.size, lo + COPY_CHUNK)] = src[lo:lo + COPY_CHUNK]
            release(src[lo:lo + COPY_CHUNK])
        out[name] = raw[off:off + a.nbytes].view(a.dtype).reshape(a.shape)
        off += sizes[name]
    collapse({(raw.ctypes.data, raw.ctypes.data + raw.nbytes)})
    return out, buf
