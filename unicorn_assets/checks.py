"""The checks of each asset, as small pure rules evaluated inside the asset on the frames it just
built: no check step re-reads its input from storage. Each check keeps its name, description,
blocking behaviour and metadata; a failed blocking check fails its asset's step, so the steps
downstream of it do not run. A run over several shards (backfill) judges each shard on its own and
fails if any one does (metadata `failing_shards`). Checks that verify stored files (export
checksums) stay separate steps that read what was written: see exports.py."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass

import dagster as dg
import polars as pl

from unicorn_assets.logic import quality
from unicorn_assets.metadata import as_metadata
from unicorn_assets.partitions import seed_shards
from unicorn_resources.quality_gates import QualityGates

# Checks are partitioned like their assets. Dagster marks partitioned checks as preview; the
# warning says nothing we can act on.
warnings.filterwarnings("ignore", message="Specifying a partitions_def on an AssetCheckSpec")

# {asset name: that shard's frame}: what a rule judges, one shard at a time.
Frames = Mapping[str, pl.DataFrame]


@dataclass(frozen=True)
class Check:
    """One named check of `asset`: `rule` judges one shard's frames under the quality gates."""

    asset: str
    name: str
    rule: Callable[[Frames, QualityGates], quality.Outcome]
    blocking: bool
    description: str

    def spec(self, partitions_def: dg.PartitionsDefinition | None = seed_shards
             ) -> dg.AssetCheckSpec:
        return dg.AssetCheckSpec(self.name, asset=self.asset, blocking=self.blocking,
                                 description=self.description, partitions_def=partitions_def)

    def outcome(self, shards: Mapping[str, Frames], gates: QualityGates) -> quality.Outcome:
        return quality.combine({key: self.rule(frames, gates) for key, frames in shards.items()})


def to_result(outcome: quality.Outcome, severity: dg.AssetCheckSeverity = dg.AssetCheckSeverity.ERROR,
              **target: str) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(passed=outcome.passed, description=outcome.description,
                               metadata=as_metadata(outcome.metadata), severity=severity,
                               **target)


def run_shards(context: dg.AssetCheckExecutionContext) -> list[str]:
    """The shards a check step covers: one, or several in a backfill run; none if unpartitioned."""
    return context.partition_keys if context.has_partition_key_range else []


def check_specs(checks: Sequence[Check],
                partitions_def: dg.PartitionsDefinition | None = seed_shards
                ) -> list[dg.AssetCheckSpec]:
    return [check.spec(partitions_def) for check in checks]


def evaluate(checks: Sequence[Check], shards: Mapping[str, Frames], gates: QualityGates
             ) -> Iterator[dg.AssetCheckResult]:
    """One result per check for the run. `shards`: {shard key: {asset name: its frame}}; an
    unpartitioned asset passes one entry."""
    for check in checks:
        yield to_result(check.outcome(shards, gates), asset_key=check.asset,
                        check_name=check.name)


def by_shard(keys: Sequence[str], **frames: Mapping[str, pl.DataFrame]) -> dict[str, Frames]:
    """{key: {asset: frame}} from {asset: {key: frame}}, the shape the per-shard assets hold."""
    return {key: {asset: per_key[key] for asset, per_key in frames.items()} for key in keys}


def frame_check(asset: str, name: str, rule: Callable[[pl.DataFrame, QualityGates], quality.Outcome],
                *, blocking: bool, description: str) -> Check:
    """A check whose rule reads only the asset's own frame."""
    return Check(asset, name, lambda frames, gates: rule(frames[asset], gates), blocking,
                 description)


def known_reasons_check(asset: str, reasons: Collection[str], what: str) -> Check:
    """Every reject row names one of `reasons` (`what`: the filters or rules that reject)."""
    return frame_check(asset, "known_reasons",
                       lambda df, q: quality.Outcome(
                           df.filter(~pl.col("reason").is_in(list(reasons))).height == 0,
                           f"every reject reason is a known {what}"),
                       blocking=False, description=f"every reject names one of the known {what}s")


def standard_checks(asset: str, *, schema: pl.Schema, id_column: str | None,
                    required: Sequence[str], non_empty: bool = True) -> list[Check]:
    """Schema (blocking), non-empty (blocking), unique ids (blocking), null rates."""
    checks = [
        frame_check(asset, "schema", lambda df, q: quality.schema_matches(df, schema),
                    blocking=True, description="columns and types are the expected ones"),
        frame_check(asset, "null_rates",
                    lambda df, q: quality.null_rates(df, required, q.max_null_rate),
                    blocking=False,
                    description=f"null rate of {', '.join(required)} under the configured bound"),
    ]
    if non_empty:
        checks.append(frame_check(asset, "non_empty", lambda df, q: quality.non_empty(df),
                                  blocking=True, description="at least one row"))
    if id_column:
        checks.append(frame_check(asset, "unique_ids", lambda df, q: quality.unique(df, id_column),
                                  blocking=True, description=f"{id_column} is unique"))
    return checks


def reject_rate_check(asset: str, rejects_asset: str, gate: str,
                      count_reasons: Callable[[pl.DataFrame], dict[str, int]],
                      description: str) -> Check:
    """Blocking: the share of `asset`'s records rejected into `rejects_asset` is at most
    `quality_gates.<gate>`."""
    return Check(asset, "reject_rate", lambda frames, gates: quality.reject_rate(
        frames[asset].height, frames[rejects_asset].height, getattr(gates, gate),
        count_reasons(frames[rejects_asset])), True, description)
