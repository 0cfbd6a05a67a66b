"""The one module that uses Dagster internals (`dagster._core`), kept here so that nothing else does
(pyproject's import-linter contract "Public Dagster APIs only" exempts this module alone).

Why: `unicorn backfill` submits an asset backfill to DAGSTER_HOME for the daemon to carry out,
as the UI's Materialize -> backfill does. Dagster 1.13 has no public API that submits a backfill
without a webserver: `DagsterInstance.add_backfill` takes a `PartitionBackfill`, which is private
(`dagster._core.execution.backfill`), and the public GraphQL client
(`dagster_graphql.DagsterGraphQLClient`) needs a running webserver, which the CLI does not have.
Replace this with a public call once Dagster offers one.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import dagster as dg
from dagster._core.execution.backfill import PartitionBackfill
from dagster._core.utils import make_new_backfill_id


def submit_asset_backfill(instance: dg.DagsterInstance, graph: Any,
                          assets: Sequence[dg.AssetKey], partition_keys: Sequence[str],
                          tags: Mapping[str, str], title: str) -> str:
    """Submit a backfill of `assets` over `partition_keys` to `instance`; returns its id. The
    daemon runs it, the assets' BackfillPolicy deciding how many partitions go in one run."""
    backfill_id = make_new_backfill_id()
    instance.add_backfill(PartitionBackfill.from_asset_partitions(
        backfill_id=backfill_id, asset_graph=graph, partition_names=list(partition_keys),
        asset_selection=sorted(assets, key=str), backfill_timestamp=time.time(),
        tags=dict(tags), dynamic_partitions_store=instance, all_partitions=False, title=title,
        description=None, run_config=None))
    return backfill_id
