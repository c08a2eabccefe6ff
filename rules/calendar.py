"""Business days and hours in the configured time zone, and due times counted from them."""

from __future__ import annotations

import threading
from datetime import UTC, date, datetime, time, timedelta

import holidays

from rules.schema import WEEKDAYS, BusinessHours, parse_due

MAX_DAYS_AHEAD = 3660  # a calendar with no business day at all must not loop forever


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
        """When a mail received at `received_at` is due, by the rule's `due_in`."""
        due = parse_due(due_in)
        if due.at is not None:
            return self.next_business_time(received_at, due.at)
        if due.business:
            return self.after_business_minutes(received_at, due.minutes)
        return self.local(received_at).astimezone(UTC) + timedelta(minutes=due.minutes)

    def next_business_time(self, after: datetime, at: time) -> datetime:
        """The first business day's `at` still ahead of `after`: today's if today is a business
        day and `at` has not passed, else the next business day's."""
        local = self.local(after)
        day = local.date()
        if self.closed_day(day) or local.time() >= at:
            day = self.next_business_day(day)
        return datetime.combine(day, at, tzinfo=self.zone).astimezone(UTC)

    def after_business_minutes(self, start: datetime, minutes: int) -> datetime:
        """`start` plus `minutes` counted only inside business hours (a Friday 17:50 mail due
        in 4 business hours, with 09:00-18:00, is due Monday 12:50)."""
        left = timedelta(minutes=minutes)
        moment = self.local(start)
        for _ in range(MAX_DAYS_AHEAD):
            day = moment.date()
            opens = datetime.combine(day, self.open, tzinfo=self.zone)
            closes = datetime.combine(day, self.close, tzinfo=self.zone)
            begin = max(moment, opens)
            if not self.closed_day(day) and begin < closes:
                if left <= closes - begin:
                    return (begin + left).astimezone(UTC)
                left -= closes - begin
            moment = datetime.combine(day + timedelta(days=1), time(0), tzinfo=self.zone)
        raise ValueError(f"no business hours within {MAX_DAYS_AHEAD} days: check business_hours")
