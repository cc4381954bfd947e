"""Analyses the paper uses (SKPO.md section 7), as tools."""
