"""Drafting a source template from a few sample mails of one sender (`mailintake templates
suggest`), for a person to review before it goes into templates.yaml.

The draft takes the labelled lines the samples share (`受付日時：...`, `■お名前　山田`), read the
way extraction reads them (`_split_label`, `undecorated`, `label_key`), and types a field where
every value reads as a phone number, a time or an address (`parse_phone`, `parse_datetime`,
`EMAIL_RE`). A label an existing template knows keeps that template's key, so 会社名 is drafted
as `requester_company` and fills the requester columns. Everything here is plain string code or
the extraction helpers: linear in the mail's length.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ingest.extract import (
    EMAIL_RE,
    Template,
    _split_label,
    is_separator,
    label_key,
    parse_datetime,
    parse_phone,
    undecorated,
)
from ingest.mail import ParsedMail

MAX_LABEL_CHARS = 20  # longer "labels" are sentences that happen to hold a colon or a space
REGEX_SPECIALS = frozenset("\\.^$|?*+()[]{}")
MIN_SUBJECT_PREFIX = 2  # a shorter common start of the subjects is no condition


@dataclass
class LabelSeen:
    """One label as the samples write it: its first spelling, values and where it was written."""

    label: str
    colon: bool
    values: list[str] = field(default_factory=list)
    mails: set[int] = field(default_factory=set)
    continued: bool = False  # some sample's value runs on over the next lines
    order: float = 0.0  # mean line number, so the draft lists fields as the mails do


def labelled_lines(text: str) -> list[tuple[str, str, bool, bool]]:
    """(label, value, written with a colon, value continues on the next line) per line that
    reads as `label: value` or `label value`."""
    lines = text.splitlines()
    found = []
    for i, line in enumerate(lines):
        if not line.strip() or is_separator(line):
            continue
        label, value = _split_label(line)[0]
        name = undecorated(label)
        colon = len(label) < len(line) and line[len(label)] in ":："
        if not name or len(name) > MAX_LABEL_CHARS or label_key(name).isdigit():
            continue
        if "://" in line or "@" in name or not (value.strip() or colon):
            continue
        following = lines[i + 1] if i + 1 < len(lines) else ""
        continues = bool(following.strip()) and not is_separator(following)
        found.append((name, value.strip(), colon, continues))
    return found


def field_type(values: Sequence[str]) -> str:
    """phone, datetime or email when every value reads as one; else text."""
    if not values:
        return "text"
    if all(EMAIL_RE.search(v) for v in values):
        return "email"
    if all(parse_datetime(v) is not None for v in values):
        return "datetime"
    if all(parse_phone(v) is not None for v in values):
        return "phone"
    return "text"


def literal(text: str) -> str:
    """`text` as a regular expression (RE2) that matches it literally."""
    return "".join("\\" + c if c in REGEX_SPECIALS else c for c in text)


def common_prefix(texts: Sequence[str]) -> str:
    if not texts:
        return ""
    first, last = min(texts), max(texts)
    n = 0
    while n < min(len(first), len(last)) and first[n] == last[n]:
        n += 1
    return first[:n]


def shared_labels(mails: Sequence[ParsedMail]) -> list[LabelSeen]:
    """The labels at least half of the samples (and two, when there are two or more) write,
    in the order the mails write them. A label written without a colon whose value is the
    same in every sample is ordinary text (a footer line), not a field."""
    seen: dict[str, LabelSeen] = {}
    positions: dict[str, list[int]] = {}
    for index, mail in enumerate(mails):
        lines = labelled_lines(mail.text)
        keys_here: set[str] = set()
        continuing: dict[str, bool] = {}
        for position, (name, value, colon, continues) in enumerate(lines):
            key = label_key(name)
            if key in keys_here:
                continue  # a label written twice in one mail: the first is the field
            keys_here.add(key)
            entry = seen.setdefault(key, LabelSeen(name, colon))
            entry.colon = entry.colon or colon
            entry.mails.add(index)
            if value:
                entry.values.append(value)
            positions.setdefault(key, []).append(position)
            continuing[key] = continues
        # A value continues when the line after its label is not another label line.
        label_texts = {label_key(name) for name, *_ in lines}
        text_lines = mail.text.splitlines()
        for i, line in enumerate(text_lines[:-1]):
            label, _value = _split_label(line)[0]
            key = label_key(undecorated(label))
            if key in keys_here and continuing.get(key):
                after, _ = _split_label(text_lines[i + 1])[0]
                if label_key(undecorated(after)) not in label_texts:
                    seen[key].continued = True
    needed = max(min(2, len(mails)), (len(mails) + 1) // 2)
    shared = []
    for key, entry in seen.items():
        if len(entry.mails) < needed:
            continue
        constant = len(set(entry.values)) <= 1 and len(entry.values) == len(entry.mails)
        if constant and len(mails) > 1 and not entry.colon:
            continue
        where = positions[key]
        entry.order = sum(where) / len(where)
        shared.append(entry)
    return sorted(shared, key=lambda e: e.order)


def known_fields(templates: Sequence[Template]) -> dict[str, tuple[str, str, str]]:
    """label key -> (field key, type, source kind of the template) from existing templates."""
    known: dict[str, tuple[str, str, str]] = {}
    for template in templates:
        for spec in template.fields:
            for label in spec.normalised_labels:
                known.setdefault(label, (spec.key, spec.type, template.source_kind))
    return known


def suggest_template(
    mails: Sequence[ParsedMail], known: Sequence[Template] = (), name: str | None = None
) -> dict[str, Any]:
    """A draft template (the mapping templates.yaml holds) for mails like `mails`."""
    domains = sorted({(m.from_email or "").rpartition("@")[2].lower() for m in mails} - {""})
    senders = [f"*@{domain}" for domain in domains]
    match: dict[str, Any] = {}
    if senders:
        match["sender"] = senders
    prefix = common_prefix([m.subject for m in mails]).strip()
    if len(prefix) >= MIN_SUBJECT_PREFIX:
        match["subject"] = "^" + literal(prefix)
    labels = known_fields(known)
    kinds: Counter[str] = Counter()
    used: Counter[str] = Counter()
    fields: list[dict[str, Any]] = []
    for entry in shared_labels(mails):
        key_of_label = label_key(entry.label)
        typed = field_type(entry.values)
        if key_of_label in labels:
            key, known_type, kind = labels[key_of_label]
            kinds[kind] += 1
            typed = known_type if typed == "text" else typed
        else:
            key = {"phone": "phone", "datetime": "received_at", "email": "email"}.get(
                typed, "field"
            )
        used[key] += 1
        if used[key] > 1 or key == "field":
            key = f"{key}_{used[key]}"
        spec: dict[str, Any] = {"key": key, "labels": [entry.label]}
        if typed != "text":
            spec["type"] = typed
        if entry.continued or len(entry.values) < len(entry.mails):
            spec["multiline"] = True
        fields.append(spec)
    source_kind = kinds.most_common(1)[0][0] if kinds else "email"
    first_domain = domains[0].split(".")[0] if domains else "new-sender"
    draft: dict[str, Any] = {
        "name": name or first_domain,
        "source_kind": source_kind,
        "match": match or {"body": []},
        "fields": fields,
    }
    if domains:  # unbound, a match would only be a hint (ingest.binding)
        draft["bound_to"] = {"dkim": domains}
    return draft


def as_yaml(template: dict[str, Any], samples: int) -> str:
    """The draft as a templates.yaml file; strings in JSON quotes, which YAML reads alike."""

    def q(value: Any) -> str:
        return json.dumps(value, ensure_ascii=False)

    lines = [
        f"# Drafted by `mailintake templates suggest` from {samples} sample mail(s): review the",
        "# field keys, types and match conditions, then add it to the templates file.",
        "templates:",
        f"  - name: {q(template['name'])}",
        f"    source_kind: {template['source_kind']}",
        "    match:",
    ]
    for condition, value in template["match"].items():
        shown = "[" + ", ".join(q(v) for v in value) + "]" if isinstance(value, list) else q(value)
        lines.append(f"      {condition}: {shown}")
    if "bound_to" in template:
        lines.append("    bound_to:  # check: what proves the gateway sent it (docs/deploy.md)")
        lines.append("      dkim: [" + ", ".join(q(d) for d in template["bound_to"]["dkim"]) + "]")
    lines.append("    fields:" if template["fields"] else "    fields: []")
    for spec in template["fields"]:
        parts = [f"key: {spec['key']}", "labels: [" + ", ".join(q(v) for v in spec["labels"]) + "]"]
        if "type" in spec:
            parts.append(f"type: {spec['type']}")
        if spec.get("multiline"):
            parts.append("multiline: true")
        lines.append("      - {" + ", ".join(parts) + "}")
    return "\n".join(lines) + "\n"
