"""Transparent huge pages for the runtime's weights.

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


def collapse(regions) -> int:
    """Advise and collapse the whole 2 MiB pages inside `regions` into huge pages; returns the bytes done."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return 0
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    done = 0
    for lo, hi in regions:
        lo, hi = -(-lo // HUGE_PAGE) * HUGE_PAGE, hi // HUGE_PAGE * HUGE_PAGE
        if hi - lo < HUGE_PAGE or libc.madvise(lo, hi - lo, MADV_HUGEPAGE) != 0:
            continue
        if libc.madvise(lo, hi - lo, MADV_COLLAPSE) == 0:
            done += hi - lo
    return done
