"""A Hugging Face tokenizer (`tokenizer.json`, the `tokenizers` library) behind the WorldTokenizer interface.

An RWKV-7 hybrid distilled from a transformers teacher keeps the teacher's vocabulary; its checkpoint
directory holds the teacher's `tokenizer.json` (training/distill.py saves it there), the artifact carries it
as `tokenizer/tokenizer.json` and its manifest names the kind `hf-tokenizers`. `load_artifact_tokenizer`
picks the tokenizer a manifest names (TOKENIZER_KINDS), so `rwkvc.load`, `rwkvc run --prompt`,
`rwkvc eval --data text` and `rwkvc serve` encode with the model's own vocabulary.

Every token's bytes are tabled once (`token_bytes`, what StreamDecoder and the sampler read): byte-level
vocabularies (Qwen2, Llama 3, GPT-2) through the inverse of GPT-2's byte-to-unicode map; SentencePiece-style
ones through their `<0xNN>` byte pieces and `▁` spaces; anything else through the library's decode of the
single token. `decode` is the library's own (so a SentencePiece vocabulary drops its leading space there).
The `tokenizers` library is imported only here, when an artifact needs it.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable

from .errors import RwkvcError

__all__ = ["HFTokenizer", "load_artifact_tokenizer", "source_tokenizer", "check_source_tokenizer", "HF_FILE",
           "TOKENIZER_KINDS"]

HF_FILE = "tokenizer.json"
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-to-unicode map, inverted (the `tokenizers` ByteLevel alphabet)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _uses(spec, kind: str) -> bool:
    """Whether a tokenizer.json component (or a Sequence of them) includes one of type `kind`."""
    if not isinstance(spec, dict):
        return False
    return spec.get("type") == kind or any(_uses(s, kind) for s in spec.get("decoders") or spec.get("pretokenizers")
                                           or [])


class HFTokenizer:
    """encode / decode / token_bytes / unused_ids over a `tokenizer.json`; ids the vocabulary lacks are unused."""

    eod_id: int = 0   # an empty prompt starts from id 0, as with the World tokenizer

    def __init__(self, path: str | Path, vocab_size: int | None = None):
        import json
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise RwkvcError("this artifact's tokenizer is a Hugging Face tokenizer.json: install the `tokenizers` "
                             "package (pip install tokenizers)") from None
        self.path = Path(path)
        try:
            text = self.path.read_text(encoding="utf-8")
            spec = json.loads(text)
            self._tok = Tokenizer.from_str(text)
        except Exception as e:   # the library raises plain Exceptions for a malformed file
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise RwkvcError(f"{self.path}: not a readable Hugging Face tokenizer.json ({first}); restore it from "
                             "the teacher (tokenizer.save_pretrained) and recompile") from None
        n = self._tok.get_vocab_size(with_added_tokens=True)
        self.max_token_id = n - 1
        self.vocab_size = max(n, vocab_size or 0)   # the model's embedding rows may outnumber the vocabulary
        added = {int(k): v for k, v in self._tok.get_added_tokens_decoder().items()}
        byte_level = _uses(spec.get("decoder"), "ByteLevel") or _uses(spec.get("pre_tokenizer"), "ByteLevel")
        table: list[bytes | None] = []
        bd = _byte_decoder()
        for i in range(n):
            piece = self._tok.id_to_token(i)
            if piece is None:
                table.append(None)
            elif i in added:
                table.append(added[i].content.encode("utf-8"))
            elif byte_level and all(c in bd for c in piece):
                table.append(bytes(bd[c] for c in piece))
            elif _BYTE_PIECE.fullmatch(piece):
                table.append(bytes([int(piece[3:5], 16)]))
            elif "▁" in piece:
                table.append(piece.replace("▁", " ").encode("utf-8"))
            else:
                table.append(self._tok.decode([i], skip_special_tokens=False).encode("utf-8"))
        self._id_to_bytes = table

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def token_bytes(self, token: int) -> bytes:
        if 0 <= token < len(self._id_to_bytes) and self._id_to_bytes[token] is not None:
            return self._id_to_bytes[token]
        raise RwkvcError(f"token id {token} is not in this tokenizer.json's vocabulary (valid ids: "
                         f"0..{self.max_token_id}); ban unused ids when sampling (see unused_ids)")

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return b"".join(self.token_bytes(int(i)) for i in ids)

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        for i in ids:
            self.token_bytes(i)   # an id outside the vocabulary: the same one-line error as token_bytes
        return self._tok.decode(ids, skip_special_tokens=False)

    @property
    def unused_ids(self) -> tuple[int, ...]:
        table = self._id_to_bytes
        return tuple(i for i in range(self.vocab_size) if i >= len(table) or table[i] is None)

    def __len__(self) -> int:
        return self.vocab_size


def _world(path: Path, vocab_size: int | None):
    from .tokenizer import WorldTokenizer
    return WorldTokenizer(path)


# manifest["tokenizer"]["kind"] -> a constructor (file path, the model's vocabulary size)
TOKENIZER_KINDS = {"rwkv-world": _world, "hf-tokenizers": HFTokenizer}


def load_artifact_tokenizer(d: Path, manifest: dict, vocab_size: int | None = None):
    """The tokenizer an artifact's manifest names, its file confined to the artifact."""
    from .artifact import inside
    spec = manifest["tokenizer"]
    kind = spec.get("kind", "rwkv-world")
    if kind not in TOKENIZER_KINDS:
        raise RwkvcError(f"{d}: a tokenizer of kind {kind!r}, which this rwkvc cannot read; upgrade rwkvc")
    return TOKENIZER_KINDS[kind](inside(Path(d), spec.get("file"), "tokenizer file"), vocab_size)


def source_tokenizer(model_path) -> Path | None:
    """The Hugging Face tokenizer.json beside an RWKV-7 hybrid checkpoint's config.json, if there is one."""
    from .arch.hybrid import config_path
    cfg = config_path(model_path)
    if cfg is None or not (cfg.parent / HF_FILE).is_file():
        return None
    return cfg.parent / HF_FILE


def check_source_tokenizer(path: Path, vocab_size: int) -> HFTokenizer:
    """Read a checkpoint's tokenizer.json (one-line error if it is damaged) and check it fits the model."""
    tok = HFTokenizer(path)
    if tok.max_token_id >= vocab_size:
        raise RwkvcError(f"{path}: has {tok.max_token_id + 1} tokens, more than the model's vocabulary of "
                         f"{vocab_size}; put the teacher's own tokenizer.json beside the checkpoint")
    return tok
