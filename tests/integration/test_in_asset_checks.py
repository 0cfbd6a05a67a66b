"""Checks run inside their assets: a failed blocking check fails its asset's step (after the
asset is written), so the steps downstream of that shard do not run, and the step is not retried.
The seeds' own gates (no seed left, too many malformed lines) fail the shard inside the step."""

from pathlib import Path

import dagster as dg

from tests.support import Pipeline, failed_checks, make_resources, materialize_shard
from unicorn_assets.partitions import SEED_SHARDS


def step_events(result: dg.ExecuteInProcessResult, kind: str) -> list[str]:
    return [e.step_key for e in result.all_events if e.event_type_value == kind]


def test_a_failed_blocking_check_stops_the_downstream_steps_of_that_shard(tmp_path: Path,
                                                                          instance):
    pipeline = Pipeline(tmp_path, instance)
    good = pipeline.add_shard("good", offset=0)
    assert good.success and not failed_checks(good)
    ran = set(step_events(good, "STEP_SUCCESS"))
    assert {"read_caption_seeds", "expand_captions", "make_instructions",
            "caption_embeddings"} <= ran
    assert not step_events(good, "STEP_SKIPPED")
    # no check is a step of its own any more: the shard job runs only the asset steps
    assert all(e.asset_check_evaluation_data.partition == "good" for e in good.all_events
               if e.event_type_value == "ASSET_CHECK_EVALUATION")

    # a shard with no seed fails the seeds gate inside the step (the blocking checks' rule, judged
    # per shard): nothing downstream of it runs, and only its rejects are stored, to say why
    (pipeline.seeds / "empty.jsonl").write_text("")  # a seed file with no line
    instance.add_dynamic_partitions(SEED_SHARDS, ["empty"])
    bad = pipeline.defs.resolve_job_def("unicorn_shard_job").execute_in_process(
        instance=instance, partition_key="empty", raise_on_error=False)
    assert not bad.success
    assert step_events(bad, "STEP_FAILURE") == ["read_caption_seeds"]
    assert step_events(bad, "STEP_START") == ["read_caption_seeds"]  # nothing downstream ran
    (failure,) = bad.get_step_failure_events()
    assert "- empty: " in failure.step_failure_data.error.message
    assert "no seed is left" in failure.step_failure_data.error.message
    recorded = instance.fetch_materializations(dg.AssetRecordsFilter(
        asset_key=dg.AssetKey("caption_seed_rejects"), asset_partitions=["empty"]), limit=1)
    assert recorded.records and recorded.records[0].run_id == bad.run_id
    assert (pipeline.data / "caption_seed_rejects" / "empty.parquet").exists()
    assert not (pipeline.data / "caption_seeds" / "empty.parquet").exists()
    assert not (pipeline.data / "expanded_captions" / "empty.parquet").exists()
    assert (pipeline.data / "expanded_captions" / "good.parquet").exists()


def test_a_failed_blocking_check_is_not_retried(tmp_path: Path, instance, seed_dir, fake_llm):
    """expand_captions has a retry policy for model errors; a failed check is not one."""
    resources = make_resources(tmp_path / "data", seed_dir, llm=fake_llm, quality_gates={
        "caption_min_median_words": 1000, "caption_max_median_words": 2000,
        "caption_max_p95_words": 3000})
    result = materialize_shard(instance, resources, "shard-a", raise_on_error=False)
    assert "expanded_captions:caption_length" in failed_checks(result)
    assert step_events(result, "STEP_START") == ["read_caption_seeds", "expand_captions"]
    assert not step_events(result, "STEP_UP_FOR_RETRY")
    assert step_events(result, "STEP_FAILURE") == ["expand_captions"]
    evaluation = next(e.asset_check_evaluation_data for e in result.all_events
                      if e.event_type_value == "ASSET_CHECK_EVALUATION"
                      and e.asset_check_evaluation_data.asset_check_key.name == "caption_length")
    assert evaluation.blocking and evaluation.partition == "shard-a"
