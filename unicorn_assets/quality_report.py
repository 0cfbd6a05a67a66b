"""The corpus-wide `quality_report`: one page per corpus run with every quality figure over all
shards, each with its n, beside the Unicorn paper's own, and a few seeded random records with their
seeds to read (logic/report.py). Each figure is also a number in the materialisation's metadata,
so the UI plots it across runs. The figures table is the asset's value (quality_report.parquet);
the page is also written to `<storage>/reports/quality_report.md`."""

from collections.abc import Iterator

import dagster as dg
import polars as pl
from pydantic import Field

from unicorn_assets.logic import figures as stage_figures
from unicorn_assets.logic import report
from unicorn_assets.metadata import OWNERS, stage_tags
from unicorn_assets.modality import CORPUS_GROUP
from unicorn_resources.storage import ParquetIOManager, join, write_bytes

Storage = dg.ResourceParam[ParquetIOManager]
REPORT_VERSION = "1"
REPORT_FILE = "reports/quality_report.md"


class QualityReportConfig(dg.Config):
    sample_size: int = Field(20_000, ge=100, le=1_000_000, description=(
        "at most this many captions (and instruction records) are read whole for the figures "
        "that need the text (distinct-n, type-token ratio, seed coverage, the multiple-choice "
        "letter check); counts, shares and lengths are exact over every row (ours)"))
    records_to_read: int = Field(10, ge=0, le=100, description="random records shown with their "
                                 "seeds on the page")
    sampling_seed: int = Field(0, ge=0, le=2**31 - 1, description="the seed of the sample and of "
                               "the records shown: the same seed shows the same rows")


COVERAGE_CHECK = "covers_every_shard"


def _per_shard(frame: pl.LazyFrame) -> dict[str, int]:
    counts = frame.group_by("shard").len().collect(engine="streaming")
    return {str(shard): int(n) for shard, n in counts.iter_rows()}


def stored_rows(storage: ParquetIOManager, asset: str) -> dict[str, int]:
    """{shard: rows} of every file stored under the asset's folder, read from the data folder
    itself (not through the partitions the instance knows)."""
    glob = join(storage.base_uri, asset, "*.parquet")
    fs, path = storage.s3.fs(glob)
    if not fs.glob(path):
        return {}
    return _per_shard(pl.scan_parquet(glob, storage_options=storage.s3.polars_options(glob)))


@dg.asset(
    description="One page per corpus run: every Stage 1 and Stage 2 quality figure over all "
    "shards, each with its n, beside the Unicorn paper's own (captions of 129 words on average, "
    "51–483; type-token ratio 0.68; mix 171 : 199 : 100; 6–8 QA pairs), and seeded random records "
    "with their seeds to read. Each figure is a number in the metadata, plotted across runs.",
    group_name=CORPUS_GROUP,
    kinds={"polars", "parquet", "markdown"},
    owners=OWNERS,
    tags=stage_tags("report"),
    code_version=REPORT_VERSION,
    check_specs=[dg.AssetCheckSpec(
        COVERAGE_CHECK, asset="quality_report", blocking=True,
        description="the report counted every stored caption and instruction record: per shard, "
        "its n equals the rows of the Parquet files in the data folder")],
)
def quality_report(context: dg.AssetExecutionContext, config: QualityReportConfig,
                   io_manager: Storage, caption_seeds: pl.LazyFrame,
                   expanded_captions: pl.LazyFrame, expanded_caption_rejects: pl.LazyFrame,
                   instructions: pl.LazyFrame, instruction_rejects: pl.LazyFrame
                   ) -> Iterator[dg.Output | dg.AssetCheckResult]:
    n, seed = config.sample_size, config.sampling_seed
    figures = [
        *report.stage_figures(
            "caption", stage_figures.caption_figures,
            report.exact_caption_figures(expanded_captions, expanded_caption_rejects),
            report.seeded_sample(expanded_captions, n, seed, "caption_id"),
            report.seeded_sample(expanded_caption_rejects, n, seed, "caption_id")),
        *report.stage_figures(
            "instruction", stage_figures.instruction_figures,
            report.exact_instruction_figures(instructions, instruction_rejects),
            report.seeded_sample(instructions, n, seed, "id"),
            report.seeded_sample(instruction_rejects, n, seed, "id")),
    ]
    records = report.records_to_read(instructions, expanded_captions, caption_seeds,
                                     config.records_to_read, seed)
    reported = {"captions": _per_shard(expanded_captions), "records": _per_shard(instructions)}
    shards = len(set(reported["captions"]) | set(_per_shard(caption_seeds)))
    page = report.report_markdown(figures, records, shards, n, seed)
    uri = join(io_manager.base_uri, REPORT_FILE)
    fs, path = io_manager.s3.fs(uri)
    write_bytes(fs, path, page.encode("utf-8"))
    context.log.info(f"quality report of {shards} shard(s): {len(figures)} figures, "
                     f"{records.height} records to read, written to {uri}")

    metadata: dict[str, dg.MetadataValue] = {
        "report": dg.MetadataValue.md(page),
        "report_file": dg.MetadataValue.path(uri),
        "shards": dg.MetadataValue.int(shards),
        "sample_size": dg.MetadataValue.int(n),
        "dagster/row_count": dg.MetadataValue.int(len(figures)),
    }
    for figure in figures:  # numbers, so the UI plots each across runs
        metadata[figure.key] = (dg.MetadataValue.int(int(figure.value))
                                if isinstance(figure.value, int) else
                                dg.MetadataValue.float(float(figure.value)))
    yield dg.Output(report.figures_frame(figures), metadata=metadata)

    outcomes = {what: report.coverage(reported[what], stored_rows(io_manager, asset), what)
                for what, asset in (("captions", "expanded_captions"),
                                    ("records", "instructions"))}
    passed = all(o.passed for o in outcomes.values())
    yield dg.AssetCheckResult(
        check_name=COVERAGE_CHECK, asset_key="quality_report", passed=passed,
        description="; ".join(o.description for o in outcomes.values()),
        metadata={f"{what}_{k}": v for what, o in outcomes.items() for k, v in o.metadata.items()})


report_assets = [quality_report]
