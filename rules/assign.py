"""Who in a team gets a new ticket: round-robin (a cursor shared through the database) or the
member with the fewest open tickets. Runs only once the pipeline has decided on a new ticket."""

from __future__ import annotations

from sqlalchemy.orm import Session

from rules.schema import AssigneeRef, RulesFile
from storage import repo


def pick_assignee(ref: AssigneeRef, rules: RulesFile, session: Session, *, advance: bool) -> str:
    """A person as is; for a team, a member by its strategy. With `advance` false (dry runs)
    the round-robin cursor is only read."""
    team = rules.teams.get(ref.name)
    if team is None:
        return ref.name
    strategy = ref.strategy or team.strategy
    if strategy == "fixed":
        return ref.name
    if strategy == "round_robin":
        turn = (
            repo.advance_assignment_cursor(session, ref.name)
            if advance
            else repo.peek_assignment_cursor(session, ref.name) + 1
        )
        return team.members[(turn - 1) % len(team.members)]
    counts = repo.open_ticket_counts(session, team.members)
    return min(team.members, key=lambda member: counts.get(member, 0))
