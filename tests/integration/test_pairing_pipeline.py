"""Issue 10.3, content-addressed pairing, end to end on a real Dagster instance (FakeLLM, tiny
untrained open_clip): the whole pipeline runs, then Stage 1 of one shard re-runs with another
sampling seed (same caption ids, other texts) and its Stage 2/3 stay stale. The corpus job
publishes nothing mispaired: a blocking check stops it and names that shard and the runs that fix
it, and the exports alone refuse too, keeping the previous ones. Once that shard's Stage 2/3 are
re-made, the corpus job passes, and every exported record's text is the text its embedding was
computed from (re-encoded here) and its instructions were made from."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl
import pytest

from tests.support import Pipeline, failed_checks
from unicorn_assets.logic.modality import ModalityStatistics
from unicorn_assets.logic.text import caption_sha256
from unicorn_resources.export_reader import UnicornExport

STAGE1 = ["expanded_captions", "expanded_caption_rejects"]
STAGE23 = ["instructions", "instruction_rejects", "caption_embeddings"]
EXPORTS = ("unicorn_pretrain", "unicorn_instruct")


@pytest.fixture
def pipeline(tmp_path: Path, instance) -> Pipeline:
    return Pipeline(tmp_path, instance)


def run_shard(pipeline: Pipeline, key: str, assets: list[str],
              run_config: dict | None = None) -> dg.ExecuteInProcessResult:
    return pipeline.defs.resolve_job_def("unicorn_shard_job").execute_in_process(
        instance=pipeline.instance, partition_key=key, raise_on_error=False,
        asset_selection=[dg.AssetKey(a) for a in assets], run_config=run_config)


def export_files(pipeline: Pipeline) -> dict[str, bytes]:
    root = pipeline.data / "exports"
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def check_description(result: dg.ExecuteInProcessResult, name: str) -> str:
    (evaluation,) = [e.asset_check_evaluation_data for e in result.all_events
                     if e.event_type_value == "ASSET_CHECK_EVALUATION"
                     and e.asset_check_evaluation_data.asset_check_key.name == name]
    return evaluation.description


def step_errors(result: dg.ExecuteInProcessResult) -> dict[str, str]:
    return {e.step_key: e.step_failure_data.error.to_string() for e in result.all_events
            if e.event_type_value == "STEP_FAILURE"}


def captions(pipeline: Pipeline, shard: str) -> dict[str, str]:
    frame = pl.read_parquet(pipeline.data / "expanded_captions" / f"{shard}.parquet")
    return dict(zip(frame["caption_id"], frame["caption"]))


def test_a_stage1_rerun_never_publishes_text_paired_with_another_texts_embedding(
        pipeline: Pipeline):
    for offset, key in enumerate(["shard-a", "shard-b"]):
        result = pipeline.add_shard(key, offset * 3)
        assert result.success and not failed_checks(result), failed_checks(result)
    first = pipeline.corpus()
    assert first.success and not failed_checks(first), failed_checks(first)
    published = export_files(pipeline)

    # Stage 1 of shard-a again, with another sampling seed: the same caption ids, other texts
    before = captions(pipeline, "shard-a")
    rerun = run_shard(pipeline, "shard-a", STAGE1,
                      {"ops": {"expand_captions": {"config": {"sampling_seed": 98765}}}})
    assert rerun.success and not failed_checks(rerun), failed_checks(rerun)
    after = captions(pipeline, "shard-a")
    rewritten = [i for i in set(before) & set(after) if before[i] != after[i]]
    assert rewritten, "the re-run must give some kept caption id another text"

    # the corpus job: the blocking check stops it before any export, naming shard-a and the fix
    blocked = pipeline.corpus()
    assert not blocked.success
    assert "transferred_embeddings:caption_pairing" in failed_checks(blocked)
    message = check_description(blocked, "caption_pairing")
    assert "shard-a" in message and "shard-b" not in message
    assert ("shard(s) shard-a: instructions and caption_embeddings were made from older captions"
            in message)
    assert "unicorn backfill --shard shard-a --select" in message
    assert "unicorn materialize --shard shard-a" in message
    logged = [e.user_message for e in pipeline.instance.all_logs(blocked.run_id)]
    assert any(message in line for line in logged)  # the run log shows it too (command line)
    assert not blocked.asset_materializations_for_node("pretrain_dataset")
    assert not blocked.asset_materializations_for_node("instruct_dataset")
    assert export_files(pipeline) == published  # the previous exports stay, byte for byte

    # the exports on their own (e.g. Materialize in the UI) refuse with the same message
    alone = pipeline.corpus(["pretrain_dataset", "instruct_dataset"])
    assert not alone.success
    errors = step_errors(alone)
    for step in ("pretrain_dataset", "instruct_dataset"):
        assert f"{step} not published" in errors[step]
        assert "shard(s) shard-a: " in errors[step] and "shard-b" not in errors[step]
    assert export_files(pipeline) == published
    assert not [p for p in (pipeline.data / "exports").iterdir() if p.name not in EXPORTS]

    # the fix the message names: re-make shard-a's Stage 2/3 (its Stage 1 stays as re-run)
    fixed = run_shard(pipeline, "shard-a", STAGE23)
    assert fixed.success and not failed_checks(fixed), failed_checks(fixed)
    assert captions(pipeline, "shard-a") == after
    final = pipeline.corpus()
    assert final.success and not failed_checks(final), failed_checks(final)
    assert check_description(final, "caption_pairing").startswith("every instruction record")

    # every record pairs the text it carries with the embedding of exactly that text
    texts = {**captions(pipeline, "shard-a"), **captions(pipeline, "shard-b")}
    stats = ModalityStatistics.from_frame(
        pl.read_parquet(pipeline.data / "modality_statistics.parquet"))
    clip = pipeline.defs.resources["clip"]
    pretrain = UnicornExport(pipeline.data / "exports" / "unicorn_pretrain")
    records = list(pretrain.records())
    assert len(records) == len(texts)
    exported_text = [r["conversations"][1]["value"] for r in records]
    for record, text in zip(records, exported_text):
        assert text == texts[record["caption_id"]]  # the caption as Stage 1 holds it now
        assert record["caption_sha256"] == caption_sha256(text)
    # re-encode the exported texts and shift them: the exported vectors are exactly those
    shifted = clip.encode_text(exported_text).astype(np.float64) - stats.offset
    shifted /= np.linalg.norm(shifted, axis=1, keepdims=True)
    vectors = np.stack([pretrain.embedding(r) for r in records])
    np.testing.assert_allclose(vectors, shifted, atol=1e-5)
    assert any(r["caption_id"] in rewritten for r in records)

    instruct = UnicornExport(pipeline.data / "exports" / "unicorn_instruct")
    made = pl.read_parquet(pipeline.data / "instructions" / "*.parquet")
    made_from = dict(zip(made["id"], made["caption_sha256"]))
    by_caption = {r["caption_id"]: pretrain.embedding(r) for r in records}
    dialogues = list(instruct.records())
    assert dialogues and any(r["caption_id"] in rewritten for r in dialogues)
    for record in dialogues:
        digest = caption_sha256(texts[record["caption_id"]])
        assert record["caption_sha256"] == made_from[record["id"]] == digest
        np.testing.assert_array_equal(instruct.embedding(record), by_caption[record["caption_id"]])
