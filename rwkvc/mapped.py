"""Arrays read on demand, so that a compile holds one matrix at a time rather than the model.

    LazyArray(load, shape, dtype)   an array-like whose values come from load() each time they are used
                                    (x[a:b], x.T and x.row_blocks() read only what they need where they can)
    from_torch(t)                   a LazyArray over a memory-mapped checkpoint tensor (torch.load(mmap=True))
    safetensors_mapped(path)        a .safetensors file's tensors over one private mapping of it
    spill(arr, dir), spill_rep(rep, dir)   arrays written to scratch files, read back lazily with read()
    release(t), release_array(a)    drop the resident pages of a memory-mapped tensor / array (MADV_DONTNEED)
    read_ahead_rows(a, rows)        start reading some rows of a memory-mapped table, all at once (MADV_WILLNEED)
    to_float32(t), all_finite(t)    a torch tensor as float32, its finiteness (bf16 without torch's conversion)
    zero_pages(shape)               a float32 zero array in pages of its own, resident only once written

A LazyArray behaves as the numpy array it loads wherever numpy converts it (np.asarray, ufuncs, array
functions, indexing, attributes such as .T or .astype): each use materialises a fresh copy, which is freed
when the caller drops it. Nothing writes through one (a write would go to a temporary copy): the IR's weights
are replaced, never modified in place. Its shape, dtype and nbytes need no load.

Why pages are dropped by hand: the pages of a memory-mapped file that a process has read count in its
resident set until it unmaps the file, so reading a 3 GB checkpoint through one mapping grows the compile's
RSS by 3 GB even though the kernel could reclaim them. After a tensor is converted, release() hands its pages
back (they are clean, private file pages: a later read faults them in again from the file).
"""
from __future__ import annotations

import ctypes
import mmap
import operator
import os
import sys

import numpy as np

PAGE = mmap.PAGESIZE
MADV_RANDOM, MADV_WILLNEED, MADV_DONTNEED = 1, 3, 4
MIN_ELEMENTS = 1 << 16          # smaller tensors are converted on load (vectors, small factors)

_libc = None


def _c():
    """The C library (madvise, malloc_trim), or False where it has none."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        except (OSError, AttributeError):
            _libc = False
    return _libc


def trim_heap() -> None:
    """Hand the C heap's free pages back to the system (glibc's malloc_trim). Arrays of a few MB come from
    the heap once glibc's mapping threshold has risen, and their freed pages stay in the process: a
    calibrating compile that frees a block's buffers grows its RSS by tens of MB a block without this."""
    c = _c()
    if c and hasattr(c, "malloc_trim"):
        c.malloc_trim(0)


def zero_pages(shape) -> np.ndarray:
    """A float32 array of zeros over an anonymous private mapping of its own: its pages take no memory until
    written (reading maps the system's zero page). np.zeros of a few MB gives that only while glibc serves it
    from a new mapping; once its mapping threshold has risen, the zeros are written into reused heap memory."""
    if not hasattr(mmap, "MAP_ANONYMOUS"):
        return np.zeros(shape, np.float32)
    count = int(np.prod(shape))
    m = mmap.mmap(-1, max(1, count) * 4, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return np.frombuffer(m, np.float32, count).reshape(shape)


def _madvise(addr: int, n: int, advice: int = MADV_DONTNEED) -> None:
    _libc = _c()
    if not _libc or n <= 0:
        return
    lo = -(-addr // PAGE) * PAGE           # whole pages inside [addr, addr + n) only: a neighbour's bytes
    hi = (addr + n) // PAGE * PAGE          # (which its owner may have written) are never dropped
    if hi > lo:
        _libc.madvise(lo, hi - lo, advice)


def release_array(a) -> None:
    """Give back the resident pages under a read-only memory-mapped numpy array (np.memmap mode "r"); a later
    read faults them in again from the page cache."""
    _madvise(a.ctypes.data, a.nbytes)


def read_ahead_rows(a, rows) -> None:
    """Start reading the pages under these rows of a memory-mapped table (madvise WILLNEED queues the reads and
    returns; ~2 us a row where the page is in memory already). Rows that are not in memory then come from the
    file together: a Gather would fault on them one after another, each fault waiting for its own read."""
    libc = _c()
    if not libc or a.ndim == 0:
        return
    base, rb, n = a.ctypes.data, a.strides[0], len(a)
    for r in np.asarray(rows).reshape(-1).tolist():
        if 0 <= r < n:
            start = base + r * rb
            page = start // PAGE * PAGE
            libc.madvise(page, start + rb - page, MADV_WILLNEED)


def advise_random(a) -> None:
    """Tell the kernel a memory-mapped array is read at random rows: a page fault then reads that page, not the
    pages around it (the file's read-ahead, up to several MB a fault, would make a table read by rows resident)."""
    _madvise(a.ctypes.data, a.nbytes, MADV_RANDOM)


def drop_cached(path, offset: int, length: int) -> None:
    """Drop a file range's clean pages from the page cache (posix_fadvise DONTNEED). The kernel caches a file it
    wrote or read ahead in large folios, and a page fault maps a whole folio: a table read by rows would then
    become resident hundreds of KB a row even with advise_random. Pages read again after this are single
    pages. Where the call is missing or refused nothing happens."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
    except (OSError, AttributeError):
        pass
    finally:
        os.close(fd)


def release(t) -> None:
    """Give back the resident pages under a memory-mapped torch tensor's bytes. Only for tensors of a
    read-only use of a private file mapping (torch.load(mmap=True)), whose pages equal the file's."""
    _madvise(t.data_ptr(), t.numel() * t.element_size())


def _unwrap(x):
    if isinstance(x, LazyArray):
        return x.load()
    if isinstance(x, (list, tuple)):
        return type(x)(_unwrap(v) for v in x)
    return x


class LazyArray:
    """An array-like loaded on each use (see the module docstring)."""
    __slots__ = ("_load", "shape", "dtype", "source", "_rows", "_cols")

    def __init__(self, load, shape, dtype, source: str = "", rows=None, cols=None):
        """rows: optional fn(start, stop) -> the rows start:stop only (a slice x[a:b] then reads just those);
        cols: optional fn(start, stop) -> the columns start:stop of a 2-D array (x.T's rows, see T)."""
        self._load = load
        self._rows = rows
        self._cols = cols
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.source = source

    def load(self) -> np.ndarray:
        a = self._load()
        if a.shape != self.shape or a.dtype != self.dtype:
            raise RuntimeError(f"{self.source or 'lazy array'}: loaded {a.shape} {a.dtype}, "
                               f"expected {self.shape} {self.dtype}")
        return a

    ndim = property(lambda self: len(self.shape))
    size = property(lambda self: int(np.prod(self.shape, dtype=np.int64)))
    nbytes = property(lambda self: self.size * self.dtype.itemsize)
    itemsize = property(lambda self: self.dtype.itemsize)

    def __len__(self):
        return self.shape[0]

    @property
    def T(self) -> "LazyArray":
        """The transpose, lazy too: a 2-D array read by columns (if its source can) is written block by block."""
        if self.ndim != 2:
            return self.load().T
        rows, cols = self._rows, self._cols
        return LazyArray(lambda: np.ascontiguousarray(self.load().T), self.shape[::-1], self.dtype,
                         self.source + ".T" if self.source else "",
                         rows=(lambda a, b: np.ascontiguousarray(cols(a, b).T)) if cols else None,
                         cols=(lambda a, b: np.ascontiguousarray(rows(a, b).T)) if rows else None)

    def row_blocks(self, max_bytes: int = 1 << 24):
        """The array as consecutive blocks of rows of at most ~max_bytes each (the whole array at once when
        it cannot be read by rows): a writer streams it without holding it."""
        if self._rows is None or self.ndim == 0 or self.shape[0] == 0:
            yield self.load()
            return
        row = max(1, self.nbytes // max(1, self.shape[0]))
        step = max(1, max_bytes // row)
        for a in range(0, self.shape[0], step):
            yield self._rows(a, min(a + step, self.shape[0]))

    def take_rows(self, idx) -> np.ndarray:
        """self[idx] for integer row indices, reading only those rows where the source can (an embedding's
        rows for a few tokens, not the whole table)."""
        idx = np.asarray(idx, np.int64)
        if self._rows is None or self.ndim == 0:
            return self.load()[idx]
        uniq, inv = np.unique(idx, return_inverse=True)
        rows = np.concatenate([self._rows(int(i), int(i) + 1) for i in uniq]) if len(uniq) else \
            np.empty((0,) + self.shape[1:], self.dtype)
        return rows[inv.reshape(idx.shape)]

    def __array__(self, dtype=None, copy=None):
        a = self.load()
        return a if dtype is None else a.astype(dtype, copy=False)

    def __array_ufunc__(self, ufunc, method, *inputs, **kw):
        if "out" in kw:
            kw["out"] = _unwrap(kw["out"])
        return getattr(ufunc, method)(*_unwrap(inputs), **kw)

    def __array_function__(self, func, types, args, kwargs):
        return func(*_unwrap(args), **{k: _unwrap(v) for k, v in kwargs.items()})

    def __getitem__(self, idx):
        if self._rows is not None and isinstance(idx, slice) and idx.step in (None, 1):
            start, stop, _ = idx.indices(self.shape[0])
            return self._rows(start, max(start, stop))
        return self.load()[idx]

    def __iter__(self):
        return iter(self.load())

    def __getattr__(self, name):
        if name.startswith("__"):      # never hand out a temporary's buffer interface
            raise AttributeError(name)
        return getattr(self.load(), name)

    def __repr__(self):
        return f"LazyArray({self.shape}, {self.dtype}{', ' + self.source if self.source else ''})"


def _binary(op, reflected=False):
    if reflected:
        return lambda self, other: op(_unwrap(other), self.load())
    return lambda self, other: op(self.load(), _unwrap(other))


for _name in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and", "or", "xor",
              "lt", "le", "gt", "ge", "eq", "ne"):
    _op = getattr(operator, _name if _name not in ("and", "or") else _name + "_")
    setattr(LazyArray, f"__{_name}__", _binary(_op))
    if _name not in ("lt", "le", "gt", "ge", "eq", "ne"):
        setattr(LazyArray, f"__r{_name}__", _binary(_op, reflected=True))
LazyArray.__neg__ = lambda self: -self.load()
LazyArray.__abs__ = lambda self: abs(self.load())
LazyArray.__hash__ = None


def to_float32(t) -> np.ndarray:
    """A new float32 copy of a bf16 / fp16 / fp32 / fp64 torch tensor. bf16: its bits become the high half of
    each float32 (exact, and ~3x faster than torch's conversion on CPU)."""
    import torch
    if t.dtype == torch.bfloat16 and sys.byteorder == "little":
        out = np.zeros(tuple(t.shape) + (2,), np.uint16)
        out[..., 1] = t.detach().contiguous().view(torch.int16).numpy()
        return out.view(np.float32).reshape(tuple(t.shape))
    return t.detach().to(torch.float32).numpy().copy() if t.dtype != torch.float32 else t.detach().numpy().copy()


_INF_BITS = {"torch.bfloat16": 0x7F80, "torch.float16": 0x7C00}


def all_finite(t, drop_pages: bool = False, block: int = 1 << 22) -> bool:
    """No NaN / Inf in a float torch tensor (16-bit floats by their exponent bits, without a conversion),
    checked `block` values at a time. drop_pages: the tensor is memory-mapped (see release); each block's
    pages are handed back once checked."""
    import torch
    bits = _INF_BITS.get(str(t.dtype))
    flat = t.detach().contiguous().reshape(-1)
    for a in range(0, flat.numel(), block):
        part = flat[a:a + block]
        if bits is None:
            ok = bool(torch.isfinite(part).all())
        else:
            ok = not bool(np.any((part.view(torch.int16).numpy() & bits) == bits))
        if drop_pages:
            release(part)
        if not ok:
            return False
    return True


def from_torch(t, name: str = "", mapped: bool = False) -> LazyArray:
    """A checkpoint tensor as a lazy float32 (bf16 / fp32 / fp64) or float16 array; mapped (the tensor lies
    in a private file mapping of torch.load(mmap=True)): its pages are released after each conversion."""
    import torch
    half = t.dtype == torch.float16
    dtype = np.float16 if half else np.float32

    def rows(a, b):
        part = t[a:b]
        out = part.detach().numpy().copy() if half else to_float32(part)
        if mapped:
            release(part)
        return out

    def cols(a, b):   # by blocks of rows, each released after use: a column block touches every page of t
        out = np.empty((t.shape[0], b - a), dtype)
        step = max(1, (1 << 22) // max(1, t.shape[1] * t.element_size()))
        for r in range(0, t.shape[0], step):
            part = t[r:r + step]
            out[r:r + step] = part[:, a:b].numpy() if half else to_float32(part[:, a:b])
            if mapped:
                release(part)
        return out

    return LazyArray(lambda: rows(0, t.shape[0]), tuple(t.shape), dtype, name, rows=rows,
                     cols=cols if t.dim() == 2 else None)


def transposed(w):
    """w.T, contiguous: lazy for a LazyArray (read by columns when used), a copy for an array."""
    return w.T if isinstance(w, LazyArray) else np.ascontiguousarray(w.T)


def spill(arr, directory: str, name: str) -> LazyArray:
    """Write `arr` to a file in `directory`; a LazyArray that reads it back with read() (no mapping, so the
    process holds only what its caller keeps)."""
    a = np.ascontiguousarray(np.asarray(arr))
    path = os.path.join(directory, f"{len(os.listdir(directory)):06d}.bin")
    with open(path, "wb") as f:
        a.tofile(f)
    shape, dtype = a.shape, a.dtype

    row = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1

    def rows(a, b):
        return np.fromfile(path, dtype=dtype, count=(b - a) * row,
                           offset=a * row * dtype.itemsize).reshape((b - a,) + tuple(shape[1:]))
    return LazyArray(lambda: rows(0, shape[0]) if shape else np.fromfile(path, dtype=dtype).reshape(shape),
                     shape, dtype, name, rows=rows if shape else None)


def safetensors_mapped(path: str) -> dict:
    """{key: tensor} of a .safetensors file, each a view into one private memory mapping of the file (the
    header parsed by safetensors' own rules: 8-byte little-endian length, JSON, then the data)."""
    import json
    import struct

    import torch
    dtypes = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8:
            raise ValueError(f"header length {n} exceeds the file ({size} bytes)")
        header = json.loads(f.read(n))
    storage = torch.UntypedStorage.from_file(path, False, size)
    base = 8 + n
    out = {}
    for k, info in header.items():
        if k == "__metadata__":
            continue
        dt = dtypes.get(info["dtype"])
        if dt is None:
            raise ValueError(f"tensor {k}: dtype {info['dtype']} is not supported")
        lo, hi = info["data_offsets"]
        shape = tuple(info["shape"])
        t = torch.empty(0, dtype=dt)
        item = t.element_size()
        numel = int(np.prod(shape, dtype=np.int64))
        if hi - lo != numel * item or base + hi > size or (base + lo) % item:
            raise ValueError(f"tensor {k}: its offsets do not fit its shape, the file or its alignment")
        out[k] = t.set_(storage, (base + lo) // item, shape)
    return out


SPILL_BYTES = 1 << 16          # arrays at least this big are spilled (a big model's scales and small factors add up)


def spill_rep(rep, directory: str):
    """A weight representation (a dataclass of arrays, possibly nested) with its arrays of at least
    SPILL_BYTES written to `directory` and read back lazily (spill)."""
    import dataclasses
    if not dataclasses.is_dataclass(rep) or isinstance(rep, type):
        return rep
    changes = {}
    for f in dataclasses.fields(rep):
        if not f.init:
            continue
        v = getattr(rep, f.name)
        if isinstance(v, np.ndarray) and v.nbytes >= SPILL_BYTES:
            changes[f.name] = spill(v, directory, f.name)
        elif dataclasses.is_dataclass(v) and not isinstance(v, type):
            new = spill_rep(v, directory)
            if new is not v:
                changes[f.name] = new
    return dataclasses.replace(rep, **changes) if changes else rep
