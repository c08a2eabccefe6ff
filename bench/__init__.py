"""Benchmarks: scripts that print figures (bench/README.md); tests import `triage_corpus`."""
