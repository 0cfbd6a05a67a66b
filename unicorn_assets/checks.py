"""Builds the asset checks every per-record asset shares (schema, non-empty, unique ids, nulls)."""

import warnings
from collections.abc import Callable, Sequence

import dagster as dg
import polars as pl

from unicorn_assets.logic import quality
from unicorn_assets.partitions import seed_shards
from unicorn_resources.quality_gates import QualityGates

# Checks are partitioned like their assets, so a check reads only its own run's shard.
# Dagster marks partitioned checks as preview; the warning says nothing we can act on.
warnings.filterwarnings("ignore", message="Specifying a partitions_def on an AssetCheckSpec")


def to_result(outcome: quality.Outcome, severity: dg.AssetCheckSeverity = dg.AssetCheckSeverity.ERROR
              ) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(passed=outcome.passed, description=outcome.description,
                               metadata=outcome.metadata, severity=severity)


def run_shards(context: dg.AssetCheckExecutionContext) -> list[str]:
    """The shards a check step covers: one, or several in a backfill run; none if unpartitioned."""
    return context.partition_keys if context.has_partition_key_range else []


def frame_check(asset: str, name: str, rule: Callable[[pl.DataFrame, QualityGates], quality.Outcome],
                *, blocking: bool, description: str,
                partitions_def: dg.PartitionsDefinition | None = seed_shards,
                ) -> dg.AssetChecksDefinition:
    """One check that loads the asset (this run's partitions) and applies `rule` to each shard."""

    @dg.asset_check(asset=asset, name=name, blocking=blocking, description=description,
                    partitions_def=partitions_def)
    def _check(context: dg.AssetCheckExecutionContext, quality_gates: QualityGates,
               data: pl.DataFrame) -> dg.AssetCheckResult:
        return to_result(quality.per_shard(run_shards(context), {"data": data},
                                           lambda data: rule(data, quality_gates)))

    return _check


def standard_checks(asset: str, *, schema: pl.Schema, id_column: str | None,
                    required: Sequence[str], non_empty: bool = True,
                    partitions_def: dg.PartitionsDefinition | None = seed_shards,
                    ) -> list[dg.AssetChecksDefinition]:
    """Schema (blocking), non-empty (blocking), unique ids (blocking), null rates."""
    checks = [
        frame_check(asset, "schema", lambda df, q: quality.schema_matches(df, schema),
                    blocking=True, partitions_def=partitions_def,
                    description="columns and types are the expected ones"),
        frame_check(asset, "null_rates",
                    lambda df, q: quality.null_rates(df, required, q.max_null_rate),
                    blocking=False, partitions_def=partitions_def,
                    description=f"null rate of {', '.join(required)} under the configured bound"),
    ]
    if non_empty:
        checks.append(frame_check(asset, "non_empty", lambda df, q: quality.non_empty(df),
                                  blocking=True, partitions_def=partitions_def,
                                  description="at least one row"))
    if id_column:
        checks.append(frame_check(asset, "unique_ids", lambda df, q: quality.unique(df, id_column),
                                  blocking=True, partitions_def=partitions_def,
                                  description=f"{id_column} is unique"))
    return checks


def reject_rate_check(asset: str, rejects_asset: str, gate: str,
                      count_reasons: Callable[[pl.DataFrame], dict[str, int]],
                      description: str) -> dg.AssetChecksDefinition:
    """Blocking: the share of `asset`'s records rejected into `rejects_asset` is at most
    `quality_gates.<gate>`."""

    @dg.asset_check(asset=asset, name="reject_rate", blocking=True, description=description,
                    partitions_def=seed_shards,
                    additional_ins={"rejects": dg.AssetIn(rejects_asset)})
    def _check(context: dg.AssetCheckExecutionContext, quality_gates: QualityGates,
               data: pl.DataFrame, rejects: pl.DataFrame) -> dg.AssetCheckResult:
        return to_result(quality.per_shard(
            run_shards(context), {"data": data, "rejects": rejects},
            lambda data, rejects: quality.reject_rate(data.height, rejects.height,
                                                      getattr(quality_gates, gate),
                                                      count_reasons(rejects))))

    return _check
