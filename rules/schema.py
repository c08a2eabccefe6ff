"""The routing rules file (`rules.yaml`) as pydantic models: everything ops may write in it.

Shorthands keep the file short without unions in the models (unions make pydantic report one
error per alternative): `subject: 至急` means `subject: {equals: 至急}`, a list means `in`,
`assignee: yamada` means `assignee: {team: yamada}` (a person or a team), and
`attachment: true` means "has an attachment". Checks that need the whole file (unknown assignee,
category or priority) live in `rules.load`, where they can point at a line.
"""

from __future__ import annotations

import re
from datetime import date, time
from typing import Any, Literal, NamedTuple
from zoneinfo import ZoneInfo

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from config import DEFAULT_TIMEZONE, compile_regex, did_you_mean, zone_named

SOURCE_KINDS = ("phone", "fax", "webform", "email")
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
KEBAB_CASE = r"^[a-z0-9]+(?:-[a-z0-9]+)*$"
DURATION = re.compile(r"^(?:(?P<d>\d+)d)?\s*(?:(?P<h>\d+)h)?\s*(?:(?P<m>\d+)m)?$")
NEXT_BUSINESS_DAY = re.compile(r"^next_business_day\s+(?P<hh>[01]?\d|2[0-3]):(?P<mm>[0-5]\d)$")
BUSINESS_TIME = re.compile(r"^(?P<n>\d+)\s*business\s+(?P<unit>hours?|minutes?)$")

Strategy = Literal["fixed", "round_robin", "least_open"]
Verdict = Literal["pass", "fail", "softfail", "neutral", "none", "temperror", "permerror"]
Weekday = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
WORKDAYS: tuple[Weekday, ...] = ("mon", "tue", "wed", "thu", "fri")


class Strict(BaseModel):
    """Unknown keys are errors: a typo must not silently change routing."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


class TextTest(Strict):
    """Operators on a text value. Several operators in one test must all hold; a test on a list
    of values (recipients, headers) holds if one value satisfies it. `equals`, `contains`,
    `starts_with`, `ends_with` and `in` ignore case and width (NFKC: ＦＡＸ = fax, ｶﾅ = カナ);
    `regex` searches the text as it is (write `(?i)` for case-insensitive)."""

    equals: str | None = None
    contains: list[str] | None = None
    starts_with: list[str] | None = None
    ends_with: list[str] | None = None
    regex: str | None = None
    in_: list[str] | None = Field(default=None, alias="in")
    exists: bool | None = None

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            return {"equals": str(value)}
        if isinstance(value, list):
            return {"in": value}
        return value

    @field_validator("contains", "starts_with", "ends_with", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return _as_list(value)

    @field_validator("regex")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            compile_regex(value)
        return value

    @model_validator(mode="after")
    def _has_operator(self) -> TextTest:
        if not self.operators():
            raise ValueError(
                "no operator: use equals, contains, starts_with, ends_with, regex, in or exists"
            )
        return self

    def operators(self) -> dict[str, Any]:
        """The operators given, by their YAML names."""
        return {
            name: value
            for name, value in self.model_dump(by_alias=True, include=TEXT_OPERATORS).items()
            if value is not None
        }


TEXT_OPERATORS = {"equals", "contains", "starts_with", "ends_with", "regex", "in_", "exists"}


class NamedTextTest(TextTest):
    """A test on a named header or extracted field: `{name: X-Priority, equals: "1"}`."""

    name: str = Field(min_length=1)


class AddressTest(Strict):
    address: TextTest | None = None
    domain: TextTest | None = None

    @model_validator(mode="after")
    def _has_part(self) -> AddressTest:
        if self.address is None and self.domain is None:
            raise ValueError("give `address` or `domain`")
        return self


class AttachmentTest(Strict):
    """`attachment: true` (has one), `false` (has none), or tests on the type and name that
    one attachment must pass. Inline parts (images in an HTML signature) do not count."""

    present: bool = True
    type: TextTest | None = None
    name: TextTest | None = None

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return {"present": value} if isinstance(value, bool) else value

    @model_validator(mode="after")
    def _consistent(self) -> AttachmentTest:
        if not self.present and (self.type or self.name):
            raise ValueError("`present: false` cannot be combined with `type` or `name`")
        return self


class AuthTest(Strict):
    """The verdicts in the Authentication-Results headers our own MTA added (the ones whose
    authserv-id is config `authserv_id`: see ingest.authres)."""

    spf: Verdict | None = None
    dkim: Verdict | None = None
    dmarc: Verdict | None = None

    @model_validator(mode="after")
    def _has_method(self) -> AuthTest:
        if not (self.spf or self.dkim or self.dmarc):
            raise ValueError("give at least one of spf, dkim, dmarc")
        return self


class SuggestedTest(Strict):
    """`suggested: {category: complaint, min_probability: 0.8}`: the triage model's suggestion
    (docs/triage.md) names this category (and/or assignee) with at least this probability;
    `suggested: true` holds for any suggestion. Without a stored model it never holds."""

    category: str | None = None
    assignee: str | None = None
    min_probability: float = Field(default=0.0, ge=0.0, le=1.0)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        if value is True:
            return {}
        if value is False:
            raise ValueError("write `not: {suggested: true}` for mail without a suggestion")
        return value


class Condition(Strict):
    """One `when` mapping. Several keys in one mapping must all hold."""

    all_: list[Condition] | None = Field(default=None, alias="all")
    any_: list[Condition] | None = Field(default=None, alias="any")
    not_: Condition | None = Field(default=None, alias="not")
    always: Literal[True] | None = None
    from_: AddressTest | None = Field(default=None, alias="from")
    to: AddressTest | None = None  # any recipient: To, Cc or the envelope
    subject: TextTest | None = None
    body: TextTest | None = None
    header: NamedTextTest | None = None
    source_kind: TextTest | None = None
    attachment: AttachmentTest | None = None
    field: NamedTextTest | None = None
    follow_up: bool | None = None
    auto_reply: bool | None = None
    auth: AuthTest | None = None
    business_hours: bool | None = None
    suggested: SuggestedTest | None = None
    no_rule_matched: Literal[True] | None = None  # no rule above decided: a final fallback

    @model_validator(mode="before")
    @classmethod
    def _not_empty(cls, value: Any) -> Any:
        if value is None or value == {}:
            raise ValueError(
                "empty condition: give at least one (write `always: true` to match every mail)"
            )
        return value

    @field_validator("all_", "any_")
    @classmethod
    def _non_empty_list(cls, value: list[Condition] | None) -> list[Condition] | None:
        if value is not None and not value:
            raise ValueError("an empty list matches nothing; give at least one condition")
        return value

    @field_validator("source_kind")
    @classmethod
    def _known_kinds(cls, value: TextTest | None) -> TextTest | None:
        if value is None:
            return value
        for kind in [value.equals] if value.equals else value.in_ or []:
            if kind not in SOURCE_KINDS:
                raise ValueError(
                    f"unknown source kind `{kind}`{did_you_mean(kind, SOURCE_KINDS)}; "
                    f"known: {', '.join(SOURCE_KINDS)}"
                )
        return value

    def is_catch_all(self) -> bool:
        """True if this condition is `always: true` and nothing else."""
        return self.model_fields_set == {"always"}


class AssigneeRef(Strict):
    """A person, or a team (then `strategy` may override the team's own)."""

    name: str = Field(alias="team", min_length=1)
    strategy: Strategy | None = None

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return {"team": value} if isinstance(value, str) else value


class Actions(Strict):
    """What a rule (or the defaults) sets on the decision."""

    category: str | None = None
    assignee: AssigneeRef | None = None
    priority: str | None = None
    due_in: str | None = None
    labels: list[str] = Field(default_factory=list)
    fields: dict[str, str | int | float | bool] = Field(default_factory=dict)

    @field_validator("due_in")
    @classmethod
    def _due_syntax(cls, value: str | None) -> str | None:
        if value is not None:
            parse_due(value)
        return value


SuggestionTarget = Literal["category", "assignee"]


class Then(Actions):
    drop: str | None = Field(default=None, min_length=1)
    # Take these from the triage model's suggestion, unless this or an earlier rule sets them.
    from_suggestion: list[SuggestionTarget] = Field(default_factory=list)
    continue_: bool = Field(default=False, alias="continue")
    allow_auto_reply: bool | None = None

    @model_validator(mode="before")
    @classmethod
    def _not_empty(cls, value: Any) -> Any:
        if value is None or value == {}:
            raise ValueError("empty `then`: say what the rule does (category, assignee, ...)")
        return value


class Rule(Strict):
    name: str = Field(pattern=KEBAB_CASE)
    description: str | None = None
    when: Condition
    then: Then

    @field_validator("name", mode="before")
    @classmethod
    def _kebab(cls, value: Any) -> Any:
        if isinstance(value, str) and not re.match(KEBAB_CASE, value):
            raise ValueError(
                f"rule names are kebab-case (lower-case words joined by -), not `{value}`"
            )
        return value

    @field_validator("when", mode="before")
    @classmethod
    def _when_given(cls, value: Any) -> Any:
        if value is None or value == {}:
            raise ValueError("empty `when`: give a condition (`always: true` matches every mail)")
        return value


class Person(Strict):
    display_name: str | None = None
    email: str | None = None


class Team(Strict):
    members: list[str] = Field(min_length=1)
    strategy: Strategy = "round_robin"


class BusinessHours(Strict):
    """Opening hours for `business_hours` conditions and `next_business_day` due times, in the
    service's one time zone (`timezone` in config.yaml, given to the loader). Japan's public
    holidays are closed without being listed: they come from the `holidays` package, so every
    year is right. `closures` lists the company's own closed days (year-end, summer)."""

    weekdays: list[Weekday] = Field(default_factory=lambda: list(WORKDAYS), min_length=1)
    open: time = time(9, 0)
    close: time = time(18, 0)
    closures: list[date] = Field(default_factory=list)
    # Keys that moved: refused, saying where they went.
    timezone: Any = None
    holidays: Any = None
    _zone: ZoneInfo = PrivateAttr(default_factory=lambda: zone_named(DEFAULT_TIMEZONE))

    @field_validator("timezone", mode="before")
    @classmethod
    def _zone_moved(cls, value: Any) -> Any:
        raise ValueError(
            "the time zone is set once for the whole service: `timezone` in config.yaml "
            "(or MAILINTAKE_TIMEZONE); remove it here"
        )

    @field_validator("holidays", mode="before")
    @classmethod
    def _holidays_moved(cls, value: Any) -> Any:
        raise ValueError(
            "public holidays come from the `holidays` package (Japan's calendar, every year); "
            "list only the company's own closed days, under `closures`"
        )

    @model_validator(mode="after")
    def _open_before_close(self) -> BusinessHours:
        if self.open >= self.close:
            raise ValueError(f"`open` ({self.open}) must be before `close` ({self.close})")
        return self

    @property
    def zone(self) -> ZoneInfo:
        """The zone the hours are in: the service's, set by the loader."""
        return self._zone

    def use_zone(self, zone: ZoneInfo) -> None:
        self._zone = zone


class RulesFile(Strict):
    people: dict[str, Person] = Field(default_factory=dict)
    teams: dict[str, Team] = Field(default_factory=dict)
    categories: list[str] = Field(default_factory=list)  # empty: any category is allowed
    priorities: list[str] = Field(default_factory=list)  # empty: any priority is allowed
    business_hours: BusinessHours = Field(default_factory=BusinessHours)
    # Moved to config.yaml (templates use it too): refused, saying where it went.
    authserv_id: Any = None
    defaults: Actions = Field(default_factory=Actions)
    rules: list[Rule] = Field(default_factory=list)

    @field_validator("people", mode="before")
    @classmethod
    def _people_list(cls, value: Any) -> Any:
        if isinstance(value, list):
            return {name: {} for name in value}
        if isinstance(value, dict):
            return {name: person or {} for name, person in value.items()}
        return value

    @field_validator("authserv_id", mode="before")
    @classmethod
    def _authserv_id_moved(cls, value: Any) -> Any:
        raise ValueError(
            "the authserv-id of the MTA in front is set once for the service (rules and "
            "templates): `authserv_id` in config.yaml (or MAILINTAKE_AUTHSERV_ID); remove it here"
        )

    @model_validator(mode="after")
    def _service_zone(self, info: ValidationInfo) -> RulesFile:
        """Business hours are in the zone the loader passes (`context={"zone": ZoneInfo}`)."""
        zone = (info.context or {}).get("zone")
        if zone is not None:
            self.business_hours.use_zone(zone)
        return self


class Due(NamedTuple):
    """A parsed `due_in`: a duration in clock or business minutes, or a time of day."""

    minutes: int
    at: time | None = None  # `next_business_day HH:MM`
    business: bool = False  # minutes counted inside business hours only


def parse_due(text: str) -> Due:
    """`4h`, `1d 2h`, `90m`: clock time; `4 business hours`, `90 business minutes`: counted in
    business hours only; `next_business_day 10:00`: the next business-day 10:00 still ahead."""
    text = text.strip()
    nbd = NEXT_BUSINESS_DAY.match(text)
    if nbd:
        return Due(0, at=time(int(nbd["hh"]), int(nbd["mm"])))
    business = BUSINESS_TIME.match(text)
    if business:
        per_unit = 60 if business["unit"].startswith("hour") else 1
        return Due(int(business["n"]) * per_unit, business=True)
    duration = DURATION.match(text)
    if text and duration:
        days, hours, minutes = (int(duration[k] or 0) for k in "dhm")
        return Due((days * 24 + hours) * 60 + minutes)
    raise ValueError(
        f"`{text}` is not a due time: write e.g. `4h`, `1d`, `30m`, `4 business hours` or "
        "`next_business_day 10:00`"
    )
