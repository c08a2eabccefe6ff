"""Decoding bytes to text the way Japanese (and other) mailers really write them.

Python's own `iso-2022-jp` codec rejects the CP932 characters that Japanese mailers put inside
ISO-2022-JP (①, ㈱, 髙, ...), and `shift_jis` rejects the same in Shift_JIS. Mail labelled with
those charsets is decoded here as its CP932 superset. Labels are trusted only while the bytes
agree with them: 8-bit bytes under an ISO-2022-JP or US-ASCII label, bytes invalid in the
labelled charset, or no label at all send the bytes to `guess`, which prefers UTF-8, then the
Japanese encoding that yields real kana, then charset-normalizer. Every decode returns the text
and a list of defects (a wrong or missing label, bytes that had to be replaced).
"""

from __future__ import annotations

import codecs

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
    best = from_bytes(data).best()
    if best is not None:
        codec = _known_codec(best.encoding.lower()) or best.encoding
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
    if text is not None and codec in SINGLE_BYTE_CODECS and _strict(data, "utf-8") is not None:
        return None  # valid multi-byte UTF-8 under a single-byte label: it is UTF-8
    return text


def decode_bytes(data: bytes, charset: str | None) -> tuple[str, list[str]]:
    """Decode `data` declared as `charset` (may be None or wrong); return text and defects."""
    label = normalise_label(charset)
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
