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

import codecs
import re

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


def iso2022jp_to_cp932_bytes(data: bytes) -> bytes:
    """Transcode ISO-2022-JP (with CP50221 extensions) to CP932 bytes."""
    out = bytearray()
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
            if mode == "jis":
                out += _jis_pair_to_sjis(b, data[i + 1])
            else:
                char = (b"\x1b$(D" + data[i : i + 2]).decode("iso2022_jp_2", "replace")
                out += char.encode("cp932", "replace")
            i += 2
        else:
            out.append(b)
            i += 1
    return bytes(out)


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


def looks_like_iso2022jp(data: bytes) -> bool:
    return any(esc in data for esc in JIS_ESCAPES)


def normalise_label(charset: str | None) -> str | None:
    if not charset:
        return None
    return charset.strip().strip("\"'").lower() or None


def _known_codec(label: str) -> str | None:
    name = CHARSET_ALIASES.get(label, label)
    try:
        return codecs.lookup(name).name
    except LookupError:
        return None


def _strict(data: bytes, codec: str) -> str | None:
    try:
        return data.decode(codec)
    except (UnicodeDecodeError, LookupError):
        return None


def kana_share(text: str) -> float:
    """Share of hiragana/katakana among the non-ASCII characters (0 for ASCII text)."""
    wide = [c for c in text if ord(c) > 0x7F]
    if not wide:
        return 0.0
    kana = sum(1 for c in wide if 0x3041 <= ord(c) <= 0x30FF)
    return kana / len(wide)


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
    good = sum(1 for c in text if ord(c) > 0x7F) - bad
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
    text = iso2022jp_to_cp932_bytes(data).decode("cp932", "replace")
    if "\ufffd" in text:
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
