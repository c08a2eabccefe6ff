"""Business days: Japan's public holidays from the `holidays` package (every year, not a typed
list), the company's closures from rules.yaml, hours in the service's one time zone."""

from __future__ import annotations

from datetime import UTC, date, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from config import load_settings
from rules.load import RulesError, load_rules
from tests.rulesets import shipped_rules, write_rules

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shipped():
    return shipped_rules().calendar


@pytest.mark.parametrize(
    ("day", "why"),
    [
        (date(2027, 1, 1), "a public holiday (元日)"),  # the year the typed list ran out
        (date(2027, 1, 11), "a public holiday (成人の日)"),
        (date(2030, 9, 23), "a public holiday (秋分の日)"),
        (date(2026, 12, 29), "a company closure"),  # `closures` in the shipped rules.yaml
        (date(2026, 12, 26), "not a business day"),  # Saturday
        (date(2026, 12, 28), None),
    ],
)
def test_closed_days(shipped, day, why):
    assert shipped.closed_day(day) == why
    ten_in_tokyo = datetime(day.year, day.month, day.day, 1, 0, tzinfo=UTC)
    assert shipped.closed_because(ten_in_tokyo) == why


def test_next_business_day_skips_closures_holidays_and_the_weekend(shipped):
    # 12-29..31 closures, 01-01 New Year's Day, 01-02/03 the weekend
    assert shipped.next_business_day(date(2026, 12, 28)) == date(2027, 1, 4)
    monday_10_tokyo = datetime(2027, 1, 4, 1, 0, tzinfo=UTC)
    due = shipped.due("next_business_day 10:00", datetime(2026, 12, 28, 1, 0, tzinfo=UTC))
    assert due == monday_10_tokyo


def test_a_naive_time_is_refused_not_guessed(shipped):
    """The store gives aware UTC (storage.models.UTCDateTime); nothing patches naive times."""
    with pytest.raises(ValueError, match="naive datetime"):
        shipped.closed_because(datetime(2026, 11, 24, 1, 0))


def test_business_hours_are_in_the_zone_the_service_is_configured_with(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("timezone: Europe/Berlin\n", encoding="utf-8")
    zone = load_settings(config).zone
    path = write_rules(tmp_path, "rules: []\n")
    calendar = load_rules(path, zone).calendar
    assert calendar.zone.key == "Europe/Berlin"
    tuesday_10_berlin = datetime(2026, 11, 24, 9, 0, tzinfo=UTC)  # 18:00 in Tokyo
    assert calendar.closed_because(tuesday_10_berlin) is None
    assert load_rules(path).calendar.closed_because(tuesday_10_berlin) == "outside 09:00-18:00"
    # without a business_hours section too
    bare = tmp_path / "bare.yaml"
    bare.write_text("rules: []\n", encoding="utf-8")
    assert load_rules(bare, "Europe/Berlin").calendar.zone.key == "Europe/Berlin"


@pytest.mark.parametrize(
    ("key", "message"),
    [
        (
            "timezone: Asia/Tokyo",
            "the time zone is set once for the whole service: `timezone` in config.yaml",
        ),
        (
            "holidays: [2026-11-23]",
            "public holidays come from the `holidays` package",
        ),
    ],
)
def test_moved_keys_say_where_they_went(tmp_path, key, message):
    path = tmp_path / "rules.yaml"
    path.write_text(f"business_hours:\n  {key}\n", encoding="utf-8")
    with pytest.raises(RulesError) as info:
        load_rules(path)
    name = key.partition(":")[0]
    assert str(info.value).startswith(f"{path}:2:3: business_hours.{name}: {message}")


def test_an_empty_week_is_refused(tmp_path):
    path = tmp_path / "rules.yaml"
    path.write_text("business_hours:\n  weekdays: []\n", encoding="utf-8")
    with pytest.raises(RulesError, match=r":2:3: business_hours.weekdays: "):
        load_rules(path)


def jst(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=ZoneInfo("Asia/Tokyo"))


def test_next_business_day_time_is_today_when_it_is_still_ahead(shipped):
    """07:30 on a business day with `next_business_day 10:00` is due 10:00 the same day."""
    tuesday_0730 = jst(2026, 11, 24, 7, 30)
    assert shipped.due("next_business_day 10:00", tuesday_0730) == jst(2026, 11, 24, 10)
    tuesday_1030 = jst(2026, 11, 24, 10, 30)
    assert shipped.due("next_business_day 10:00", tuesday_1030) == jst(2026, 11, 25, 10)


def test_business_hours_durations_skip_nights_weekends_and_holidays(shipped):
    friday_1750 = jst(2026, 11, 20, 17, 50)
    assert shipped.due("4h", friday_1750) == jst(2026, 11, 20, 21, 50)
    # 10 minutes on Friday, Monday 23 Nov is 勤労感謝の日: 3 h 50 min on Tuesday.
    assert shipped.due("4 business hours", friday_1750) == jst(2026, 11, 24, 12, 50)
    assert shipped.due("90 business minutes", jst(2026, 11, 24, 8)) == jst(2026, 11, 24, 10, 30)
