"""Analyses the paper uses (docs/algorithm.md §7), as tools."""
