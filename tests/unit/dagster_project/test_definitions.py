"""The Definitions load (in-process and through the Dagster CLI, as `dagster dev` loads them), every
asset has checks, and every per-record asset is partitioned by the one seed_shards definition."""

import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from dagster_project.definitions import build_definitions
from dagster_project.jobs import SHARD_GROUPS
from tests.support import ROOT
from unicorn_assets.partitions import SEED_SHARDS

PER_RECORD = ["caption_seeds", "caption_seed_rejects", "expanded_captions",
              "expanded_caption_rejects"]


@pytest.fixture(scope="module")
def graph():
    return build_definitions().resolve_asset_graph()


def test_definitions_load_with_jobs_and_resources():
    defs = build_definitions()
    assert defs.resolve_job_def("unicorn_shard_job").partitions_def.name == SEED_SHARDS
    assert {"io_manager", "seeds", "llm", "quality_gates"} <= set(defs.resources)
    keys = {k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()}
    assert set(PER_RECORD) <= keys


def test_every_asset_has_at_least_one_check(graph):
    checked = {key.asset_key for key in graph.asset_check_keys}
    unchecked = [k.to_user_string() for k in graph.materializable_asset_keys if k not in checked]
    assert unchecked == []


def test_per_record_assets_share_the_seed_shards_partitions(graph):
    for key in PER_RECORD:
        partitions = graph.get(dg.AssetKey(key)).partitions_def
        assert isinstance(partitions, dg.DynamicPartitionsDefinition), key
        assert partitions.name == SEED_SHARDS
    for group in SHARD_GROUPS:  # every asset the per-shard job runs
        for key in graph.asset_keys_for_group(group):
            partitions = graph.get(key).partitions_def
            assert partitions is not None and partitions.name == SEED_SHARDS, key
    # and there is only one dynamic partitions definition: no shard asset has its own
    dynamic = {p.name for p in graph.all_partitions_defs
               if isinstance(p, dg.DynamicPartitionsDefinition)}
    assert dynamic == {SEED_SHARDS}


def test_blocking_checks_guard_what_flows_downstream(graph):
    blocking = {(k.asset_key.to_user_string(), k.name) for k in graph.asset_check_keys
                if graph.get_check_spec(k).blocking}
    for asset in ("caption_seeds", "expanded_captions"):
        assert {(asset, "schema"), (asset, "non_empty"), (asset, "unique_ids")} <= blocking
    assert ("caption_seeds", "malformed_line_rate") in blocking
    assert ("expanded_captions", "reject_rate") in blocking


@pytest.mark.parametrize("target", [["-m", "dagster_project.definitions"],
                                    ["-w", "workspace.yaml"]])
def test_the_dagster_cli_validates_the_definitions(tmp_path: Path, target):
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path)}
    (tmp_path / "dagster.yaml").write_text("")
    out = subprocess.run([str(Path(sys.executable).parent / "dagster"), "definitions", "validate",
                          *target], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "All code locations passed validation" in out.stdout + out.stderr


HEAVY = ("torch", "transformers", "diffusers", "open_clip")
PROBE = """
import json, sys
import dagster_project.definitions as location
for profile in ("local", "docker", "gpu", "cluster"):
    location.build_definitions(profile).resolve_all_job_defs()
{then}
print(json.dumps(sorted(m for m in {heavy!r} if m in sys.modules)))
"""


def heavy_modules_after(then: str = "") -> list[str]:
    """The model libraries a fresh process holds after loading the code location (every profile),
    then running `then`."""
    out = subprocess.run([sys.executable, "-c", PROBE.format(then=then, heavy=HEAVY)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_loading_the_code_location_imports_no_model_library():
    """Every process that loads the Definitions (code server, run workers, Stage 1 runs) would
    otherwise pay torch's ~500 MiB; the resources import their model libraries when they run."""
    assert heavy_modules_after() == []
    # the probe sees torch once a model code path runs: the batcher imports it when it maps
    assert "torch" in heavy_modules_after(
        "from unicorn_resources.batching import OomBatcher\n"
        "assert OomBatcher(2).map(len, [1, 2, 3]) == [2, 1]")
