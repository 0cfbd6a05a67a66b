"""The corpus-wide quality_report on a real instance: two shards through seeds -> Stage 1 ->
Stage 2 (FakeLLM), then the report. Its figures equal figures.py computed directly from the stored
Parquet, every figure is a number in the metadata, the records it shows exist and pair with their
seeds, and its coverage check fails when a stored shard is left out."""

from __future__ import annotations

import math
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from tests.support import Pipeline, failed_checks
from unicorn_assets.logic import figures
from unicorn_assets.partitions import SEED_SHARDS

REPORT = [dg.AssetKey("quality_report")]


@pytest.fixture
def pipeline(tmp_path: Path, instance) -> Pipeline:
    pipeline = Pipeline(tmp_path, instance)
    for offset, key in enumerate(["shard-a", "shard-b"]):
        assert pipeline.add_shard(key, offset * 3).success
    return pipeline


def stored(pipeline: Pipeline, asset: str) -> pl.DataFrame:
    return pl.read_parquet(pipeline.data / asset / "*.parquet")


def report_run(pipeline: Pipeline, config: dict | None = None) -> dg.ExecuteInProcessResult:
    return pipeline.defs.resolve_job_def("unicorn_corpus_job").execute_in_process(
        instance=pipeline.instance, raise_on_error=False, asset_selection=REPORT,
        run_config={"ops": {"quality_report": {"config": config}}} if config else None)


def test_figures_equal_a_direct_computation_from_the_stored_parquet(pipeline: Pipeline):
    result = report_run(pipeline)
    assert result.success and not failed_checks(result), failed_checks(result)
    meta = result.asset_materializations_for_node("quality_report")[0].metadata

    expected = {
        **{f"caption/{k}": v for k, v in figures.caption_figures(
            stored(pipeline, "expanded_captions"),
            stored(pipeline, "expanded_caption_rejects")).items()},
        **{f"instruction/{k}": v for k, v in figures.instruction_figures(
            stored(pipeline, "instructions"), stored(pipeline, "instruction_rejects")).items()},
    }
    measured = {k: v for k, v in expected.items() if not math.isnan(v)}
    assert measured["caption/captions_n"] == 6 and measured["instruction/records_n"] > 0
    for key, value in measured.items():
        entry = meta[key]
        assert isinstance(entry, (dg.FloatMetadataValue, dg.IntMetadataValue)), (key, entry)
        assert entry.value == pytest.approx(value, rel=1e-9, abs=1e-12), key
    assert {k for k in meta if "/" in k and not k.startswith("dagster/")} == set(measured)

    page = meta["report"].value
    assert "| words_mean |" in page and "| 129 |" in page and "| type_token_ratio |" in page
    assert "171K of 470K" in page
    # the page is stored under the data folder, and so is the figures table
    assert (pipeline.data / "reports" / "quality_report.md").read_text() == page
    table = pl.read_parquet(pipeline.data / "quality_report.parquet")
    row = table.filter(pl.col("figure") == "captions_n").row(0, named=True)
    assert (row["value"], row["n"], row["exact"]) == (6, 6, True)


def test_records_to_read_exist_pair_with_their_seeds_and_are_stable(pipeline: Pipeline):
    first = report_run(pipeline, {"records_to_read": 4})
    page = first.asset_materializations_for_node("quality_report")[0].metadata["report"].value
    records = stored(pipeline, "instructions")
    captions = stored(pipeline, "expanded_captions")
    seeds = stored(pipeline, "caption_seeds")
    shown = [r for r in records.iter_rows(named=True) if f"`{r['id']}`" in page]
    assert len(shown) == min(4, records.height)
    for record in shown:
        seed = seeds.filter((pl.col("seed_id") == record["seed_id"])
                            & (pl.col("shard") == record["shard"]))["caption"].item()
        caption = captions.filter(pl.col("caption_id") == record["caption_id"])["caption"].item()
        block = page.split(f"`{record['id']}`")[1].split("### ")[0]
        assert f"**seed:** {seed}" in block and f"**caption:** {caption}" in block
    again = report_run(pipeline, {"records_to_read": 4})
    assert again.asset_materializations_for_node("quality_report")[0].metadata[
        "report"].value == page


def test_the_coverage_check_fails_when_a_stored_shard_is_left_out(pipeline: Pipeline):
    """A shard whose partition was deleted keeps its files: the report no longer counts them,
    and its check says so."""
    pipeline.instance.delete_dynamic_partition(SEED_SHARDS, "shard-b")
    result = report_run(pipeline)
    assert "quality_report:covers_every_shard" in failed_checks(result)
    evaluation = next(e.asset_check_evaluation_data for e in result.all_events
                      if e.event_type_value == "ASSET_CHECK_EVALUATION")
    assert "shard-b" in evaluation.description and "Register" in evaluation.description
