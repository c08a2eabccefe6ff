"""Persistence: tables (models), engine and sessions (db), queries (repo), migrations."""
