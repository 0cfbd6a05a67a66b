"""Dagster wiring: Definitions, partitions, jobs and profiles."""
