"""Checks: comparing an artifact with the eager reference (metrics and tolerances as data)."""
