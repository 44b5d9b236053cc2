"""WorldTokenizer: parity with the official rwkv TRIE_TOKENIZER, round trips, streaming, errors."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rwkvc.errors import RwkvcError
from rwkvc.tokenizer import DEFAULT_VOCAB_PATH, StreamDecoder, WorldTokenizer

TEXTS = [
    "",
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.\n\nUser: hi\n\nAssistant:",
    "def f(x):\n    return x ** 2  # square\n\tif x:\n\t\tpass\r\n",
    "for (int i = 0; i < n; ++i) { a[i] = b[i] * 3.14159; }",
    "中文分词测试：今天天气很好。日本語のテキスト。한국어 텍스트",
    "emoji 😀👍🏽👨‍👩‍👧‍👦 🇫🇷 and ZWJ",
    "     many spaces\t\t\ttabs\n\n\n\nnewlines      ",
    "\x00\x01\x02 control \x7f\x1b[31m",
    "\u0301\u0308 lone combining marks e\u0301",
    "Ωμέγα — Привет мир — مرحبا بالعالم — שלום",
    "1234567890 3.14 2024-01-01 0x1F 1e-9",
    "\ufeffBOM\u2028line sep\u2029para sep\x85nel",
    "a" * 300 + "\n" * 50 + " " * 129,
]


@pytest.fixture(scope="module")
def tok() -> WorldTokenizer:
    return WorldTokenizer()


@pytest.fixture(scope="module")
def official():
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

    return TRIE_TOKENIZER(str(DEFAULT_VOCAB_PATH))


def _random_texts(n: int, seed: int = 1234) -> list[str]:
    rng = random.Random(seed)
    pools = [
        (0x20, 0x7E),  # ASCII
        (0x00, 0x1F),  # controls
        (0x80, 0x7FF),  # 2-byte
        (0x4E00, 0x9FFF),  # CJK
        (0xE000, 0xFFFD),  # BMP tail (private use etc.)
        (0x1F300, 0x1FAFF),  # emoji
        (0x10000, 0x10FFFF),  # astral
    ]
    out = []
    for _ in range(n):
        chars = []
        for _ in range(rng.randint(0, 80)):
            lo, hi = pools[rng.randrange(len(pools))]
            c = rng.randint(lo, hi)
            if 0xD800 <= c <= 0xDFFF:
                c = 0x41
            chars.append(chr(c))
        out.append("".join(chars))
    return out


def test_vocab_basics(tok):
    assert tok.vocab_size == 65536
    assert tok.eod_id == 0
    assert tok.max_token_id == 65529
    assert tok.unused_ids == tuple(range(65530, 65536))
    assert tok.decode_bytes([0]) == b""


def test_same_ids_as_official_fixed_texts(tok, official):
    for text in TEXTS:
        assert tok.encode(text) == official.encode(text), repr(text)


def test_same_ids_as_official_random_unicode(tok, official):
    for text in _random_texts(300):
        assert tok.encode(text) == official.encode(text), repr(text)


def test_same_ids_as_official_random_bytes(tok, official):
    rng = random.Random(99)
    for _ in range(200):
        b = bytes(rng.randrange(256) for _ in range(rng.randint(1, 60)))
        assert tok.encode_bytes(b) == official.encodeBytes(b)
        assert tok.decode_bytes(tok.encode_bytes(b)) == b


def test_same_ids_as_official_long_text(tok, official):
    text = "".join(TEXTS) * 20 + "".join(_random_texts(50, seed=7))
    assert tok.encode(text) == official.encode(text)


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text())
def test_round_trip_and_parity_hypothesis(tok, official, text):
    ids = tok.encode(text)
    assert tok.decode_bytes(ids) == text.encode("utf-8")
    assert tok.decode(ids) == text
    assert ids == official.encode(text)


def test_round_trip_fixed(tok):
    for text in TEXTS + _random_texts(100, seed=5):
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert all(0 < i <= tok.max_token_id for i in ids)


def test_every_byte_is_a_token(tok):
    for b in range(256):
        ids = tok.encode_bytes(bytes([b]))
        assert len(ids) == 1 and tok.decode_bytes(ids) == bytes([b])


def test_encode_batch(tok):
    assert tok.encode_batch(TEXTS[:4]) == [tok.encode(t) for t in TEXTS[:4]]


def test_stream_decoder_concat_equals_text(tok):
    for text in TEXTS + _random_texts(50, seed=11):
        ids = tok.encode(text)
        sd = StreamDecoder(tok)
        pieces = [sd.feed(i) for i in ids]
        tail = sd.flush()
        assert "".join(pieces) + tail == text
        assert tail == ""
        assert all("\ufffd" not in p for p in pieces if "\ufffd" not in text)


def test_stream_decoder_holds_partial_characters(tok):
    sd = tok.stream_decoder()
    emoji = "😀".encode()  # 4 bytes; feed them as 4 single-byte tokens
    ids = [tok.encode_bytes(bytes([b]))[0] for b in emoji]
    assert [sd.feed(i) for i in ids[:3]] == ["", "", ""]
    assert sd.pending
    assert sd.feed(ids[3]) == "😀"
    assert not sd.pending
    # An incomplete character at the end is flushed as U+FFFD.
    sd.feed(ids[0])
    assert sd.flush() == "\ufffd"
    assert sd.feed(tok.encode("ok")[0]) == "ok"


def test_decode_invalid_utf8_replaces(tok):
    ids = tok.encode_bytes(b"a\xffb")
    assert tok.decode(ids) == "a\ufffdb"


def test_unknown_id_raises(tok):
    with pytest.raises(RwkvcError, match="65535"):
        tok.decode([1, 65535])
    with pytest.raises(RwkvcError):
        tok.decode_bytes(iter([-3]))


def test_lone_surrogate_raises(tok):
    with pytest.raises(RwkvcError, match="surrogate"):
        tok.encode("a\ud800b")


# ---------------------------------------------------------------- vocab errors
def _one_line(msg: str) -> bool:
    return "\n" not in msg


def test_missing_vocab_file(tmp_path):
    p = tmp_path / "nope.txt"
    with pytest.raises(RwkvcError) as ei:
        WorldTokenizer(p)
    assert str(p) in str(ei.value) and _one_line(str(ei.value))


def _write_vocab(tmp_path: Path, extra_lines: list[str]) -> Path:
    lines = [f"{i + 1} {bytes([i])!r} 1" for i in range(256)] + extra_lines
    p = tmp_path / "vocab.txt"
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


def test_small_custom_vocab_works(tmp_path):
    p = _write_vocab(tmp_path, ["257 'ab' 2", "258 'abc' 3", "259 'é' 2"])
    t = WorldTokenizer(p)
    assert t.encode("abcab") == [258, 257]
    assert t.encode("é") == [259]
    assert t.decode([258, 259]) == "abcé"


@pytest.mark.parametrize(
    "bad_line",
    [
        "257 __import__('os').system('echo pwned') 1",  # code is never executed
        "257 'ab' 3",  # byte length mismatch
        "257 12345 5",  # not str/bytes
        "x 'ab' 2",  # bad id
        "257 'unterminated 2",
        "garbage",
        "1 'ab' 2",  # duplicate id
    ],
)
def test_corrupt_vocab_line(tmp_path, bad_line):
    p = _write_vocab(tmp_path, [bad_line])
    with pytest.raises(RwkvcError) as ei:
        WorldTokenizer(p)
    msg = str(ei.value)
    assert f"{p}:257" in msg, msg
    assert _one_line(msg)


def test_vocab_missing_single_byte(tmp_path):
    p = tmp_path / "vocab.txt"
    p.write_text("\n".join(f"{i + 1} {bytes([i])!r} 1" for i in range(200)) + "\n", encoding="utf-8")
    with pytest.raises(RwkvcError, match="single byte"):
        WorldTokenizer(p)


def test_vocab_not_utf8(tmp_path):
    p = tmp_path / "vocab.txt"
    p.write_bytes(b"1 '\xff' 1\n")
    with pytest.raises(RwkvcError, match="UTF-8"):
        WorldTokenizer(p)
