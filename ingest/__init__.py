"""Receiving and processing mail: ledger intake, parsing, the pipeline, and the sources."""
