"""Decoding bytes to text the way Japanese (and other) mailers really write them.

Python's own `iso-2022-jp` codec rejects the CP932 characters that Japanese mailers put inside
ISO-2022-JP (①, ㈱, 髙, ...), and `shift_jis` rejects the same in Shift_JIS. Mail labelled with
those charsets is decoded here as its CP932 superset. Labels are trusted only while the bytes
agree with them: 8-bit bytes under an ISO-2022-JP or US-ASCII label, bytes invalid in the
labelled charset, or no label at all send the bytes to `guess`, which prefers UTF-8, then the
Japanese encoding that yields real kana, then charset-normalizer. A single-byte label (ISO-8859-1,
windows-1252) accepts any bytes, so it is doubted too when the bytes read as UTF-8 or as
kana-rich Japanese. Every decode returns the text and a list of defects (a wrong or missing
label, bytes that had to be replaced, control characters removed).
"""

from __future__ import annotations

import binascii
import codecs
import email.base64mime
import email.quoprimime
import re
from collections.abc import Iterator

import re2
from charset_normalizer import from_bytes

ESC = 0x1B
SO, SI = 0x0E, 0x0F

# Labels seen on real mail, mapped to the codec that reads them without loss.
CHARSET_ALIASES: dict[str, str] = {
    "shift_jis": "cp932",
    "shift-jis": "cp932",
    "sjis": "cp932",
    "x-sjis": "cp932",
    "ms_kanji": "cp932",
    "csshiftjis": "cp932",
    "windows-31j": "cp932",
    "x-ms-cp932": "cp932",
    "cp932": "cp932",
    "gb2312": "gb18030",
    "gbk": "gb18030",
    "x-gbk": "gb18030",
    "euc-cn": "gb18030",
    "ks_c_5601-1987": "cp949",
    "euc-kr": "cp949",
    "iso-8859-1": "cp1252",
    "latin1": "cp1252",
    "latin-1": "cp1252",
    "us-ascii": "ascii",
    "ascii": "ascii",
    "utf8": "utf-8",
    "unicode-1-1-utf-7": "utf-7",
}
ISO2022JP_LABELS = {"iso-2022-jp", "csiso2022jp", "iso-2022-jp-ms", "cp50220", "cp50221"}
EUC_JP_LABELS = {"euc-jp", "x-euc-jp", "eucjp", "cp51932", "eucjp-ms"}

JIS_ESCAPES = (b"\x1b$B", b"\x1b$@", b"\x1b(I", b"\x1b(J")


def _jis_pair_to_sjis(j1: int, j2: int) -> bytes:
    """Map one JIS X 0208 code (two bytes 0x21-0x7E) to its Shift_JIS bytes."""
    s1 = ((j1 + 1) >> 1) + (0x70 if j1 <= 0x5E else 0xB0)
    s2 = j2 + (0x1F if j2 <= 0x5F else 0x20) if j1 & 1 else j2 + 0x7E
    return bytes((s1, s2))


def iso2022jp_to_text(data: bytes) -> tuple[str, bool]:
    """Decode ISO-2022-JP (with CP50221 extensions) by transcoding it to CP932; also whether
    bytes had to be replaced. A JIS X 0208 byte whose partner is not a JIS byte (corrupt or
    cut-off text) becomes U+FFFD, and its partner is read on its own."""
    pieces: list[str] = []
    out = bytearray()
    corrupt = False
    mode = "ascii"
    saved_mode = "ascii"
    i, n = 0, len(data)
    while i < n:
        b = data[i]
        if b == ESC:
            seq = data[i + 1 : i + 3]
            if seq in (b"(B", b"(J", b"(H"):
                mode, i = "ascii", i + 3
            elif seq == b"(I":
                mode, i = "kana", i + 3
            elif seq in (b"$B", b"$@"):
                mode, i = "jis", i + 3
            elif data[i + 1 : i + 4] == b"$(D":
                mode, i = "jis0212", i + 4
            elif data[i + 1 : i + 4] == b"&@\x1b":
                i += 3  # JIS X 0208-1990 announcer; the designation follows
            else:
                out.append(b)
                i += 1
            continue
        if b == SO:
            saved_mode, mode, i = mode, "kana", i + 1
            continue
        if b == SI:
            mode, i = saved_mode, i + 1
            continue
        if b in (0x0A, 0x0D):
            out.append(b)
            i += 1
            continue
        if mode == "kana" and 0x21 <= b <= 0x5F:
            out.append(b + 0x80)
            i += 1
        elif mode in ("jis", "jis0212") and 0x21 <= b <= 0x7E and i + 1 < n:
            if not 0x21 <= data[i + 1] <= 0x7E:
                pieces.append(out.decode("cp932", "replace") + "\ufffd")
                out.clear()
                corrupt = True
                i += 1
                continue
            if mode == "jis":
                out += _jis_pair_to_sjis(b, data[i + 1])
            else:
                char = (b"\x1b$(D" + data[i : i + 2]).decode("iso2022_jp_2", "replace")
                out += char.encode("cp932", "replace")
            i += 2
        else:
            out.append(b)
            i += 1
    pieces.append(out.decode("cp932", "replace"))
    text = "".join(pieces)
    return text, corrupt or "\ufffd" in text


UTF7_LABELS = {"utf-7", "unicode-1-1-utf-7", "csunicode11utf7", "x-utf-7"}
# Labels that say nothing about 8-bit bytes: the bytes must be guessed.
UNTRUSTED_FOR_8BIT = ISO2022JP_LABELS | {"ascii", "us-ascii", "unknown-8bit", "x-unknown"}
# Single-byte labels under which valid multi-byte UTF-8 is far more likely UTF-8 mislabelled.
SINGLE_BYTE_CODECS = {"cp1252", "iso8859-1", "iso8859-15", "iso8859-2", "cp1250"}
JAPANESE_CODECS = ("cp932", "euc_jp", "euc_jis_2004")
# A decode counts as Japanese when this share of its non-ASCII characters are kana.
KANA_SHARE = 0.15
# Control characters are removed from decoded text: PostgreSQL text refuses NUL, and the others
# (ESC above all) would reach terminals through the CLI. Tab and line breaks are text.
CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b-\x0c\x0e-\x1f\x7f]")
# Python codecs that are no charset: they read backslash escapes or host names, or refuse
# every byte. Bytes labelled with them are guessed like unlabelled bytes.
NOT_CHARSETS = {"undefined", "unicode-escape", "raw-unicode-escape", "idna", "punycode", "charmap"}
KANA = re.compile(r"[\u3041-\u30ff]+")  # one character class: linear


def looks_like_iso2022jp(data: bytes) -> bool:
    return any(esc in data for esc in JIS_ESCAPES)


def normalise_label(charset: str | None) -> str | None:
    """The label in lower case, printable ASCII only: 8-bit bytes (kept as surrogates) and
    control characters in a label are written as escapes, so the label can be shown in a
    defect; such a label names no codec."""
    if not charset:
        return None
    label = charset.strip().strip("\"'").lower()
    if not (label.isascii() and label.isprintable()):
        label = label.encode("utf-8", "surrogateescape").decode("ascii", "backslashreplace")
        label = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in label)
    return label or None


def _known_codec(label: str) -> str | None:
    """The Python codec for a charset label, or None when the label names no charset."""
    name = CHARSET_ALIASES.get(label, label)
    if "\\" in name:
        return None  # a label with escaped 8-bit bytes or control characters
    try:
        info = codecs.lookup(name)
    except (LookupError, ValueError):
        return None
    if info.name in NOT_CHARSETS or not getattr(info, "_is_text_encoding", True):
        return None
    return info.name


def _strict(data: bytes, codec: str) -> str | None:
    if _known_codec(codec) is None:
        return None
    try:
        return data.decode(codec)
    except (UnicodeError, LookupError):  # `undefined` raises a bare UnicodeError
        return None


def _wide(text: str) -> int:
    """The number of non-ASCII characters in `text`."""
    return len(text) - len(text.encode("ascii", "ignore"))


def kana_share(text: str) -> float:
    """Share of hiragana/katakana among the non-ASCII characters (0 for ASCII text)."""
    wide = _wide(text)
    if not wide:
        return 0.0
    kana = len(text) - len(KANA.sub("", text))
    return kana / wide


def _japanese(data: bytes) -> tuple[str, str] | None:
    """The Japanese codec under which `data` reads as the most kana-rich text, if any."""
    decoded = ((c, _strict(data, c)) for c in JAPANESE_CODECS)
    scored = [(kana_share(text), codec, text) for codec, text in decoded if text is not None]
    if not scored:
        return None
    share, codec, text = max(scored, key=lambda item: item[0])
    return (text, codec) if share >= KANA_SHARE else None


def _mostly_utf8(data: bytes) -> str | None:
    """UTF-8 with a few broken bytes (a truncated or damaged character), decoded with U+FFFD."""
    text = data.decode("utf-8", "replace")
    bad = text.count("\ufffd")
    good = _wide(text) - bad
    return text if good > 0 and bad * 4 <= good else None


def _normalizer_guess(data: bytes) -> str | None:
    """charset-normalizer's best encoding for `data`. It often cannot tell short CJK text apart
    (`見積書.pdf` in Shift_JIS ties with UTF-16, Big5, CP949...); a Japanese encoding wins such
    a tie, as this intake serves a Japanese company."""
    matches = list(from_bytes(data))
    if not matches:
        return None
    best = matches[0]
    tied = (m for m in matches if (m.chaos, m.coherence) == (best.chaos, best.coherence))
    japanese = (m for m in tied if _known_codec(m.encoding) in JAPANESE_CODECS)
    return next(japanese, best).encoding


def guess(data: bytes) -> tuple[str, str]:
    """Decode 8-bit `data` whose label is missing or wrong; returns text and the codec used."""
    text = _strict(data, "utf-8")
    if text is not None:
        return text, "utf-8"
    japanese = _japanese(data)
    if japanese is not None:
        return japanese
    text = _mostly_utf8(data)
    if text is not None:
        return text, "utf-8 (damaged)"
    best = _normalizer_guess(data)
    if best is not None:
        codec = _known_codec(best.lower()) or best
        text = _strict(data, codec)
        if text is not None:
            return text, codec
    # cp1252 leaves five bytes undefined; latin-1 reads every byte.
    return _strict(data, "cp1252") or data.decode("latin-1"), "cp1252"


def decode_iso2022jp(data: bytes, label: str | None) -> tuple[str, list[str]]:
    defects = []
    if label not in ISO2022JP_LABELS:
        defects.append(f"charset labelled {label or 'nothing'} but is ISO-2022-JP")
    text, replaced = iso2022jp_to_text(data)
    if replaced:
        defects.append("ISO-2022-JP with undecodable bytes replaced")
    return text, defects


def _labelled(data: bytes, label: str) -> str | None:
    """`data` decoded as its label says, or None when the label cannot be trusted for it."""
    if label in UNTRUSTED_FOR_8BIT:
        return None
    if label in EUC_JP_LABELS:
        return _strict(data, "euc_jp") or _strict(data, "euc_jis_2004")
    codec = _known_codec(label)
    if codec is None:
        return None
    text = _strict(data, codec)
    if text is not None and codec in SINGLE_BYTE_CODECS and _mislabelled_single_byte(data):
        return None
    return text


def _mislabelled_single_byte(data: bytes) -> bool:
    """Every byte is valid in a single-byte charset, so its label proves nothing: valid
    multi-byte UTF-8 or kana-rich Japanese (Shift_JIS kana are all valid CP1252) is far more
    likely mislabelled than Latin text that happens to read that way."""
    return _strict(data, "utf-8") is not None or _japanese(data) is not None


def decode_bytes(data: bytes, charset: str | None) -> tuple[str, list[str]]:
    """Decode `data` declared as `charset` (may be None or wrong); return text and defects.
    Control characters other than tab and line breaks are removed from the text."""
    text, defects = _decode(data, normalise_label(charset))
    clean = CONTROL_CHARS.sub("", text)
    if len(clean) != len(text):
        defects.append("control characters removed")
    if not clean.isascii():
        try:
            clean.encode("utf-8")
        except UnicodeEncodeError:  # UTF-7 can spell a lone surrogate, which no store accepts
            clean = clean.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
            defects.append("lone surrogates replaced")
    return clean, defects


def _decode(data: bytes, label: str | None) -> tuple[str, list[str]]:
    if looks_like_iso2022jp(data):
        return decode_iso2022jp(data, label)
    if data.isascii():
        if label in UTF7_LABELS:
            text = _strict(data, "utf-7")
            if text is not None:
                return text, []
            return data.decode("ascii"), [f"bytes are not valid {label}"]
        return data.decode("ascii"), []
    if label is not None:
        text = _labelled(data, label)
        if text is not None:
            return text, []
    text, codec = guess(data)
    what = f"labelled {label}" if label else "not labelled"
    defects = [f"8-bit text {what}: decoded as {codec}"]
    if "\ufffd" in text:
        defects.append("undecodable bytes replaced")
    return text, defects


# --- RFC 2047 encoded words -------------------------------------------------------------------

# The pattern of `email.header.ecre`, whose backtracking search is quadratic on a header full of
# `=?x?q?` that never closes. RE2 runs it once per header value that holds `=?`; each line is
# then split by `_encoded_words`.
ENCODED_WORD = re2.compile(r"=\?([^?]*?)\?([qQbB])\?(.*?)\?=")
# RE2 reads UTF-8, so the raw 8-bit bytes of a header (kept as lone surrogates) are matched as
# U+FFFD: one code point for one, so that positions stay the same.
_SURROGATES_AS_FFFD = {code: 0xFFFD for code in range(0xD800, 0xE000)}

Chunk = tuple[bytes | str, str | None]


def as_re2_text(text: str) -> str:
    """`text` as RE2 can read it, position for position: lone surrogates become U+FFFD."""
    return text if text.isascii() else text.translate(_SURROGATES_AS_FFFD)


def _encoded_words(line: str) -> Iterator[tuple[int, int, int]]:
    """Where `ecre` finds encoded words in one line (no line breaks): (start, end, position of
    the `?` after the charset). Linear: a charset ends at the first `?`, so an attempt that
    fails on the encoding letter costs a few characters, and one whose `?=` is missing ends
    the search (no later word can close either)."""
    search = 0
    while (start := line.find("=?", search)) >= 0:
        mark = line.find("?", start + 2)
        if mark < 0:
            return
        if line[mark + 1 : mark + 2] in ("q", "Q", "b", "B") and line[mark + 2 : mark + 3] == "?":
            close = line.find("?=", mark + 3)
            if close < 0:
                return
            yield start, close + 2, mark
            search = close + 2
        else:
            search = start + 1


def decode_words(header: str, defects: list[str]) -> list[Chunk]:
    """`email.header.decode_header` for a `str` value, in linear time and without exceptions.

    The chunks are the standard library's: (text, None) for a value without encoded words;
    otherwise bytes per run of one charset, other text as `raw-unicode-escape` bytes. An encoded
    word whose base64 is broken is kept as written, with a defect, where the standard library
    raises `HeaderParseError` for the whole value.
    """
    if "=?" not in header or not ENCODED_WORD.search(as_re2_text(header)):
        return [(header, None)]
    words: list[tuple[str, str | None, str | None, str]] = []  # text, encoding, charset, as written
    for line in header.splitlines():
        pos = 0
        first = True
        for start, end, mark in _encoded_words(line):
            unencoded = line[pos:start]
            if first:
                unencoded, first = unencoded.lstrip(), False
            if unencoded:
                words.append((unencoded, None, None, unencoded))
            charset, letter, encoded = (
                line[start + 2 : mark],
                line[mark + 1],
                line[mark + 3 : end - 2],
            )
            words.append((encoded, letter.lower(), charset.lower(), line[start:end]))
            pos = end
        rest = line[pos:].lstrip() if first else line[pos:]
        if rest:
            words.append((rest, None, None, rest))
    # Whitespace between two encoded words is no text (RFC 2047 section 6.2).
    drop = {
        n - 1
        for n in range(2, len(words))
        if words[n][1] and words[n - 2][1] and words[n - 1][0].isspace()
    }
    collapsed: list[Chunk] = []
    run: list[bytes] = []
    run_charset: str | None = None

    def close_run() -> None:  # plain text runs are joined with spaces, encoded words without
        collapsed.append(((b" " if run_charset is None else b"").join(run), run_charset))

    for n, (text, encoding, word_charset, written) in enumerate(words):
        if n in drop:
            continue
        word = _decode_word(text, encoding, defects, header)
        if word is None:  # broken base64: kept as written, as plain text
            word, word_charset = written.encode("raw-unicode-escape"), None
        if run and word_charset != run_charset:
            close_run()
            run = []
        run.append(word)
        run_charset = word_charset
    if run:
        close_run()
    return collapsed or [(header, None)]


def _decode_word(text: str, encoding: str | None, defects: list[str], header: str) -> bytes | None:
    if encoding is None:
        return text.encode("raw-unicode-escape")
    if encoding == "q":
        return email.quoprimime.header_decode(text).encode("raw-unicode-escape")
    padded = text + "==="[: (4 - len(text) % 4) % 4]
    try:
        return email.base64mime.decode(padded)
    except binascii.Error:
        defects.append(f"malformed encoded word in header: {header[:80]!r}")
        return None
