"""Stage 2 as Dagster assets on a real on-disk instance: seeds -> Stage 1 -> Stage 2 for two
shards in one run (FakeLLM), retries of invalid JSON, the profile's demo run config, and one
slow test with the real SmolLM2 model and JSON-schema decoding."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import polars as pl
import pytest
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
)
from pydantic import PrivateAttr

from dagster_project.jobs import build_jobs, unicorn_shard_job
from dagster_project.profiles import ProfileError, build_stage2, job_run_configs, load_profile
from tests.support import coco_captions, make_resources
from unicorn_assets.caption_seeds import read_caption_seeds
from unicorn_assets.expansion import expand_captions
from unicorn_assets.instructions import make_instructions, run_checks, stage2_checks
from unicorn_assets.logic.instructions import (
    CONVERSATION,
    TASK_TYPES,
    InstructionSettings,
    attempt_seed,
    extract_json,
    generate_instructions,
    image_token_ok,
    load_prompts,
    plan_instructions,
    well_formed,
)
from unicorn_assets.logic.text import caption_sha256
from unicorn_assets.partitions import SEED_SHARDS
from unicorn_resources.llm import ChatRequest, FakeLLM, LlamaCppLLM, SamplingParams
from unicorn_resources.llm.types import Completion
from unicorn_resources.quality_gates import QualityGates

SHARDS = ["shard-a", "shard-b"]
STAGE2_CHECKS = {check.name for check in stage2_checks}


class FlakyLLM(FakeLLM):
    """Answers each JSON request with broken JSON the first time it sees it, then like FakeLLM
    (a retry has a new seed, so it is a new request); prose requests (Stage 1) as FakeLLM."""

    _seen: set = PrivateAttr(default_factory=set)

    def _generate(self, requests, params):
        good = super()._generate(requests, params)
        out = []
        for request, completion in zip(requests, good):
            first = request.json_schema is not None and request.messages not in self._seen
            self._seen.add(request.messages)
            out.append(Completion('{"turns": [', 3, 3, "stop") if first else completion)
        return out


def definitions(data: Path, seeds: Path, llm=None, stage2: dict | None = None
                ) -> dg.Definitions:
    """Stage 0-2 with the job; `stage2`: the profile's stage2 section (none: the paper's)."""
    resources = make_resources(data, seeds, llm=llm, **({"stage2": stage2} if stage2 else {}))
    return dg.Definitions(assets=[read_caption_seeds, expand_captions, make_instructions],
                          jobs=[unicorn_shard_job], resources=resources)


def failed_checks(result: dg.ExecuteInProcessResult) -> list[str]:
    return sorted(f"{e.asset_check_evaluation_data.asset_check_key.asset_key.to_user_string()}:"
                  f"{e.asset_check_evaluation_data.asset_check_key.name}"
                  for e in result.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"
                  and not e.asset_check_evaluation_data.passed)


def checks_run(result: dg.ExecuteInProcessResult) -> set[str]:
    return {e.asset_check_evaluation_data.asset_check_key.name for e in result.all_events
            if e.event_type_value == "ASSET_CHECK_EVALUATION"}


def materialization(result: dg.ExecuteInProcessResult, asset: str) -> dict:
    events = [e for e in result.get_asset_materialization_events()
              if e.asset_key.to_user_string() == asset]
    return {k: getattr(v, "value", v) for k, v in events[0].materialization.metadata.items()}


def local_stage2() -> dict:
    return load_profile("local")["stage2"]


def test_two_shards_in_one_run_with_the_local_profile_settings(instance, tmp_path, seed_dir):
    """A backfill run over a shard range (BackfillPolicy): no run config, as a backfill launched
    from the UI has none; the demo settings come from the profile's stage2 section."""
    data = tmp_path / "data"
    defs = definitions(data, seed_dir, stage2=local_stage2())
    instance.add_dynamic_partitions(SEED_SHARDS, SHARDS)
    result = defs.resolve_job_def("unicorn_shard_job").execute_in_process(
        instance=instance,
        tags={ASSET_PARTITION_RANGE_START_TAG: SHARDS[0], ASSET_PARTITION_RANGE_END_TAG: SHARDS[1]})
    assert result.success
    assert failed_checks(result) == []
    assert STAGE2_CHECKS <= checks_run(result)

    demo = local_stage2()
    per_shard = {e.materialization.partition: {k: getattr(v, "value", v) for k, v in
                                               e.materialization.metadata.items()}
                 for e in result.get_asset_materialization_events()
                 if e.asset_key.to_user_string() == "instructions"}
    assert sorted(per_shard) == sorted(SHARDS)
    used = 0
    for key, shard_meta in per_shard.items():  # each shard's materialisation has its own figures
        available = pl.read_parquet(data / "expanded_captions" / f"{key}.parquet").height
        written = pl.read_parquet(data / "instructions" / f"{key}.parquet").height
        assert shard_meta["captions_available"] == available > demo["max_captions_per_shard"]
        assert shard_meta["captions_used"] == demo["max_captions_per_shard"]
        assert shard_meta["dagster/row_count"] == written
        assert shard_meta["shards_in_run"] == len(SHARDS)
        used += shard_meta["captions_used"]
    meta = materialization(result, "instructions")
    assert meta["max_captions_per_shard"] == demo["max_captions_per_shard"]
    assert meta["requests_per_attempt"] == [used]  # both shards in one batch
    assert meta["structured_output"] == "json_schema"
    assert meta["tokens_generated"] > 0 and meta["tokens_per_second"] > 0
    assert "model_note" in meta  # FakeLLM is marked as a stand-in
    assert "first_exchange" in meta["sample"] and "**human**" in meta["example_conversation"]

    rows = {}
    for key in SHARDS:
        recs = pl.read_parquet(data / "instructions" / f"{key}.parquet")
        rejs = pl.read_parquet(data / "instruction_rejects" / f"{key}.parquet")
        assert recs.schema["conversations"] == CONVERSATION
        assert set(recs["shard"]) <= {key} and set(rejs["shard"]) <= {key}
        assert recs.height + rejs.height == demo["max_captions_per_shard"]  # none dropped
        rows[key] = recs
        for t in TASK_TYPES:  # numbers the UI plots across shards and runs
            n = recs.filter(pl.col("task_type") == t).height
            assert per_shard[key][f"task_type_counts_{t}"] == n
            assert per_shard[key][f"share_{t}"] == pytest.approx(n / recs.height)
        assert per_shard[key]["json_validity_rate"] == 1.0
        assert per_shard[key]["json_valid_first_attempt"] == 1.0
        assert per_shard[key]["json_valid_final"] == 1.0
    records = pl.concat(rows.values())
    captions = pl.concat([pl.read_parquet(data / "expanded_captions" / f"{k}.parquet")
                          for k in SHARDS])
    assert set(records["n_turns"]) == {demo["qa_pairs_max"]}
    assert records["caption_id"].is_in(captions["caption_id"].to_list()).all()
    for conv in records["conversations"].to_list():
        assert len(conv) == 2 * demo["qa_pairs_max"] and image_token_ok(conv) and well_formed(conv)
    first = records.row(0, named=True)
    assert first["model_id"] == "fake:deterministic"
    assert first["prompt_version"] == f"stage2_{first['task_type']}/v1"
    assert first["sampling_seed"] == attempt_seed(4321, first["caption_id"], 0)


def test_materialize_without_config_uses_the_profiles_stage2_settings(instance, tmp_path,
                                                                    seed_dir):
    """Materialize in the UI, a backfill, the sensor: the asset alone, one shard, no config."""
    data = tmp_path / "data"
    defs = definitions(data, seed_dir, stage2=local_stage2())
    instance.add_dynamic_partitions(SEED_SHARDS, SHARDS[:1])
    result = dg.materialize([read_caption_seeds, expand_captions, make_instructions],
                            resources=defs.resources, instance=instance, partition_key=SHARDS[0])
    assert result.success
    meta = materialization(result, "instructions")
    assert meta["max_captions_per_shard"] == 3 and meta["captions_used"] == 3
    assert meta["turns"]["question_answering"] == [2, 2]
    assert all(meta[f"task_mix_{t}"] == 0.25 for t in TASK_TYPES)  # numbers, beside share_<t>
    assert meta["settings"]["qa_pairs_max"] == 2 and meta["settings"]["max_attempts"] == 3


def test_a_runs_config_overrides_the_profile_field_by_field(instance, tmp_path, seed_dir):
    data = tmp_path / "data"
    defs = definitions(data, seed_dir, stage2=local_stage2())
    instance.add_dynamic_partitions(SEED_SHARDS, SHARDS[:1])
    config = {"ops": {"make_instructions": {"config": {"qa_pairs_min": 3, "qa_pairs_max": 3,
                                                       "max_captions_per_shard": 0}}}}
    result = defs.resolve_job_def("unicorn_shard_job").execute_in_process(
        instance=instance, partition_key=SHARDS[0], run_config=config)
    assert result.success
    meta = materialization(result, "instructions")
    available = pl.read_parquet(data / "expanded_captions" / f"{SHARDS[0]}.parquet").height
    assert meta["captions_used"] == available > 3  # 0: every caption, over the profile's 3
    assert meta["turns"]["question_answering"] == [3, 3]  # the run's
    assert all(meta[f"task_mix_{t}"] == 0.25 for t in TASK_TYPES)  # numbers, beside share_<t>  # the profile's, not overridden
    records = pl.read_parquet(data / "instructions" / f"{SHARDS[0]}.parquet")
    assert set(records.filter(pl.col("task_type") != "multi_turn")["n_turns"]) == {3}


def test_bad_stage2_settings_are_refused_naming_the_file_and_the_fix():
    with pytest.raises(ProfileError, match=r"my\.yaml: stage2\.qa_pairs is not a setting; did you "
                       r"mean stage2\.qa_pairs_min\?"):
        build_stage2({"qa_pairs": 2}, "my.yaml")
    with pytest.raises(ProfileError, match=r"my\.yaml: stage2\.qa_pairs_min = 'two' is not valid: "
                       r".*integer.*fix it, or remove it to take the default 6"):
        build_stage2({"qa_pairs_min": "two"}, "my.yaml")


def test_invalid_json_is_retried_and_measured(instance, tmp_path, seed_dir):
    data = tmp_path / "data"
    defs = definitions(data, seed_dir, llm=FlakyLLM())
    instance.add_dynamic_partitions(SEED_SHARDS, SHARDS[:1])
    config = {"ops": {"make_instructions": {"config": {"max_captions_per_shard": 4}}}}
    result = defs.resolve_job_def("unicorn_shard_job").execute_in_process(
        instance=instance, partition_key=SHARDS[0], run_config=config)
    assert result.success  # JSON validity is not blocking: every record was retried and is valid
    assert failed_checks(result) == ["instructions:json_validity_rate"]
    records = pl.read_parquet(data / "instructions" / f"{SHARDS[0]}.parquet")
    assert records.height == 4
    assert records["attempts"].to_list() == [2] * 4
    assert records["attempt_reasons"].to_list() == [["invalid_json"]] * 4
    assert records["sampling_seed"].to_list() == [attempt_seed(4321, c, 1)
                                                  for c in records["caption_id"]]
    meta = materialization(result, "instructions")
    assert meta["json_validity_rate"] == 0.5 and meta["requests_per_attempt"] == [4, 4]
    # every first output was invalid, every record valid after one retry
    assert meta["json_valid_first_attempt"] == 0.0 and meta["json_valid_final"] == 1.0
    # the paper's defaults apply without the profile's stage2 section: 6-8 QA pairs
    assert set(records["n_turns"]) <= {6, 7, 8}
    assert set(records["task_type"]) <= {"multiple_choice", "question_answering",
                                         "complex_reasoning"}


def test_a_shard_whose_records_all_fail_is_blocked(instance, tmp_path, seed_dir):
    class Broken(FakeLLM):
        def _generate(self, requests, params):
            return [Completion("no", 1, 1, "stop") if r.json_schema else c
                    for r, c in zip(requests, super()._generate(requests, params))]

    data = tmp_path / "data"
    defs = definitions(data, seed_dir, llm=Broken())
    instance.add_dynamic_partitions(SEED_SHARDS, SHARDS[:1])
    config = {"ops": {"make_instructions": {"config": {"max_captions_per_shard": 2,
                                                       "max_attempts": 2}}}}
    result = defs.resolve_job_def("unicorn_shard_job").execute_in_process(
        instance=instance, partition_key=SHARDS[0], run_config=config, raise_on_error=False)
    assert not result.success
    assert {"instructions:non_empty", "instructions:reject_rate",
            "instructions:json_validity_rate"} <= set(failed_checks(result))
    rejects = pl.read_parquet(data / "instruction_rejects" / f"{SHARDS[0]}.parquet")
    assert rejects["reason"].to_list() == ["invalid_json"] * 2
    assert rejects["attempts"].to_list() == [2, 2]


def test_run_config_must_name_a_known_job():
    with pytest.raises(ProfileError, match="unknown job.*nightly_job"):
        job_run_configs({"run_config": {"nightly_job": {}}}, [unicorn_shard_job.name])
    assert job_run_configs({}, [unicorn_shard_job.name]) == {}


def test_a_jobs_run_config_from_the_profile_is_its_default():
    config = {"ops": {"make_instructions": {"config": {"max_captions_per_shard": 2}}}}
    jobs = {job.name: job for job in build_jobs(
        job_run_configs({"run_config": {"unicorn_shard_job": config}}, ["unicorn_shard_job"]))}
    assert jobs["unicorn_shard_job"].config == config
    assert jobs["unicorn_corpus_job"].config is None


@pytest.mark.slow
def test_real_model_with_json_schema_decoding(tmp_path):
    """SmolLM2-135M via llama.cpp: constrained decoding gives parseable JSON of the right shape.
    What it says is weak (a 135M model); the record rules decide what is kept."""
    rows = coco_captions(2, offset=30)
    captions = pl.DataFrame({"caption_id": [str(r["id"]) for r in rows], "seed_id": ["s"] * 2,
                             "shard": ["a"] * 2, "caption": [r["caption"] for r in rows],
                             "caption_sha256": [caption_sha256(r["caption"]) for r in rows]})
    settings = InstructionSettings(task_mix={"question_answering": 1, "multiple_choice": 1},
                                   turns={t: (1, 1) for t in TASK_TYPES}, max_attempts=2)
    plan = plan_instructions(captions, settings)
    llm = LlamaCppLLM(n_ctx=1024, cache_enabled=False)
    params = SamplingParams(temperature=0.7, max_tokens=200)
    texts = []

    def complete(requests):
        assert all(r["json_schema"] for r in requests)
        out = llm.generate([ChatRequest.of(**r) for r in requests], params)
        texts.extend(c.text for c in out if c.finish_reason == "stop")
        return out

    result = generate_instructions(plan, load_prompts("v1"), complete, settings,
                                   structured=llm.supports_json_schema, model_id=llm.model_id,
                                   sampling=params.as_dict())
    assert texts and all("turns" in extract_json(t) for t in texts)  # decoded to the schema
    assert result.records.height + result.rejects.height == 2
    assert set(result.rejects["reason"].to_list()) <= {
        "truncated", "wrong_turn_count", "empty_turn", "image_token", "options_not_distinct",
        "answer_not_in_options", "restates_question"}  # never invalid_json / schema_mismatch
    for conv in result.records["conversations"].to_list():
        assert image_token_ok(conv) and well_formed(conv)
    assert result.records["model_id"].to_list() == [llm.model_id] * result.records.height


def test_stage2_checks_read_the_stored_conversations_and_fail_on_bad_ones(instance, tmp_path,
                                                                         seed_dir):
    """Multiple-choice replies are stored as the letter alone with the rationale in
    mc_rationale; the turns and letter checks, run on the stored Parquet after it was altered,
    fail on a reply that is not a letter and on a record with a pair too few."""
    data = tmp_path / "data"
    stage2 = {**local_stage2(), "task_mix": {"multiple_choice": 1}, "max_captions_per_shard": 2}
    defs = definitions(data, seed_dir, stage2=stage2)
    instance.add_dynamic_partitions(SEED_SHARDS, SHARDS[:1])
    result = defs.resolve_job_def("unicorn_shard_job").execute_in_process(
        instance=instance, partition_key=SHARDS[0])
    assert result.success and failed_checks(result) == []
    assert {"mc_letter_reply", "turns_per_record"} <= checks_run(result)
    path = data / "instructions" / f"{SHARDS[0]}.parquet"
    stored = pl.read_parquet(path)
    assert stored.height == 2 and set(stored["task_type"]) == {"multiple_choice"}
    for conv, rationale in zip(stored["conversations"].to_list(), stored["mc_rationale"].to_list()):
        assert [t["value"] for t in conv[1::2]] != [] and all(
            t["value"] in "ABCD" and len(t["value"]) == 1 for t in conv[1::2])
        assert all(t["value"].endswith("given choices directly.") for t in conv[::2])
        assert len(rationale) == len(conv) // 2 and all(rationale)

    settings = build_stage2(stage2).settings()
    checks = {c.name: c for c in run_checks(settings)}

    def judged(frame: pl.DataFrame) -> dict[str, bool]:
        frame.write_parquet(path)
        back = pl.read_parquet(path)
        frames = {"a": {"instructions": back, "instruction_rejects": pl.read_parquet(
            data / "instruction_rejects" / f"{SHARDS[0]}.parquet")}}
        return {name: checks[name].outcome(frames, QualityGates()).passed
                for name in ("mc_letter_reply", "turns_per_record", "conversation_shape")}

    assert judged(stored) == {"mc_letter_reply": True, "turns_per_record": True,
                              "conversation_shape": True}
    convs = stored["conversations"].to_list()
    with_reason = [[*c[:1], c[1] | {"value": c[1]["value"] + ". Because it is."}, *c[2:]]
                   for c in convs]
    one_pair_short = [c[:-2] for c in convs]
    assert judged(stored.with_columns(pl.Series("conversations", with_reason,
                                                dtype=CONVERSATION)))["mc_letter_reply"] is False
    assert judged(stored.with_columns(pl.Series("conversations", one_pair_short,
                                                dtype=CONVERSATION)))["turns_per_record"] is False
