"""Stage logic: plain functions over Polars frames, with no Dagster in them."""
