"""RWKV "World" tokenizer (rwkv_vocab_v20230424), byte-level greedy longest match.

Produces exactly the same ids as the official ``rwkv.rwkv_tokenizer.TRIE_TOKENIZER``:
at every position the longest vocabulary entry that is a prefix of the remaining
UTF-8 bytes is emitted.  Every single byte 0..255 is a vocabulary entry, so any
byte string (and therefore any Unicode string) round-trips exactly.

The vocabulary file is parsed with :func:`ast.literal_eval` only; it is never
executed.  Token id 0 is end-of-document and has no bytes.
"""

from __future__ import annotations

import ast
import codecs
from pathlib import Path
from typing import Iterable, Sequence

from rwkvc.errors import RwkvcError

__all__ = ["WorldTokenizer", "StreamDecoder", "DEFAULT_VOCAB_PATH"]

DEFAULT_VOCAB_PATH = Path(__file__).resolve().parent / "data" / "rwkv_vocab_v20230424.txt"


def _short(text: str, limit: int = 60) -> str:
    r = repr(text)
    return r if len(r) <= limit else r[: limit - 3] + "..."


class WorldTokenizer:
    """Greedy longest-match byte tokenizer for the RWKV World vocabulary."""

    vocab_size: int = 65536  # model vocabulary (embedding rows); ids >= len(vocab)+1 are unused
    eod_id: int = 0  # end-of-document; decodes to b""

    def __init__(self, vocab_path: str | Path | None = None):
        path = Path(vocab_path) if vocab_path is not None else DEFAULT_VOCAB_PATH
        self.vocab_path = path
        id_to_bytes = self._load(path)
        self._id_to_bytes: list[bytes | None] = id_to_bytes
        self.max_token_id = len(id_to_bytes) - 1
        if self.max_token_id >= self.vocab_size:
            # A larger custom vocabulary: grow the model vocabulary to fit.
            self.vocab_size = self.max_token_id + 1
        self._token_to_id: dict[bytes, int] = {}
        for idx, b in enumerate(id_to_bytes):
            if b is not None:
                self._token_to_id[b] = idx  # later ids win, like the official tokenizer
        for byte in range(256):
            if bytes([byte]) not in self._token_to_id:
                raise RwkvcError(
                    f"{path}: vocabulary lacks the single byte {byte:#04x}; "
                    "a byte-level vocabulary must contain all 256 bytes"
                )
        self._single, self._lengths = self._build_index(self._token_to_id)
        from .mapped import trim_heap
        trim_heap()   # the parse's garbage (~7 MB of small objects) back to the system

    # ------------------------------------------------------------------ loading
    @staticmethod
    def _load(path: Path) -> list[bytes | None]:
        try:
            with open(path, "r", encoding="utf-8") as f:
                lines = f.read().split("\n")
        except FileNotFoundError:
            raise RwkvcError(
                f"vocabulary file not found: {path}; reinstall rwkvc or pass an existing vocab_path"
            ) from None
        except UnicodeDecodeError as e:
            raise RwkvcError(
                f"{path}: vocabulary file is not valid UTF-8 (byte offset {e.start}); "
                "restore the original rwkv_vocab_v20230424.txt"
            ) from None
        except OSError as e:
            raise RwkvcError(f"cannot read vocabulary file {path}: {e.strerror or e}") from None

        entries: dict[int, bytes] = {}
        for lineno, line in enumerate(lines, start=1):
            if line.endswith("\r"):
                line = line[:-1]
            if not line.strip():
                continue

            def bad(reason: str) -> RwkvcError:
                return RwkvcError(
                    f"{path}:{lineno}: corrupt vocabulary line ({reason}): {_short(line)}; "
                    "restore the original vocabulary file"
                )

            first = line.find(" ")
            last = line.rfind(" ")
            if first <= 0 or last <= first:
                raise bad("expected '<id> <literal> <byte_length>'")
            try:
                idx = int(line[:first])
                length = int(line[last + 1 :])
            except ValueError:
                raise bad("id and byte length must be integers") from None
            try:
                value = ast.literal_eval(line[first + 1 : last].strip())
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                raise bad("token is not a Python str/bytes literal") from None
            if isinstance(value, str):
                try:
                    value = value.encode("utf-8")
                except UnicodeEncodeError:
                    raise bad("token string is not encodable as UTF-8") from None
            elif not isinstance(value, bytes):
                raise bad(f"token literal is a {type(value).__name__}, expected str or bytes")
            if len(value) != length:
                raise bad(f"token has {len(value)} bytes but the line says {length}")
            if length == 0:
                raise bad("empty token")
            if idx <= 0:
                raise bad("token id must be >= 1 (0 is end-of-document)")
            if idx in entries:
                raise bad(f"duplicate token id {idx}")
            entries[idx] = value
        if not entries:
            raise RwkvcError(f"{path}: vocabulary file is empty; restore the original vocabulary file")
        table: list[bytes | None] = [None] * (max(entries) + 1)
        for idx, value in entries.items():
            table[idx] = value
        return table

    @staticmethod
    def _build_index(token_to_id: dict[bytes, int]) -> tuple[list[int], dict[int, tuple[int, ...]]]:
        """(each single byte's id, {first two bytes as an int: the lengths of the tokens of 2+ bytes starting with
        them, longest first}). With the token dict this is all greedy longest match needs: ~7 MB for the World
        vocabulary, where a byte trie of Python dicts takes ~35 MB of every process that loads a model."""
        single = [token_to_id[bytes([b])] for b in range(256)]
        lengths: dict[int, set] = {}
        for tok in token_to_id:
            if len(tok) > 1:
                lengths.setdefault(tok[0] << 8 | tok[1], set()).add(len(tok))
        shared: dict[tuple, tuple] = {}   # one tuple per distinct set of lengths
        return single, {k: shared.setdefault(t, t) for k, v in lengths.items()
                        for t in [tuple(sorted(v, reverse=True))]}

    # ----------------------------------------------------------------- encoding
    def encode_bytes(self, b: bytes | bytearray | memoryview) -> list[int]:
        """Greedy longest-match tokenization of a byte string: at each position, the longest token that is a
        prefix of the rest (tried longest first among the lengths of the tokens sharing its first two bytes)."""
        src = bytes(b)
        n = len(src)
        get, single, lengths = self._token_to_id.get, self._single, self._lengths
        out: list[int] = []
        append = out.append
        i = 0
        while i < n:
            if i + 1 < n:
                for L in lengths.get(src[i] << 8 | src[i + 1], ()):
                    if i + L <= n:
                        t = get(src[i:i + L])
                        if t is not None:
                            append(t)
                            i += L
                            break
                else:
                    append(single[src[i]])
                    i += 1
            else:
                append(single[src[i]])
                i += 1
        return out

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` encoded as UTF-8."""
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise RwkvcError(
                f"text contains a character that is not encodable as UTF-8 "
                f"({_short(e.object[e.start:e.end])} at position {e.start}); remove lone surrogates"
            ) from None
        return self.encode_bytes(data)

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    # ----------------------------------------------------------------- decoding
    def token_bytes(self, token: int) -> bytes:
        """Bytes of one token (b"" for end-of-document)."""
        table = self._id_to_bytes
        if 0 <= token < len(table):
            b = table[token]
            if b is not None:
                return b
            if token == self.eod_id:
                return b""
        raise RwkvcError(
            f"token id {token} is not in the vocabulary (valid ids: 0..{self.max_token_id}); "
            "ban unused ids when sampling (see WorldTokenizer.unused_ids)"
        )

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        table = self._id_to_bytes
        if not isinstance(ids, (list, tuple)):
            ids = list(ids)
        try:
            return b"".join([table[i] if i > 0 else self.token_bytes(i) for i in ids])
        except (IndexError, TypeError):
            for i in ids:  # locate the offending id for a precise message
                self.token_bytes(i)
            raise

    def decode(self, ids: Iterable[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    @property
    def unused_ids(self) -> tuple[int, ...]:
        """Ids in [1, vocab_size) that have no bytes (never produced by the tokenizer)."""
        table = self._id_to_bytes
        return tuple(
            i for i in range(1, self.vocab_size) if i >= len(table) or table[i] is None
        )

    def __len__(self) -> int:
        return self.vocab_size

    def stream_decoder(self) -> "StreamDecoder":
        return StreamDecoder(self)


class StreamDecoder:
    """Incremental detokenizer: feed ids one at a time, get back completed text.

    Bytes of a partial multi-byte UTF-8 character are held until the character is
    complete; invalid sequences become U+FFFD.  ``"".join(feeds) + flush()`` equals
    ``tokenizer.decode(all_ids)``.
    """

    def __init__(self, tokenizer: WorldTokenizer):
        self._tok = tokenizer
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token: int) -> str:
        return self._dec.decode(self._tok.token_bytes(token))

    def feed_many(self, tokens: Sequence[int]) -> str:
        return self._dec.decode(self._tok.decode_bytes(tokens))

    def flush(self) -> str:
        """Return any held bytes (as U+FFFD if incomplete) and reset."""
        out = self._dec.decode(b"", final=True)
        self._dec.reset()
        return out

    @property
    def pending(self) -> bool:
        """True while bytes of an incomplete character are held."""
        return bool(self._dec.getstate()[0])
