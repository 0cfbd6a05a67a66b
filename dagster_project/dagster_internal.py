"""The one module that imports Dagster's private APIs (`dagster._core...`): everything else uses
the public `dagster` package. Each private import is here for a reason no public API covers:

- Runs started by `unicorn` (cli.py) must carry a code-location origin, like a run launched from
  the UI, so the UI can re-execute them and shows them on the Overview timeline. The public
  `execute_in_process` / `execute_job` record no such origin, and the public launch path
  (`instance.submit_run` through the run launcher) needs a gRPC code server and runs the job in
  another process. So the CLI builds the origin the UI would record for the `unicorn` code
  location (LoadableTargetOrigin, ManagedGrpcPythonEnvCodeLocationOrigin, RemoteRepositoryOrigin,
  RemoteJobOrigin), the job's Python origin (ReconstructableRepository), the execution plan
  (create_execution_plan), checks the partition key against the instance's dynamic partitions
  (partition_loading_context, as execute_in_process does), creates the run with both origins (DagsterInstance.create_run_for_job)
  and executes it in this process (execute_run_iterator), which is what `dagster api execute_run`
  does in a launched run's process.
- `unicorn backfill` submits an asset backfill to DAGSTER_HOME for the daemon to carry out,
  as the UI's Materialize -> backfill does. Dagster 1.13 has no public API that submits a backfill
  without a webserver: `DagsterInstance.add_backfill` takes a `PartitionBackfill`, which is private
  (`dagster._core.execution.backfill`), and the public GraphQL client
  (`dagster_graphql.DagsterGraphQLClient`) needs a running webserver, which the CLI does not have.
  Replace each with a public call once Dagster offers one.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import dagster as dg
from dagster._core.execution.backfill import PartitionBackfill
from dagster._core.utils import make_new_backfill_id

# The code location of workspace.yaml and pyproject's [tool.dagster] (a test keeps them equal).
CODE_LOCATION_NAME = "unicorn"
DEFINITIONS_MODULE = "dagster_project.definitions"
DEFINITIONS_ATTRIBUTE = "defs"
REPOSITORY_NAME = "__repository__"  # the one repository of a Definitions object
PROJECT_ROOT = Path(__file__).resolve().parent.parent  # workspace.yaml's working_directory


def _reconstructable_job(job_name: str):
    from dagster._core.definitions.reconstruct import ReconstructableRepository

    return ReconstructableRepository.for_module(
        DEFINITIONS_MODULE, DEFINITIONS_ATTRIBUTE, working_directory=str(PROJECT_ROOT)
    ).get_reconstructable_job(job_name)


def located_job_origin(job_name: str):
    """The RemoteJobOrigin of `job_name` in the `unicorn` code location, as the UI records it."""
    from dagster._core.remote_origin import (
        ManagedGrpcPythonEnvCodeLocationOrigin,
        RemoteJobOrigin,
        RemoteRepositoryOrigin,
    )
    from dagster._core.types.loadable_target_origin import LoadableTargetOrigin

    target = LoadableTargetOrigin(executable_path=sys.executable, module_name=DEFINITIONS_MODULE,
                                  attribute=DEFINITIONS_ATTRIBUTE,
                                  working_directory=str(PROJECT_ROOT))
    location = ManagedGrpcPythonEnvCodeLocationOrigin(target, CODE_LOCATION_NAME)
    return RemoteJobOrigin(RemoteRepositoryOrigin(location, REPOSITORY_NAME), job_name)


def create_located_run(instance: dg.DagsterInstance, job_def: dg.JobDefinition,
                       tags: Mapping[str, str], partition_key: str | None = None,
                       run_config: Mapping[str, object] | None = None):
    """Create (not start) a run of `job_def` with the code-location origin of the `unicorn`
    location. Returns (run, reconstructable job to execute it with, its step keys)."""
    from dagster._core.definitions.partitions.context import partition_loading_context
    from dagster._core.execution.api import create_execution_plan

    recon_job = _reconstructable_job(job_def.name)
    run_tags = dict(tags)
    if partition_key is not None:
        with partition_loading_context(dynamic_partitions_store=instance) as context:
            job_def.validate_partition_key(partition_key, selected_asset_keys=None,
                                           context=context)
        run_tags.update(job_def.get_tags_for_partition_key(partition_key,
                                                           selected_asset_keys=None))
    run_config = dict(run_config or {})
    plan = create_execution_plan(recon_job, run_config=run_config,
                                 instance_ref=instance.get_ref(), tags=run_tags)
    run = instance.create_run_for_job(
        job_def=job_def, execution_plan=plan, run_config=run_config,
        tags={**job_def.run_tags, **run_tags},
        remote_job_origin=located_job_origin(job_def.name),
        job_code_origin=recon_job.get_python_origin())
    return run, recon_job, list(plan.step_keys_to_execute)


def execute_located_run(instance: dg.DagsterInstance, run, recon_job
                        ) -> Iterator[dg.DagsterEvent]:
    """Execute a run made by create_located_run in this process, yielding its events."""
    from dagster._core.execution.api import execute_run_iterator

    yield from execute_run_iterator(recon_job, run, instance)


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
