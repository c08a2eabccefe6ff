"""Routing: decide category, assignee, priority, due time and labels for each message."""
