"""Benchmarks: scripts that print figures (bench/README.md); `triage_corpus` is imported by tests."""
