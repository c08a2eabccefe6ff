"""Business days and hours in the configured time zone, and due times counted from them."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

from rules.schema import WEEKDAYS, BusinessHours, parse_due


class Calendar:
    """Business days and hours in one time zone."""

    def __init__(self, hours: BusinessHours) -> None:
        self.zone = ZoneInfo(hours.timezone)
        self.weekdays = {WEEKDAYS.index(day) for day in hours.weekdays}
        self.open, self.close = hours.open, hours.close
        self.holidays = set(hours.holidays)

    def local(self, moment: datetime) -> datetime:
        aware = moment if moment.tzinfo else moment.replace(tzinfo=UTC)  # SQLite gives naive UTC
        return aware.astimezone(self.zone)

    def closed_because(self, moment: datetime) -> str | None:
        """None inside business hours, else why not (weekend, holiday, outside hours)."""
        local = self.local(moment)
        if local.date() in self.holidays:
            return "a holiday"
        if local.weekday() not in self.weekdays:
            return "not a business day"
        if not self.open <= local.time() < self.close:
            return f"outside {self.open:%H:%M}-{self.close:%H:%M}"
        return None

    def next_business_day(self, after: date) -> date:
        day = after + timedelta(days=1)
        while day.weekday() not in self.weekdays or day in self.holidays:
            day += timedelta(days=1)
        return day

    def due(self, due_in: str, received_at: datetime) -> datetime:
        minutes, at = parse_due(due_in)
        if at is None:
            return self.local(received_at).astimezone(UTC) + timedelta(minutes=minutes)
        day = self.next_business_day(self.local(received_at).date())
        return datetime.combine(day, at, tzinfo=self.zone).astimezone(UTC)
