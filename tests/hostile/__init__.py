"""Hostile input: property-based and mutation tests of the parser, and their resource bounds."""
