"""Corpus-wide exports a VLM trainer loads: `pretrain_dataset` (brief-description caption records)
and `instruct_dataset` (Stage 2 conversations), each pointing to its transferred embedding.
A caption whose exact text is also in an earlier shard (sorted key order) is left out of both.
Records join their embedding on caption_id AND caption_sha256, and an export refuses to publish
while any caption, instruction record or embedding was made from another text (see
logic/pairing.py); the blocking check `caption_pairing` stops the corpus job before it.

Each export is built in a staging folder, verified, then swapped in whole for the previous one.
See unicorn_resources/export_reader.py for how a trainer reads it.
"""

import enum
import hashlib
import json
import shutil
from pathlib import Path

import dagster as dg
import polars as pl
from fsspec.implementations.local import LocalFileSystem
from pydantic import Field

from unicorn_assets.checks import to_result
from unicorn_assets.logic import exports as export
from unicorn_assets.logic import pairing
from unicorn_assets.logic.modality import ModalityStatistics
from unicorn_assets.logic.prompts import load_lines
from unicorn_assets.logic.quality import Outcome
from unicorn_assets.metadata import OWNERS, markdown_table, stage_tags
from unicorn_assets.modality import CORPUS_GROUP
from unicorn_resources.clip import UNTRAINED_CLIP_NOTE
from unicorn_resources.storage import ParquetIOManager, join

# Exports go under the IO manager's storage base (local or s3://).
Storage = dg.ResourceParam[ParquetIOManager]


class ExportFormat(enum.Enum):
    """An Enum, so Dagster checks the names in a run config or profile before any run."""

    llava = "llava"
    unicorn = "unicorn"
    unicorn_pickle = "unicorn_pickle"


class ExportConfig(dg.Config):
    rows_per_file: int = Field(100_000, description="embedding rows per safetensors file")
    formats: list[ExportFormat] = Field(
        ["llava"], min_length=1, description="llava (always written: records.jsonl/.json, "
        "safetensors shards); unicorn: also unicorn/ as the Unicorn reference trainer reads it "
        "(a `caption` key, ids = caption ids, embeddings keyed by id in safetensors); "
        "unicorn_pickle: also unicorn/embeddings.pkl, the trainer's own pickle (opt-in: pickle "
        "runs code when loaded, so load it only from a source you trust)")

    @property
    def format_names(self) -> list[str]:
        return [getattr(f, "value", f) for f in self.formats]  # the default stays a string


class PretrainExportConfig(ExportConfig):
    export_dir: str = Field("exports/unicorn_pretrain",
                            description="under the storage base, or an absolute path / URI")
    prompts: str = Field("brief_description/v1.txt",
                         description="versioned list of brief-description instructions, one a line")


class InstructExportConfig(ExportConfig):
    export_dir: str = Field("exports/unicorn_instruct",
                            description="under the storage base, or an absolute path / URI")


def export_folder(io_manager: ParquetIOManager, export_dir: str) -> export.ExportFolder:
    if "://" in export_dir or export_dir.startswith("/"):
        uri = export_dir
    else:
        base = io_manager.base_uri
        uri = join(base if "://" in base else str(Path(base).resolve()), export_dir)
    fs, path = io_manager.s3.fs(uri)
    return export.ExportFolder(fs, path, io_manager.s3.polars_options(uri))


def distinct(frame: pl.LazyFrame, column: str) -> list[str]:
    return sorted(frame.select(pl.col(column).unique()).collect()[column].drop_nulls().to_list())


def refuse_mispaired(dataset: str, captions: pl.LazyFrame,
                     tables: dict[str, pl.LazyFrame]) -> None:
    """Raise, naming the shards to re-run, when the stored captions and what was made from them
    disagree: the export would pair a text with an embedding or dialogue of another text."""
    outcome = pairing.outcome(pairing.find_problems(captions, tables))
    if not outcome.passed:
        raise ValueError(f"{dataset} not published: {outcome.description}")


def build_export(context: dg.AssetExecutionContext, io_manager: ParquetIOManager,
                 config: PretrainExportConfig | InstructExportConfig, records: pl.LazyFrame,
                 embeddings: pl.LazyFrame, stats_frame: pl.DataFrame, models: dict[str, list[str]],
                 duplicates_dropped: int, captions: pl.LazyFrame, **extra) -> dg.MaterializeResult:
    """Stage, verify, then publish one export; a failure leaves the previous export untouched."""
    dataset = context.asset_key.to_user_string()
    stats = ModalityStatistics.from_frame(stats_frame)
    extra["models"] = {**models, "clip": stats.model_id}
    target = export_folder(io_manager, config.export_dir)
    staging = export.staging_folder(target.fs, target.path)
    try:
        if "unicorn_pickle" in config.format_names:
            context.log.warning(f"{dataset}: writing {export.UNICORN_PICKLE} as asked (format "
                                "unicorn_pickle): pickle runs code when loaded; a trainer should "
                                f"load it only from a source it trusts, or read "
                                f"{export.UNICORN_EMBEDDINGS} instead")
        written = export.write_export(staging, records, embeddings, stats, config.rows_per_file,
                                      formats=config.format_names, captions=captions,
                                      dataset=dataset)
        files = export.file_table(staging, written.embedding_files)
        manifest = export.manifest(dataset, written, stats, files, duplicates_dropped, **extra)
        (staging / export.MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        outcome = export.records_resolve(export.ExportFolder(LocalFileSystem(), str(staging)))
        if not outcome.passed:
            raise ValueError(f"{dataset} not published, the previous export is kept: "
                             f"{outcome.description}")
        sample = pl.scan_ndjson(staging / export.RECORDS).head(3).collect()
        export.publish(staging, target.fs, target.path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    context.log.info(f"{written.records} records, {written.embeddings} embeddings in "
                     f"{len(written.embedding_files)} file(s) -> {target.path}; "
                     f"{duplicates_dropped} record(s) of captions already in an earlier shard "
                     "left out")
    sample = sample.with_columns(pl.col("conversations").list.eval(
        pl.element().struct.field("from") + ": " + pl.element().struct.field("value"))
        .list.join(" / "), pl.col("embedding").struct.json_encode())
    meta = {"export_dir": dg.MetadataValue.path(target.location),
            "dagster/row_count": written.records, "embeddings": written.embeddings,
            "duplicates_dropped": duplicates_dropped,
            "embedding_files": len(written.embedding_files),
            "formats": ", ".join(written.formats),
            "inference_transform": dg.MetadataValue.json(manifest["inference_transform"]),
            "statistics_version": stats.version, "git_revision": manifest["git_revision"],
            "counts": dg.MetadataValue.json(manifest["counts"]),
            "models": dg.MetadataValue.json(manifest["models"]),
            "sample": dg.MetadataValue.md(markdown_table(sample))}
    if not stats.pretrained:
        meta["model_note"] = UNTRAINED_CLIP_NOTE
    return dg.MaterializeResult(metadata=meta)


EXPORT_VERSION = "1"


@dg.asset(
    description="LLaVA pretraining records (a brief-description prompt + the caption) as JSONL, "
    "each pointing to its transferred embedding in safetensors shards; index and manifest.json.",
    group_name=CORPUS_GROUP,
    kinds={"json", "safetensors"},
    owners=OWNERS,
    tags=stage_tags("export"),
    code_version=EXPORT_VERSION,
)
def pretrain_dataset(context: dg.AssetExecutionContext, config: PretrainExportConfig,
                     io_manager: Storage, expanded_captions: pl.LazyFrame,
                     caption_embeddings: pl.LazyFrame, transferred_embeddings: pl.LazyFrame,
                     modality_statistics: pl.DataFrame) -> dg.MaterializeResult:
    refuse_mispaired("pretrain_dataset", expanded_captions, {
        "caption_embeddings": caption_embeddings, "transferred_embeddings": transferred_embeddings})
    prompts = load_lines(config.prompts)
    digest = hashlib.sha1("\n".join(prompts).encode()).hexdigest()[:12]
    records, dropped = export.drop_duplicate_captions(
        export.pretrain_records(expanded_captions, prompts), expanded_captions)
    return build_export(
        context, io_manager, config, records, transferred_embeddings, modality_statistics,
        models={"caption_llm": distinct(expanded_captions, "model_id")}, duplicates_dropped=dropped,
        captions=expanded_captions,
        prompt_versions={"captions": distinct(expanded_captions, "prompt_version"),
                         "pretrain_prompts": f"{config.prompts}@{digest}"})


@dg.asset(
    description="The Stage 2 instruction conversations as JSONL, each pointing to its caption's "
    "transferred embedding in safetensors shards; index and manifest.json.",
    group_name=CORPUS_GROUP,
    kinds={"json", "safetensors"},
    owners=OWNERS,
    tags=stage_tags("export"),
    code_version=EXPORT_VERSION,
)
def instruct_dataset(context: dg.AssetExecutionContext, config: InstructExportConfig,
                     io_manager: Storage, instructions: pl.LazyFrame,
                     expanded_captions: pl.LazyFrame, caption_embeddings: pl.LazyFrame,
                     transferred_embeddings: pl.LazyFrame,
                     modality_statistics: pl.DataFrame) -> dg.MaterializeResult:
    refuse_mispaired("instruct_dataset", expanded_captions, {
        "instructions": instructions, "caption_embeddings": caption_embeddings,
        "transferred_embeddings": transferred_embeddings})
    kept, dropped = export.drop_duplicate_captions(instructions, expanded_captions)
    task_types = dict(kept.group_by("task_type").len().collect().sort("task_type").iter_rows())
    return build_export(
        context, io_manager, config, export.instruct_records(kept),
        transferred_embeddings, modality_statistics, duplicates_dropped=dropped,
        captions=expanded_captions, task_types=task_types,
        models={"caption_llm": distinct(expanded_captions, "model_id"),
                "instruction_llm": distinct(instructions, "model_id")},
        prompt_versions={"captions": distinct(expanded_captions, "prompt_version"),
                         "instructions": distinct(instructions, "prompt_version")})


def latest_export(context: dg.AssetCheckExecutionContext, io_manager: ParquetIOManager,
                  asset: str) -> export.ExportFolder | None:
    event = context.instance.get_latest_materialization_event(dg.AssetKey(asset))
    if event is None or event.asset_materialization is None:
        return None
    return export_folder(io_manager, event.asset_materialization.metadata["export_dir"].value)


def export_check(asset: str, name: str, rule, description: str) -> dg.AssetChecksDefinition:
    @dg.asset_check(asset=asset, name=name, blocking=True, description=description)
    def _check(context: dg.AssetCheckExecutionContext, io_manager: Storage) -> dg.AssetCheckResult:
        folder = latest_export(context, io_manager, asset)
        return to_result(rule(folder) if folder else Outcome(False, f"{asset} not exported yet"))

    return _check


def export_checks(asset: str) -> list[dg.AssetChecksDefinition]:
    return [
        export_check(asset, "manifest_checksums", export.checksums_match, "every file is listed "
                     "in manifest.json with its size and sha256, and matches it"),
        export_check(asset, "records_resolve", export.records_resolve, "every record id is in "
                     "the index exactly once and points to an existing embedding row"),
    ]


@dg.asset_check(
    asset="transferred_embeddings", name="caption_pairing", blocking=True,
    additional_ins={"expanded_captions": dg.AssetIn("expanded_captions"),
                    "instructions": dg.AssetIn("instructions"),
                    "caption_embeddings": dg.AssetIn("caption_embeddings")},
    description="the exports' inputs pair: every caption embedding, shifted embedding and "
    "instruction record was made from the exact text its caption holds now (caption_sha256), "
    "and every caption has an embedding; a failure names the shards to re-run")
def caption_pairing(context: dg.AssetCheckExecutionContext,
                    transferred_embeddings: pl.LazyFrame, expanded_captions: pl.LazyFrame,
                    instructions: pl.LazyFrame, caption_embeddings: pl.LazyFrame
                    ) -> dg.AssetCheckResult:
    outcome = pairing.outcome(pairing.find_problems(expanded_captions, {
        "caption_embeddings": caption_embeddings, "instructions": instructions,
        "transferred_embeddings": transferred_embeddings}))
    if not outcome.passed:  # in the run log too, so a command-line run shows the fix
        context.log.error(outcome.description)
    return to_result(outcome)


export_assets = [pretrain_dataset, instruct_dataset]
export_asset_checks = [caption_pairing, *export_checks("pretrain_dataset"),
                       *export_checks("instruct_dataset")]
