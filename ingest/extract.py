"""Source templates: recognise the answering service, FAX gateway and web form mails, and pull
their labelled fields (`お名前：山田`, `電話番号: 03-1234-5678`) out of the body as typed values.

Templates are declarative (`templates.yaml`, validated by the pydantic models below). Labels
match regardless of full-width/half-width forms, spaces and colon style (`:` `：`), because
both sides are compared after NFKC normalisation; values are kept as written, and typed values
are added beside them (a phone number's E.164 form, a timestamp in ISO 8601; a time written
without a zone is in the service's zone, which the caller passes).

Everything that runs on mail text is linear in its length, whatever the mail holds: regular
expressions are RE2 (those ops write in templates and the built-in ones alike), and the small
jobs (label decoration, honorifics, separator lines) are plain string code. Python's `re`
backtracks, and one hostile line made it quadratic (a minute for 30 KB of spaces).
"""

from __future__ import annotations

import hashlib
import logging
import unicodedata
from datetime import date, datetime, tzinfo
from fnmatch import fnmatchcase
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import phonenumbers
import re2
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from config import DEFAULT_TIMEZONE, compile_regex, load_yaml_model, zone_named
from ingest.binding import Binding
from ingest.mail import Envelope, IncomingMail, ParsedMail, Requester

log = logging.getLogger(__name__)

DEFAULT_ZONE = zone_named(DEFAULT_TIMEZONE)
PHONE_REGION = "JP"
# RE2's \s is ASCII; this is every character Python's str.isspace() knows (U+3000 too).
SPACE = r"[\s\p{Z}\x{0B}\x{1C}-\x{1F}\x{85}]"
EMAIL_RE = compile_regex(r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9.\-]+\.[A-Za-z]{2,}")
ANGLE_BRACKETS = compile_regex(r"<[^<>]*>")
# Read after NFKC normalisation (full-width digits arrive as ASCII); S* stands for SPACE*.
DATETIME_RE = compile_regex(
    r"(?i)(?:(?P<era>令和|R)S*)?(?P<year>\d{1,4})S*[年/.\-]S*(?P<month>\d{1,2})S*[月/.\-]S*"
    r"(?P<day>\d{1,2})S*日?S*(?:[(（][^)）]*[)）])?S*"
    r"(?:(?P<ampm>午前|午後|AM|PM)?S*(?P<hour>\d{1,2})S*[時:]S*(?P<minute>\d{1,2})S*分?"
    r"(?:S*:?S*(?P<second>\d{1,2})S*秒?)?)?".replace("S*", SPACE + "*")
)
REIWA_OFFSET = 2018
PHONE_SCAN_CHARS = 20_000  # how much of a mail's text the phone number matcher reads
INTEGER_RE = compile_regex(r"\d+")
# Decoration around a label: "■お名前", "【会社名】", "・電話番号", "[お名前]" (and spaces).
LABEL_LEAD = "■□●○◆◇・*＊-－【[〔（(<＜"
LABEL_TRAIL = "】]〕）)>＞"
# A line of one of these, at least two, ends a multi-line value: "----", "＝＝＝＝".
SEPARATOR_CHARS = "-=_━─＝－"
HONORIFICS = ("様", "さま", "殿", "さん")

FieldType = Literal["text", "name", "phone", "email", "datetime", "integer"]


def label_key(text: str) -> str:
    """The form used to compare labels: NFKC (full-width -> half-width), no spaces, lower case."""
    return "".join(unicodedata.normalize("NFKC", text).split()).lower()


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Match(Model):
    """How a template recognises its mails; every condition given must hold."""

    sender: list[str] = Field(default_factory=list, description="glob patterns on From address")
    subject: str | None = Field(default=None, description="regular expression searched in Subject")
    body: list[str] = Field(default_factory=list, description="texts that must all be in the body")

    @field_validator("subject")
    @classmethod
    def _valid_regex(cls, value: str | None) -> str | None:
        if value is not None:
            compile_regex(value)
        return value

    @cached_property
    def subject_regex(self) -> re2._Regexp | None:
        return compile_regex(self.subject) if self.subject is not None else None

    @model_validator(mode="after")
    def _not_empty(self) -> Match:
        if not (self.sender or self.subject or self.body):
            raise ValueError("give at least one of sender, subject, body")
        return self

    def matches(self, parsed: ParsedMail) -> bool:
        # fnmatch is linear too: it translates `*` to atomic groups, which never backtrack.
        sender = (parsed.from_email or "").lower()
        if self.sender and not any(fnmatchcase(sender, p.lower()) for p in self.sender):
            return False
        if self.subject_regex is not None and not self.subject_regex.search(parsed.subject):
            return False
        return all(marker in parsed.text for marker in self.body)


class FieldSpec(Model):
    """One field: found after a label in the body, or by a regex with a `value` group."""

    key: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    labels: list[str] = Field(default_factory=list)
    pattern: str | None = None
    source: Literal["body", "subject"] = Field(default="body", alias="in")
    type: FieldType = "text"
    multiline: bool = False

    @field_validator("pattern")
    @classmethod
    def _value_group(cls, value: str | None) -> str | None:
        if value is not None and "value" not in compile_regex(value).groupindex:
            raise ValueError("the pattern needs a named group (?P<value>...)")
        return value

    @cached_property
    def regex(self) -> re2._Regexp | None:
        return compile_regex(self.pattern) if self.pattern is not None else None

    @model_validator(mode="after")
    def _labels_or_pattern(self) -> FieldSpec:
        if not self.labels and self.pattern is None:
            raise ValueError("give labels or a pattern")
        return self

    @cached_property
    def normalised_labels(self) -> frozenset[str]:
        return frozenset(label_key(label) for label in self.labels)


class RequesterMap(Model):
    """Which extracted field fills each requester column of the ticket."""

    name: str | None = "requester_name"
    email: str | None = "requester_email"
    phone: str | None = "requester_phone"
    company: str | None = "requester_company"


class Template(Model):
    name: str
    source_kind: Literal["phone", "fax", "webform", "email"]
    match: Match
    # What proves a match came from the gateway (ingest.binding); without it, or when the proof
    # is missing, a match is only a hint and the mail stays an ordinary `email`.
    bound_to: Binding | None = None
    fields: list[FieldSpec] = Field(default_factory=list)
    requester: RequesterMap = RequesterMap()


class TemplateFile(Model):
    templates: list[Template] = Field(default_factory=list)


def load_templates(path: Path, *, required: bool = True) -> list[Template]:
    """Templates from a YAML file. A bad file raises ConfigError saying `file:line:column:
    dotted.key: problem` for each problem; so does a missing one, unless not `required` (the
    default path, never configured), which means no templates."""
    return read_templates(path, required=required)[0]


NO_FILE = "none"  # the version of the templates when there is no file


def read_templates(path: Path, *, required: bool = True) -> tuple[list[Template], str]:
    """`load_templates`, and the version of what was read: the sha256 of the file's bytes (or
    `none` when an optional file is absent)."""
    if not path.exists() and not required:
        log.warning("no templates file at %s: template fields will not be extracted", path)
        return [], NO_FILE
    model, source = load_yaml_model(path, TemplateFile)
    return model.templates, hashlib.sha256(source.raw).hexdigest()


def _split_label(line: str) -> list[tuple[str, str]]:
    """Ways to read `line` as `label value`: at the first colon, else at the first spaces."""
    colon = min((i for i in (line.find(":"), line.find("：")) if i >= 0), default=-1)
    if colon >= 0:
        return [(line[:colon], line[colon + 1 :])]
    parts = line.split(maxsplit=1)
    if len(parts) == 2:
        return [(parts[0], parts[1])]
    return [(line, "")]


def undecorated(label: str) -> str:
    """`label` without the decoration and spaces around it: "【会社名】" -> "会社名"."""
    start, end = 0, len(label)
    while start < end and (label[start].isspace() or label[start] in LABEL_LEAD):
        start += 1
    while end > start and (label[end - 1].isspace() or label[end - 1] in LABEL_TRAIL):
        end -= 1
    return label[start:end]


def is_separator(line: str) -> bool:
    """True for a line that is one separator character repeated: "-----", "＝＝＝"."""
    text = line.strip()
    return len(text) >= 2 and text[0] in SEPARATOR_CHARS and text.count(text[0]) == len(text)


def without_honorific(name: str) -> str:
    """`山田 様` -> `山田`: one trailing 様, さま, 殿 or さん and the spaces before it."""
    for honorific in HONORIFICS:
        if name.endswith(honorific):
            return name[: -len(honorific)].rstrip()
    return name


def _label_of(line: str, labels: frozenset[str]) -> tuple[str, str] | None:
    """(normalised label, value as written) when `line` starts with one of `labels`."""
    for label, value in _split_label(line):
        key = label_key(undecorated(label))
        if key and key in labels:
            return key, value.strip()
    return None


def _labelled_value(spec: FieldSpec, lines: list[str], all_labels: frozenset[str]) -> str | None:
    for i, line in enumerate(lines):
        found = _label_of(line, spec.normalised_labels)
        if found is None:
            continue
        value = found[1]
        if not spec.multiline:
            if value:
                return value
            following = (next_line.strip() for next_line in lines[i + 1 : i + 3])
            return next((v for v in following if v and not _label_of(v, all_labels)), None)
        block = [value] if value else []
        for next_line in lines[i + 1 :]:
            if is_separator(next_line) or _label_of(next_line, all_labels):
                break
            block.append(next_line.strip())
        return "\n".join(block).strip() or None
    return None


def _raw_value(spec: FieldSpec, parsed: ParsedMail, all_labels: frozenset[str]) -> str | None:
    text = parsed.subject if spec.source == "subject" else parsed.text
    if spec.regex is not None:
        found = spec.regex.search(text)
        if found and found.group("value"):
            return found.group("value").strip()
    if spec.labels:
        return _labelled_value(spec, text.splitlines(), all_labels)
    return None


def parse_phone(value: str) -> str | None:
    """E.164 form of a phone number as written in Japan, or None if it is not one."""
    try:
        number = phonenumbers.parse(unicodedata.normalize("NFKC", value), PHONE_REGION)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_possible_number(number):
        return None
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def parse_datetime(value: str, zone: tzinfo = DEFAULT_ZONE) -> datetime | date | None:
    """`2026年11月22日 10時23分`, `2026/11/22 10:23`, `令和8年11月22日` -> that time in `zone`
    (the service's zone: these forms carry none), or the date alone."""
    found = DATETIME_RE.search(unicodedata.normalize("NFKC", value))
    if not found:
        return None
    year = int(found["year"]) + (REIWA_OFFSET if found["era"] else 0)
    try:
        day = date(year, int(found["month"]), int(found["day"]))
        if found["hour"] is None:
            return day
        hour = int(found["hour"])
        if (found["ampm"] or "").lower() in ("午後", "pm") and hour < 12:
            hour += 12
        return datetime(
            day.year, day.month, day.day, hour, int(found["minute"]),
            int(found["second"] or 0), tzinfo=zone,
        )  # fmt: skip
    except ValueError:
        return None


def typed(spec: FieldSpec, value: str, zone: tzinfo = DEFAULT_ZONE) -> dict[str, Any]:
    """The field's entries: the value (as written, or converted) and its typed companions."""
    key = spec.key
    if spec.type == "phone":
        e164 = parse_phone(value)
        return {key: value, f"{key}_e164": e164} if e164 else {key: value}
    if spec.type == "email":
        found = EMAIL_RE.search(unicodedata.normalize("NFKC", value))
        return {key: found.group(0).lower()} if found else {}
    if spec.type == "name":
        name = without_honorific(ANGLE_BRACKETS.sub("", value).strip().strip('"'))
        return {key: name} if name else {}
    if spec.type == "datetime":
        when = parse_datetime(value, zone)
        return {key: when.isoformat(), f"{key}_text": value} if when else {f"{key}_text": value}
    if spec.type == "integer":
        number = INTEGER_RE.search(unicodedata.normalize("NFKC", value))
        return {key: int(number.group(0))} if number else {}
    return {key: value}


def matching_template(templates: list[Template], parsed: ParsedMail) -> Template | None:
    return next((t for t in templates if t.match.matches(parsed)), None)


def extract_fields(
    template: Template, parsed: ParsedMail, zone: tzinfo = DEFAULT_ZONE
) -> dict[str, Any]:
    """Every field of `template` found in `parsed`, typed; missing fields are left out."""
    all_labels = frozenset().union(*(spec.normalised_labels for spec in template.fields))
    fields: dict[str, Any] = {}
    for spec in template.fields:
        if spec.key in fields:
            continue  # an earlier spec for the same key already found it
        value = _raw_value(spec, parsed, all_labels)
        if value:
            fields.update(typed(spec, value, zone))
    return fields


HINT = "template_hint"  # the field holding an unproven match: {template, unproven, fields...}


def extract(
    mail: IncomingMail,
    templates: list[Template],
    zone: tzinfo = DEFAULT_ZONE,
    authserv_id: str | None = None,
) -> None:
    """Set `mail.source_kind` and `mail.fields` from the first template that matches, when its
    `bound_to` proves the mail came from the gateway (`authserv_id`: config `authserv_id`, whose
    Authentication-Results count). An unproven match is only a hint: its fields go under
    `template_hint`, and the mail stays an `email` from its From. Times written without a zone
    are read in `zone`: pass the service's (`Settings.zone`)."""
    assert mail.parsed is not None
    template = matching_template(templates, mail.parsed)
    if template is None:
        mail.requester = sender_of(mail.parsed)
        return
    fields = extract_fields(template, mail.parsed, zone)
    why = unproven(template, mail.envelope, mail.parsed, authserv_id)
    if why is not None:
        mail.fields = {HINT: {"template": template.name, "unproven": why, **fields}}
        mail.requester = sender_of(mail.parsed)
        return
    mail.source_kind = template.source_kind
    mail.fields = {"template": template.name, **fields}
    mail.requester = requester_from(template.requester, mail.fields)


def unproven(
    template: Template, envelope: Envelope, parsed: ParsedMail, authserv_id: str | None
) -> str | None:
    """Why a match of `template` does not prove its gateway sent the mail, or None if it does."""
    if template.bound_to is None:
        return "the template has no `bound_to`: any sender can write its format"
    if not template.bound_to.proven(envelope, parsed.headers, authserv_id):
        return f"no proof of the gateway: wanted {template.bound_to.wanted()}"
    return None


def requester_from(columns: RequesterMap, fields: dict[str, Any]) -> Requester:
    """The requester a template's fields name (for template mail, From is the gateway)."""

    def value(key: str | None) -> str | None:
        found = fields.get(key) if key else None
        return str(found) if found not in (None, "") else None

    phone_key = columns.phone
    phone = value(f"{phone_key}_e164") or value(phone_key) if phone_key else None
    return Requester(value(columns.name), value(columns.email), phone, value(columns.company))


def sender_of(parsed: ParsedMail) -> Requester:
    """A person wrote this mail: From, and the first phone number written in it."""
    return Requester(
        parsed.from_name, parsed.from_email, phone_in(parsed.reply_text or parsed.text)
    )


def phone_in(text: str) -> str | None:
    """The first phone number written in `text` (its first PHONE_SCAN_CHARS), in E.164."""
    scanned = unicodedata.normalize("NFKC", text[:PHONE_SCAN_CHARS])
    for match in phonenumbers.PhoneNumberMatcher(scanned, PHONE_REGION):
        return phonenumbers.format_number(match.number, phonenumbers.PhoneNumberFormat.E164)
    return None


def match_checks(match: Match, parsed: ParsedMail) -> dict[str, bool]:
    """Each condition a template's `match` gives, and whether `parsed` meets it."""
    checks: dict[str, bool] = {}
    if match.sender:
        sender = (parsed.from_email or "").lower()
        checks["sender"] = any(fnmatchcase(sender, p.lower()) for p in match.sender)
    if match.subject_regex is not None:
        checks["subject"] = match.subject_regex.search(parsed.subject) is not None
    if match.body:
        checks["body"] = all(marker in parsed.text for marker in match.body)
    return checks


def explain_templates(
    templates: list[Template],
    parsed: ParsedMail,
    zone: tzinfo = DEFAULT_ZONE,
    authserv_id: str | None = None,
) -> dict[str, Any]:
    """What `extract` does with `parsed` (a mail file: no SMTP client, only its headers can
    prove a gateway), and why: each template's match conditions (met or not), the template that
    matched and whether its `bound_to` is proven, and each of its field specs with the value
    found (as written and typed) or None where it found nothing (`mailintake templates test`)."""
    tried = [{"template": t.name, "conditions": match_checks(t.match, parsed)} for t in templates]
    template = matching_template(templates, parsed)
    if template is None:
        return {"template": None, "source_kind": "email", "tried": tried, "fields": []}
    why = unproven(template, Envelope(source="file"), parsed, authserv_id)
    all_labels = frozenset().union(*(spec.normalised_labels for spec in template.fields))
    fields = []
    for spec in template.fields:
        raw = _raw_value(spec, parsed, all_labels)
        fields.append(
            {
                "key": spec.key,
                "type": spec.type,
                "by": f"pattern in {spec.source}" if spec.pattern else "labels",
                "found": bool(raw),
                "written": raw or None,
                "values": typed(spec, raw, zone) if raw else {},
            }
        )
    extracted = {"template": template.name, **extract_fields(template, parsed, zone)}
    requester = sender_of(parsed) if why else requester_from(template.requester, extracted)
    return {
        "template": template.name,
        "source_kind": "email" if why else template.source_kind,
        "unproven": why,
        "tried": tried,
        "fields": fields,
        "extracted": extracted,
        "requester": {
            "name": requester.name,
            "email": requester.email,
            "phone": requester.phone,
            "company": requester.company,
        },
    }
