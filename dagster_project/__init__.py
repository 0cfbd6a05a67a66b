"""Dagster wiring, the top layer: Definitions, jobs, automation, profiles and the `unicorn` CLI."""
