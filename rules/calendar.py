"""Business days and hours in the configured time zone, and due times counted from them."""

from __future__ import annotations

import threading
from datetime import UTC, date, datetime, timedelta

import holidays

from rules.schema import WEEKDAYS, BusinessHours, parse_due


class Calendar:
    """Business days and hours in the service's time zone: the opening weekdays and hours,
    less Japan's public holidays (from the maintained `holidays` package, so every year is
    right) and the company's own closures."""

    COUNTRY = "JP"  # whose public holidays are closed days

    def __init__(self, hours: BusinessHours) -> None:
        self.zone = hours.zone
        self.weekdays = {WEEKDAYS.index(day) for day in hours.weekdays}
        self.open, self.close = hours.open, hours.close
        self.closures = frozenset(hours.closures)
        # Computes a year on first use; the lock keeps a router thread from reading a year
        # another thread is still filling in.
        self.public_holidays = holidays.country_holidays(self.COUNTRY, language="ja")
        self.holidays_lock = threading.Lock()

    def local(self, moment: datetime) -> datetime:
        """`moment` in the business zone; it must be aware (the store gives aware UTC)."""
        if moment.tzinfo is None:
            raise ValueError(f"naive datetime {moment!r}: pass an aware one (UTC from the store)")
        return moment.astimezone(self.zone)

    def closed_day(self, day: date) -> str | None:
        """Why `day` is not a business day, or None if it is."""
        if day in self.closures:
            return "a company closure"
        with self.holidays_lock:
            holiday = self.public_holidays.get(day)
        if holiday:
            return f"a public holiday ({holiday})"
        if day.weekday() not in self.weekdays:
            return "not a business day"
        return None

    def closed_because(self, moment: datetime) -> str | None:
        """None inside business hours, else why not (holiday, closure, weekend, outside hours)."""
        local = self.local(moment)
        closed = self.closed_day(local.date())
        if closed:
            return closed
        if not self.open <= local.time() < self.close:
            return f"outside {self.open:%H:%M}-{self.close:%H:%M}"
        return None

    def next_business_day(self, after: date) -> date:
        day = after + timedelta(days=1)
        while self.closed_day(day):
            day += timedelta(days=1)
        return day

    def due(self, due_in: str, received_at: datetime) -> datetime:
        minutes, at = parse_due(due_in)
        if at is None:
            return self.local(received_at).astimezone(UTC) + timedelta(minutes=minutes)
        day = self.next_business_day(self.local(received_at).date())
        return datetime.combine(day, at, tzinfo=self.zone).astimezone(UTC)
