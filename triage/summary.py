"""The one-line summary shown in the ticket list: extractive, at most 80 characters.

The template's topic field when it has one (the answering service's 用件, the web form's inquiry
text), else the first meaningful sentence of the mail once the quoted original, greetings
(いつもお世話になっております, Dear ..., Hello ...), self-introductions and the signature are
removed; else the subject. Every pattern is RE2 and runs per line or per sentence: linear.
"""

from __future__ import annotations

import itertools
import unicodedata
from collections.abc import Iterator, Mapping
from typing import Any

from config import compile_regex
from ingest.detect import quoted_line, strip_quoted

MAX_CHARS = 80
MAX_TEXT_CHARS = 20_000  # the summary is near the top; a long mail is not read to the end
MIN_SENTENCE_CHARS = 4
# Template fields that say what the inquiry is about (templates.yaml: `topic` is 用件, `message`
# the web form's お問い合わせ内容), in order of preference.
TOPIC_FIELDS = ("topic", "inquiry", "message", "用件")

GREETING = compile_regex(
    r"(?i)^(?:"
    r"(?:いつも|平素|毎度|先日|先般|大変|たいへん)?.{0,12}(?:お世話|おせわ)に(?:なって|なり)"
    r"|(?:はじめまして|初めまして|突然の(?:ご連絡|メール)|お疲れ(?:様|さま)です|ご無沙汰)"
    r"|(?:いつも|平素より|毎度).{0,20}ありがとうございます"
    r"|(?:dear|hello|hi|hey|greetings|good (?:morning|afternoon|evening))\b"
    r"|thank you for (?:your|the) (?:reply|email|e-mail|message|mail)"
    r"|(?:i hope|hope) (?:this|you)"
    r"|.{0,40}(?:と申します|でございます)"
    r"|[^、,\s]{0,30}の[^、,\sをがはにへと]{1,8}(?:です|でございます)。?$"
    r"|(?:よろしく|宜しく)お願い"
    r"|(?:以上|取り急ぎ|引き続き)"
    r")"
)
# A line naming whom the mail is for (株式会社サクラ酒販 / ご担当者様): with the lines above it,
# the address block.
ADDRESSEE = compile_regex(r"^.{0,40}(?:様|さま|御中|各位|殿)[、,:：]?$")
ADDRESS_LINES = 4  # the address block is at the top
MAX_LINES = 200
# The line that starts a signature or the closing: nothing after it is the inquiry.
SIGNATURE = compile_regex(
    r"(?i)^(?:--\s*$|[-_=━─＿―*＊]{3,}|(?:best |kind )?regards\b|sincerely\b|thanks,?$|"
    r"cheers\b|(?:よろしく|宜しく)お願い(?:いた|致)?します|以上[、。]?\s*$)"
)
SENTENCE_END = compile_regex(r"[。！？!?]|\.(?:\s|$)")


def summarize(
    subject: str, text: str, fields: Mapping[str, Any], reply_text: str | None = None
) -> str:
    """The one-line summary of a ticket. `reply_text`: `strip_quoted(text)` where the caller
    has it (the detect stage's), taken when `text` is read whole (not cut at MAX_TEXT_CHARS)."""
    for key in TOPIC_FIELDS:
        value = fields.get(key)
        if isinstance(value, str) and value.strip():
            return clip(first_sentence(value) or value)
    if reply_text is None or len(text) > MAX_TEXT_CHARS:
        reply_text = strip_quoted(text[:MAX_TEXT_CHARS])
    return clip(first_sentence(reply_text) or subject)


def first_sentence(text: str) -> str | None:
    """The first sentence of `text` that is not an address, a greeting, an introduction or a
    quote."""
    lines = list(itertools.islice(_content_lines(text), MAX_LINES))
    head = enumerate(lines[:ADDRESS_LINES])
    addressed = max((i for i, line in head if ADDRESSEE.search(_fold(line))), default=-1)
    for line in lines[addressed + 1 :]:
        for sentence in _sentences(line):
            if len(sentence) >= MIN_SENTENCE_CHARS and not GREETING.search(_fold(sentence)):
                return sentence
    return None


def _content_lines(text: str) -> Iterator[str]:
    for line in text.splitlines():
        stripped = line.strip()
        if SIGNATURE.search(_fold(stripped)):
            return
        if stripped and not quoted_line(stripped):
            yield stripped


def _sentences(line: str) -> Iterator[str]:
    start = 0
    for end in SENTENCE_END.finditer(line):
        sentence = line[start : end.end()].strip()
        if sentence:
            yield sentence
        start = end.end()
    if line[start:].strip():
        yield line[start:].strip()


def _fold(text: str) -> str:
    return unicodedata.normalize("NFKC", text)


def clip(text: str) -> str:
    """One line of at most MAX_CHARS characters, cut with … when longer."""
    line = " ".join(text.split())
    return line if len(line) <= MAX_CHARS else line[: MAX_CHARS - 1] + "…"
