"""Decoding bytes to text the way Japanese (and other) mailers really write them.

Python's own `iso-2022-jp` codec rejects the CP932 characters that Japanese mailers put inside
ISO-2022-JP (①, ㈱, 髙, ...), and `shift_jis` rejects the same in Shift_JIS. Mail labelled with
those charsets is decoded here as its CP932 superset. Every decode returns the text and a list of
defects (a wrong or missing label, bytes that had to be replaced).
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


def looks_like_iso2022jp(data: bytes) -> bool:
    return data.isascii() and any(esc in data for esc in JIS_ESCAPES)


def normalise_label(charset: str | None) -> str | None:
    if not charset:
        return None
    return charset.strip().strip("\"'").lower() or None


def _detect(data: bytes) -> str | None:
    best = from_bytes(data).best()
    return best.encoding if best else None


def _known_codec(label: str) -> str | None:
    name = CHARSET_ALIASES.get(label, label)
    try:
        return codecs.lookup(name).name
    except LookupError:
        return None


def decode_bytes(data: bytes, charset: str | None) -> tuple[str, list[str]]:
    """Decode `data` declared as `charset` (may be None or wrong); return text and defects."""
    label = normalise_label(charset)
    defects: list[str] = []
    if looks_like_iso2022jp(data) or label in ISO2022JP_LABELS:
        if label not in ISO2022JP_LABELS:
            defects.append(f"charset labelled {label or 'nothing'} but is ISO-2022-JP")
        return _decode_strict_or_replace(iso2022jp_to_cp932_bytes(data), "cp932", defects)
    if label in EUC_JP_LABELS:
        for codec in ("euc_jp", "euc_jis_2004"):
            try:
                return data.decode(codec), defects
            except UnicodeDecodeError:
                continue
        return _decode_strict_or_replace(data, "euc_jp", defects)
    if data.isascii():
        return data.decode("ascii"), defects
    codec = _known_codec(label) if label else None
    if codec and codec != "ascii":
        try:
            return data.decode(codec), defects
        except UnicodeDecodeError:
            defects.append(f"bytes are not valid {label}")
    elif label and codec is None:
        defects.append(f"unknown charset {label!r}")
    elif label:
        defects.append(f"8-bit bytes in text labelled {label}")
    try:
        text = data.decode("utf-8")
        if label:
            defects.append("decoded as utf-8")
        return text, defects
    except UnicodeDecodeError:
        pass
    detected = _detect(data)
    if detected is None:
        return _decode_strict_or_replace(data, codec or "utf-8", defects)
    defects.append(f"charset detected as {detected}")
    detected_codec = _known_codec(detected.lower()) or detected
    return _decode_strict_or_replace(data, detected_codec, defects)


def _decode_strict_or_replace(data: bytes, codec: str, defects: list[str]) -> tuple[str, list[str]]:
    try:
        return data.decode(codec), defects
    except UnicodeDecodeError as exc:
        defects.append(f"undecodable bytes replaced ({codec}: {exc.reason} at {exc.start})")
        return data.decode(codec, "replace"), defects
