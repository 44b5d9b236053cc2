"""Megatron "binidx" token files (MMapIndexedDataset), as RWKV-LM reads and writes them.

A dataset is a pair PREFIX.bin + PREFIX.idx:
    PREFIX.bin   the tokens of every sequence, back to back (dtype from the index, uint16 for World)
    PREFIX.idx   b"MMIDIDX\\x00\\x00"  magic (9 bytes)
                 u64 version = 1, u8 dtype code (8 = uint16), u64 N sequences, u64 M doc indices
                 int32 sizes[N]     tokens per sequence
                 int64 pointers[N]  byte offset of each sequence in .bin
                 int64 doc_idx[M]   sequence index where each document starts (RWKV-LM: 0, 1, .., N)
All integers little-endian. RWKV-LM's make_data.py writes one sequence per document, each ending in
token 0 (end of document), and its trainer reads the .bin as one flat token stream.

The reader checks the index against the file sizes, so a truncated or corrupt pair fails with one
`RwkvcError` naming the file instead of reading garbage.
"""
from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

from rwkvc.errors import RwkvcError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_BYTES = len(MAGIC) + 8 + 1 + 8 + 8  # 34

# Megatron's dtype codes (6 and 7 are float64 there; token files never use them)
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 8: np.uint16}
CODES = {np.dtype(v): k for k, v in DTYPES.items()}


def prefix_of(path: str | os.PathLike) -> str:
    """'data/minipile', 'data/minipile.bin' or 'data/minipile.idx' -> 'data/minipile'."""
    p = str(path)
    return p[:-4] if p.endswith((".bin", ".idx")) else p


class Index:
    """The parsed .idx file: dtype, sizes (N,), pointers (N,), doc_idx (M,)."""

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        if not path.is_file():
            raise RwkvcError(f"index file {path} not found (a binidx dataset is PREFIX.bin + PREFIX.idx, "
                             "as written by training/make_data.py)")
        raw = path.read_bytes()
        bad = lambda why: RwkvcError(f"index file {path} is corrupt: {why}")  # noqa: E731
        if len(raw) < HEADER_BYTES or raw[:9] != MAGIC:
            raise bad("it does not start with the MMIDIDX magic")
        version, code, n, m = struct.unpack_from("<QBQQ", raw, 9)
        if version != VERSION:
            raise bad(f"version {version}, expected {VERSION}")
        if code not in DTYPES:
            raise bad(f"dtype code {code} is not an integer token type ({sorted(DTYPES)})")
        expect = HEADER_BYTES + 4 * n + 8 * n + 8 * m
        if len(raw) != expect:
            raise bad(f"{len(raw)} bytes, but its header ({n} sequences, {m} doc indices) needs {expect}")
        self.path = path
        self.dtype = np.dtype(DTYPES[code])
        self.sizes = np.frombuffer(raw, np.int32, n, HEADER_BYTES)
        self.pointers = np.frombuffer(raw, np.int64, n, HEADER_BYTES + 4 * n)
        self.doc_idx = np.frombuffer(raw, np.int64, m, HEADER_BYTES + 12 * n)
        if n and (self.sizes < 0).any():
            raise bad("negative sequence size")
        starts = np.concatenate([[0], np.cumsum(self.sizes[:-1], dtype=np.int64)]) * self.dtype.itemsize
        if n and not np.array_equal(starts, self.pointers):
            raise bad("pointers do not match the sequence sizes")
        if m and (self.doc_idx[0] != 0 or (np.diff(self.doc_idx) < 0).any() or self.doc_idx[-1] > n):
            raise bad("doc_idx is not an increasing list of sequence indices")

    @property
    def dtype_size(self) -> int:
        return self.dtype.itemsize

    @property
    def num_tokens(self) -> int:
        return int(self.sizes.sum(dtype=np.int64))

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> tuple[int, int]:
        """-> (byte pointer, size) of sequence i."""
        return int(self.pointers[i]), int(self.sizes[i])


class MMapIndexedDataset:
    """Read-only binidx dataset; the .bin is memory-mapped (minipile's 3 GB load instantly).

    Same reading API as RWKV-LM's `src/binidx.py`: len(ds), ds[i], ds.get(i, offset, length),
    ds.sizes, ds.doc_idx, ds._index, ds._bin_buffer; plus `tokens`, the whole .bin as one flat array,
    and `pointers`, the byte offset of each sequence in it.
    """

    def __init__(self, path_prefix: str | os.PathLike):
        prefix = prefix_of(path_prefix)
        self.prefix = prefix
        self._index = Index(prefix + ".idx")
        bin_path = Path(prefix + ".bin")
        if not bin_path.is_file():
            raise RwkvcError(f"data file {bin_path} not found (it belongs with {prefix}.idx)")
        want = self._index.num_tokens * self._index.dtype_size
        have = bin_path.stat().st_size
        if have != want:
            raise RwkvcError(f"data file {bin_path} has {have} bytes but {prefix}.idx describes {want}: "
                             "the pair is truncated or mismatched")
        if want:
            self._bin_buffer = np.memmap(bin_path, dtype=np.uint8, mode="r")
            self.tokens = np.frombuffer(self._bin_buffer, dtype=self._index.dtype)
        else:  # np.memmap refuses empty files
            self._bin_buffer = np.zeros(0, np.uint8)
            self.tokens = np.zeros(0, self._index.dtype)

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, i: int) -> np.ndarray:
        ptr, size = self._index[i]
        start = ptr // self._index.dtype_size
        return self.tokens[start:start + size]

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens of sequence idx from offset; may run past its end into the next ones (as RWKV-LM's)."""
        ptr, size = self._index[idx]
        if length is None:
            length = size - offset
        start = ptr // self._index.dtype_size + offset
        return self.tokens[start:start + length]

    @property
    def sizes(self) -> np.ndarray:
        return self._index.sizes

    @property
    def pointers(self) -> np.ndarray:
        return self._index.pointers

    @property
    def doc_idx(self) -> np.ndarray:
        return self._index.doc_idx

    @property
    def dtype(self) -> np.dtype:
        return self._index.dtype

    def max_token(self, chunk: int = 1 << 26) -> int:
        """Largest token id in the .bin (-1 if empty); scans in chunks to bound memory."""
        best = -1
        for s in range(0, len(self.tokens), chunk):
            best = max(best, int(self.tokens[s:s + chunk].max()))
        return best


class MMapIndexedDatasetBuilder:
    """Writes PREFIX.bin while items are added; `finalize` writes PREFIX.idx (RWKV-LM's API)."""

    def __init__(self, out_file: str | os.PathLike, dtype=np.uint16):
        self._dtype = np.dtype(dtype)
        if self._dtype not in CODES:
            raise ValueError(f"binidx dtype must be one of {sorted(map(str, CODES))}, got {self._dtype}")
        self._data_file = open(out_file, "wb")
        self._sizes: list[int] = []
        self._doc_idx = [0]

    def add_item(self, tokens: np.ndarray):
        tokens = np.asarray(tokens)
        if tokens.dtype != self._dtype:
            raise ValueError(f"item dtype {tokens.dtype} != builder dtype {self._dtype}")
        self._data_file.write(tokens.tobytes(order="C"))
        self._sizes.append(int(tokens.size))

    def end_document(self):
        self._doc_idx.append(len(self._sizes))

    def finalize(self, index_file: str | os.PathLike):
        self._data_file.close()
        write_index(index_file, self._dtype, np.array(self._sizes, np.int64), np.array(self._doc_idx, np.int64))


def write_index(path: str | os.PathLike, dtype, sizes: np.ndarray, doc_idx: np.ndarray):
    """Write a .idx for sequences of `sizes` tokens stored back to back."""
    dtype = np.dtype(dtype)
    sizes = np.asarray(sizes, np.int64)
    if len(sizes) and sizes.max() > np.iinfo(np.int32).max:
        raise ValueError("a binidx sequence must have fewer than 2^31 tokens")
    pointers = np.concatenate([[0], np.cumsum(sizes[:-1])]).astype(np.int64) * dtype.itemsize
    with open(path, "wb") as f:
        f.write(MAGIC)
        f.write(struct.pack("<QBQQ", VERSION, CODES[dtype], len(sizes), len(doc_idx)))
        f.write(sizes.astype("<i4").tobytes())
        f.write(pointers[: len(sizes)].astype("<i8").tobytes())
        f.write(np.asarray(doc_idx, "<i8").tobytes())


def write_binidx(prefix: str | os.PathLike, documents, dtype=np.uint16) -> str:
    """Write token lists (one per document, each already ending in its end-of-document token)."""
    prefix = prefix_of(prefix)
    builder = MMapIndexedDatasetBuilder(prefix + ".bin", dtype)
    for doc in documents:
        builder.add_item(np.asarray(doc, dtype=dtype))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    return prefix


# --------------------------------------------------------------------------------------------------
# magic_prime: the sample permutation modulus of RWKV-LM's trainer

def is_prime(n: int) -> bool:
    if n <= 3:
        return n >= 2
    if n % 2 == 0 or n % 3 == 0:
        return False
    i = 5
    while i * i <= n:
        if n % i == 0 or n % (i + 2) == 0:
            return False
        i += 6
    return True


def magic_prime(data_len: int, ctx_len: int) -> int | None:
    """The largest prime p = 3n + 2 with p <= data_len // ctx_len - 1 (RWKV-LM's rule), or None.

    Why 3n + 2: then gcd(3, p - 1) = 1, so x -> x^3 is a bijection mod p and the trainer's sample
    order ii -> (c * ii^3) mod p visits every one of the p ctx_len-long windows once per p samples.
    Sample i reads tokens [i*ctx_len, i*ctx_len + ctx_len + 1), which p <= data_len/ctx_len - 1 keeps
    inside the data. RWKV-LM prints nothing when data_len < 3 * ctx_len; neither do we (None).
    """
    if ctx_len <= 0 or data_len < 3 * ctx_len:
        return None
    for p in range(data_len // ctx_len - 1, 1, -1):
        if p % 3 == 2 and is_prime(p):
            return p
    return None
