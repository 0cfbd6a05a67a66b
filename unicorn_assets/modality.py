"""Stage 3: modality representation transfer.

Per shard: `caption_embeddings` (CLIP text embeddings of the expanded captions).
Corpus-wide: `modality_statistics` (the corpus means) -> `transferred_embeddings` (every caption
shifted by ONE statistics version, streamed). The shift is never stored per shard, so no export can
mix shards shifted by different means; see the README's Stage 3 section.
"""

import time
import warnings
from collections.abc import Iterator
from typing import Literal

import dagster as dg
import polars as pl
from PIL import Image
from pydantic import Field

from unicorn_assets.checks import (
    Check,
    by_shard,
    check_specs,
    evaluate,
    frame_check,
    standard_checks,
)
from unicorn_assets.logic import figures, modality, tokens
from unicorn_assets.logic.exports import duplicate_caption_ids
from unicorn_assets.logic.quality import Outcome, schema_matches
from unicorn_assets.metadata import (
    KINDS,
    OWNERS,
    add_shard_metadata,
    as_metadata,
    described_columns,
    frame_metadata,
    markdown_table,
    stage_tags,
    table_schema,
)
from unicorn_assets.partitions import GPU_OP_TAGS, MODEL_RETRY, SHARD_BACKFILL, seed_shards
from unicorn_assets.sharding import split_by_shard
from unicorn_resources.clip import UNTRAINED_CLIP_NOTE, ClipResource
from unicorn_resources.quality_gates import QualityGates

# `backfill_policy` on @asset is marked beta; every per-shard asset shares SHARD_BACKFILL.
warnings.filterwarnings("ignore", message="Parameter `backfill_policy` of function `asset`")

CORPUS_GROUP = "unicorn_corpus"
IMAGE_CHUNK = 256  # reference images opened at a time
REALIGN_SETTLES = 10_000  # ReAlign (arXiv 2602.07026): its statistics settle at about 1e4 samples


def clip_metadata(clip: ClipResource) -> dict:
    meta = {"model_id": clip.model_id, "embedding_dim": clip.embedding_dim,
            "pretrained": clip.is_pretrained, **clip.runtime}
    if not clip.is_pretrained:
        meta["model_note"] = UNTRAINED_CLIP_NOTE
    return meta


STAGE3_VERSION = "1"
EMBEDDING_TYPE = {modality.EMBEDDING: "Array(Float32, embedding_dim)"}
CAPTION_EMBEDDING_COLUMNS = {
    "caption_id": "the caption it embeds (expanded_captions.caption_id)",
    "caption_sha256": "SHA-256 of that caption's text, copied from its row: the pairing key",
    "shard": "the seed shard (partition key)",
    "model_id": "the CLIP model that encoded it",
    modality.EMBEDDING: "the CLIP text embedding: float32, unit L2 norm, the model's width",
}
TRANSFERRED_COLUMNS = {
    "caption_id": "the caption it embeds (expanded_captions.caption_id)",
    "caption_sha256": "SHA-256 of that caption's text: the pairing key",
    "shard": "the seed shard (partition key)",
    "shift_norm": "L2 norm of the method's last step before normalising (u - mu_text for "
                  "mean_shift; + mu_image with mean_shift_to_image_mean; realign's centroid step)",
    "statistics_version": "the modality_statistics version it was shifted with",
    modality.EMBEDDING: "the transferred embedding, float32: v = l2norm(u - mu_text) (mean_shift; "
                        "+ mu_image with mean_shift_to_image_mean), realign's, or u (none)",
}


def _unit_norms(df: pl.DataFrame, q: QualityGates) -> Outcome:
    return modality.norms_in_range(modality.summarise(df), 1 - q.embedding_norm_tolerance,
                                   1 + q.embedding_norm_tolerance)


def caption_embedding_checks(embedding_dim: int, max_text_tokens: int = 0) -> list[Check]:
    """The checks of one shard's embeddings, for a CLIP model of width `embedding_dim` that reads
    `max_text_tokens` tokens of a caption."""
    return [
        *standard_checks("caption_embeddings", schema=modality.CAPTION_EMBEDDING_SCHEMA,
                         id_column="caption_id",
                         required=["caption_id", "caption_sha256", "shard", "model_id"]),
        frame_check("caption_embeddings", "embedding_dimension",
                    lambda df, q: modality.dimension(modality.summarise(df), embedding_dim),
                    blocking=True,
                    description="the embedding width is the CLIP model's embedding dimension"),
        Check("caption_embeddings", "row_alignment", lambda frames, q: modality.row_alignment(
            frames["expanded_captions"]["caption_id"], frames["caption_embeddings"]["caption_id"]),
            blocking=True,
            description="exactly one embedding per expanded caption of the shard, and no other"),
        frame_check("caption_embeddings", "finite",
                    lambda df, q: modality.finite(modality.summarise(df)),
                    blocking=True, description="no NaN or Inf in any embedding"),
        frame_check("caption_embeddings", "norms_in_range", _unit_norms, blocking=True,
                    description="every L2 norm within quality_gates.embedding_norm_tolerance of 1"),
        # Not blocking: a cut caption still has a valid embedding, of its beginning only.
        Check("caption_embeddings", "truncated_share", lambda frames, q: tokens.truncated_share_within(
            frames["caption_tokens"], q.max_truncated_share, max_text_tokens), blocking=False,
            description="at most quality_gates.max_truncated_share of the captions are longer "
                        "than the tokens the text encoder reads (their ends would be cut)"),
    ]


@dg.asset(
    description="CLIP text embedding (float32, unit norm) of every expanded caption of the shard.",
    partitions_def=seed_shards,
    group_name="unicorn_stage3",
    kinds=KINDS,
    owners=OWNERS,
    tags=stage_tags("3"),
    code_version=STAGE3_VERSION,
    metadata=described_columns({**modality.CAPTION_EMBEDDING_SCHEMA, **EMBEDDING_TYPE},
                               CAPTION_EMBEDDING_COLUMNS),
    check_specs=check_specs(caption_embedding_checks(0)),
    backfill_policy=SHARD_BACKFILL,
    pool="gpu",
    op_tags=GPU_OP_TAGS,
    retry_policy=MODEL_RETRY,
)
def caption_embeddings(context: dg.AssetExecutionContext, clip: ClipResource,
                       quality_gates: QualityGates, expanded_captions: pl.DataFrame
                       ) -> Iterator[dg.Output | dg.AssetCheckResult]:
    texts = expanded_captions["caption"].to_list()
    token_counts = tokens.token_frame(expanded_captions["caption_id"].to_list(),
                                      clip.count_tokens(texts), clip.max_text_tokens)
    started = time.perf_counter()
    vectors = clip.encode_text(texts)
    seconds = time.perf_counter() - started
    frame = modality.caption_embeddings_frame(expanded_captions, vectors, clip.model_id)
    context.log.info(f"{frame.height} captions encoded in {seconds:.1f}s by {clip.model_id}")
    frames = split_by_shard(frame, context.partition_keys)
    counted = split_by_shard(token_counts.with_columns(expanded_captions["shard"]),
                             context.partition_keys)
    add_shard_metadata(context, "caption_embeddings", lambda key: {
        **frame_metadata(frames[key], ["caption_id", "shard", "model_id"],
                         CAPTION_EMBEDDING_COLUMNS),
        **as_metadata(figures.embedding_figures(frames[key], counted[key]))})
    yield dg.Output(frames, metadata={
        "shards_in_run": len(frames), "encode_seconds": round(seconds, 3),
        "embeddings_per_second": round(frame.height / seconds, 1) if seconds > 0 else 0.0,
        **clip_metadata(clip)})
    captions = split_by_shard(expanded_captions, context.partition_keys)
    yield from evaluate(caption_embedding_checks(clip.embedding_dim, clip.max_text_tokens),
                        by_shard(context.partition_keys, caption_embeddings=frames,
                                 expanded_captions=captions, caption_tokens=counted),
                        quality_gates)


# --- corpus-wide -------------------------------------------------------------------------------

class TransferConfig(dg.Config):
    method: Literal["mean_shift", "mean_shift_to_image_mean", "realign", "none"] = Field(
        modality.DEFAULT_METHOD, description="mean_shift (the Unicorn paper's): v = l2norm(u - "
        "mu_text), real images centred by their own mean at inference; mean_shift_to_image_mean "
        "(ours, needs reference_images): v = l2norm(u - mu_text + mu_image); realign (ReAlign, "
        "arXiv 2602.07026, needs reference_images): anchor, trace (scale by sqrt(tr Sigma_image / "
        "tr Sigma_text)) and centroid steps; none: the raw text embedding. With all but mean_shift "
        "real images are used as they are. Part of the statistics version: changing the method or "
        "its parameters marks the shift stale")


class ModalityConfig(dg.Config):
    reference_images: str | None = Field(
        None, description="a folder of real images: their mean CLIP embedding and covariance "
        "trace (same encoder and normalisation) are computed; the mean is shipped in the exports "
        "for the inference transform, whatever the method; needed by mean_shift_to_image_mean and "
        "realign; null: none")
    transfer: TransferConfig = Field(default_factory=TransferConfig)


def image_summary(clip: ClipResource, folder: str) -> tuple[modality.EmbeddingSummary, int]:
    paths = modality.reference_images(folder)
    summary = modality.EmbeddingSummary()
    for start in range(0, len(paths), IMAGE_CHUNK):
        images = []
        for path in paths[start : start + IMAGE_CHUNK]:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))  # decoded now; the file closes here
        summary.add(clip.encode_images(images))
    return summary, len(paths)


STATISTICS_SCHEMA = pl.Schema({
    "statistics_version": pl.String, "model_id": pl.String, "pretrained": pl.Boolean,
    "count": pl.Int64, "dim": pl.Int64, "shards": pl.Int64, "image_count": pl.Int64,
    "method": pl.String, "duplicates": pl.Int64, "trace_text": pl.Float64,
    "trace_image": pl.Float64})
modality_statistics_checks = [
    *standard_checks("modality_statistics", schema=STATISTICS_SCHEMA,
                     id_column="statistics_version",
                     required=["statistics_version", "model_id", "mu_text"]),
    frame_check("modality_statistics", "means_finite", lambda df, q: modality.statistics_valid(df),
                blocking=True, description="the means are finite, over at least one caption, with "
                "the stored dimension, and the stored version matches their content"),
]


@dg.asset(
    description="Corpus-wide mean and covariance trace of the caption embeddings over every shard "
    "(one streamed pass; each exported caption text once), count, dimension, model, the transfer "
    "method and its parameters (realign: its drift, a second streamed pass), an optional "
    "reference-image mean and trace, and a version hash of all of it.",
    group_name=CORPUS_GROUP,
    kinds=KINDS,
    owners=OWNERS,
    tags=stage_tags("3"),
    code_version=STAGE3_VERSION,
    check_specs=check_specs(modality_statistics_checks, partitions_def=None),
    pool="gpu",
    op_tags=GPU_OP_TAGS,
    retry_policy=MODEL_RETRY,
)
def modality_statistics(context: dg.AssetExecutionContext, config: ModalityConfig,
                        clip: ClipResource, quality_gates: QualityGates,
                        caption_embeddings: pl.LazyFrame, expanded_captions: pl.LazyFrame
                        ) -> Iterator[dg.Output | dg.AssetCheckResult]:
    method = config.transfer.method
    if method in modality.NEEDS_IMAGES and not config.reference_images:
        # a setting to fix, not a transient failure: no retry
        raise dg.Failure(f"transfer method {method} needs reference images (their mean"
                         f"{' and covariance trace' if method == 'realign' else ''}): set "
                         "ops.modality_statistics.config.reference_images to a folder of real "
                         "images, or use transfer.method mean_shift (the paper's)",
                         allow_retries=False)
    # the exports leave out a caption whose exact text an earlier shard has: so does the mean
    duplicates = duplicate_caption_ids(expanded_captions)
    text, shards = modality.text_statistics(caption_embeddings, exclude=duplicates)
    (model_id,) = text.tags
    if model_id != clip.model_id:
        raise ValueError(f"caption_embeddings were made by {model_id}, but the clip resource is "
                         f"{clip.model_id}: re-materialise caption_embeddings for every shard")
    mu_image, trace_image, image_count, drift = None, None, 0, None
    if config.reference_images:
        images, image_count = image_summary(clip, config.reference_images)
        if images.dim != text.dim:
            raise ValueError(f"the reference images embed to {images.dim} dimensions, the captions "
                             f"to {text.dim}: encode both with one CLIP model (re-materialise "
                             "caption_embeddings with the clip resource)")
        mu_image, trace_image = images.mean, images.trace
    if method == "realign":  # its centroid step needs the mean of its trace step: a second pass
        drift = modality.realign_drift(caption_embeddings, text.mean, mu_image,
                                       modality.realign_scale(text.trace, trace_image),
                                       exclude=duplicates)
        if image_count < REALIGN_SETTLES:
            context.log.warning(f"realign's image statistics come from {image_count} reference "
                                f"images; ReAlign reports they settle at about {REALIGN_SETTLES}")
    stats = modality.ModalityStatistics(
        model_id=model_id, pretrained=clip.is_pretrained, count=text.count, dim=text.dim,
        mu_text=text.mean, shards=shards, image_count=image_count, mu_image=mu_image,
        image_source=config.reference_images, method=method, duplicates=len(duplicates),
        trace_text=text.trace, trace_image=trace_image, drift=drift)
    context.log.info(f"statistics {stats.version} ({method}): {stats.count} captions over "
                     f"{shards} shard(s), {len(duplicates)} duplicate(s) left out"
                     + (f", {image_count} reference images" if image_count else ""))
    frame = stats.to_frame()
    yield dg.Output(frame, metadata=frame_metadata(
        frame, ["statistics_version", "model_id", "method", "count", "duplicates", "dim", "shards",
                "image_count"],
        statistics_version=stats.version, transfer=stats.parameters(),
        inference_transform=dg.MetadataValue.json(stats.inference_transform()),
        **({} if stats.pretrained else {"model_note": UNTRAINED_CLIP_NOTE})))
    yield from evaluate(modality_statistics_checks, {"": {"modality_statistics": frame}},
                        quality_gates)


@dg.asset(
    description="Every caption embedding moved toward the image modality by transfer.method: "
    "v = l2norm(u - mu_text) (the paper's; + mu_image with mean_shift_to_image_mean), realign's "
    "anchor, trace and centroid steps, or none; all rows with ONE statistics version, streamed to "
    "Parquet.",
    group_name=CORPUS_GROUP,
    kinds=KINDS,
    owners=OWNERS,
    tags=stage_tags("3"),
    code_version=STAGE3_VERSION,
    metadata=described_columns({**modality.TRANSFERRED_SCHEMA, **EMBEDDING_TYPE},
                               TRANSFERRED_COLUMNS),
)
def transferred_embeddings(caption_embeddings: pl.LazyFrame,
                           modality_statistics: pl.DataFrame) -> dg.Output:
    stats = modality.ModalityStatistics.from_frame(modality_statistics)
    shifted = modality.transfer(caption_embeddings, stats)
    rows = caption_embeddings.select(pl.len()).collect().item()
    sample = shifted.drop(modality.EMBEDDING).head(5).collect()
    meta = {"dagster/row_count": rows,
            "dagster/column_schema": table_schema(shifted.collect_schema(), TRANSFERRED_COLUMNS),
            "sample": dg.MetadataValue.md(markdown_table(sample)),
            "formula": stats.formula, "statistics_version": stats.version,
            "transfer": dg.MetadataValue.json(stats.parameters())}
    if not stats.pretrained:
        meta["model_note"] = UNTRAINED_CLIP_NOTE
    return dg.Output(shifted, metadata=meta)  # the IO manager streams the lazy frame to Parquet


TRANSFER_CHECKS = {
    "schema": "columns and types are the expected ones",
    "embedding_dimension": "the embedding width is the statistics' dimension",
    "finite": "no NaN or Inf in any shifted embedding",
    "norms_in_range": "every L2 norm within quality_gates.embedding_norm_tolerance of 1",
    "shifted_mean": "the mean of the shifted, unnormalised embeddings (v * shift_norm) over the "
                    "exported captions is 0 (mean_shift), mu_image (mean_shift_to_image_mean, "
                    "realign) or mu_text (none), within quality_gates.transfer_mean_tolerance",
    "single_statistics_version": "every row was shifted with the current modality_statistics, "
                                 "and they cover every caption",
    "unique_ids": "caption_id is unique",
}


@dg.multi_asset_check(
    specs=[dg.AssetCheckSpec(name, asset="transferred_embeddings", blocking=True, description=text,
                             additional_deps=["modality_statistics", "expanded_captions"])
           for name, text in TRANSFER_CHECKS.items()],
    ins={"transferred_embeddings": dg.AssetIn("transferred_embeddings"),
         "modality_statistics": dg.AssetIn("modality_statistics"),
         "expanded_captions": dg.AssetIn("expanded_captions")},
    description="One streamed pass over the shifted embeddings feeds every check.",
)
def transferred_embeddings_checks(quality_gates: QualityGates,
                                  transferred_embeddings: pl.LazyFrame,
                                  modality_statistics: pl.DataFrame,
                                  expanded_captions: pl.LazyFrame
                                  ) -> Iterator[dg.AssetCheckResult]:
    stats = modality.ModalityStatistics.from_frame(modality_statistics)
    summary = modality.summarise(transferred_embeddings, weight="shift_norm",
                                 tag="statistics_version")
    # the mean is taken over the exported captions: duplicates of an earlier shard's text left out
    duplicates = duplicate_caption_ids(expanded_captions)
    exported = (transferred_embeddings.filter(~pl.col("caption_id").is_in(duplicates.implode()))
                if len(duplicates) else transferred_embeddings)
    in_mean = modality.summarise(exported, weight="shift_norm") if len(duplicates) else summary
    tol = quality_gates.embedding_norm_tolerance
    distinct = transferred_embeddings.select(pl.col("caption_id").n_unique()).collect().item()
    outcomes = {
        "schema": schema_matches(transferred_embeddings.collect_schema(), pl.Schema({
            **modality.TRANSFERRED_SCHEMA, modality.EMBEDDING: modality.embedding_dtype(stats.dim)})),
        "embedding_dimension": modality.dimension(summary, stats.dim),
        "finite": modality.finite(summary),
        "norms_in_range": modality.norms_in_range(summary, 1 - tol, 1 + tol),
        "shifted_mean": modality.shifted_mean(in_mean, stats, quality_gates.transfer_mean_tolerance)
        if in_mean.count > in_mean.nonfinite_rows else Outcome(False, "no finite rows"),
        "single_statistics_version": modality.single_version(summary, stats),
        "unique_ids": Outcome(distinct == summary.count,
                              f"{summary.count - distinct} duplicate caption_id(s)"),
    }
    for name, outcome in outcomes.items():
        yield dg.AssetCheckResult(check_name=name, asset_key=dg.AssetKey("transferred_embeddings"),
                                  passed=outcome.passed, description=outcome.description,
                                  metadata=as_metadata(outcome.metadata))


stage3_assets = [caption_embeddings, modality_statistics, transferred_embeddings]
# The shifted embeddings are streamed to storage, never held in memory: their checks read the
# stored file in one streamed pass, as a separate step.
stage3_checks = [transferred_embeddings_checks]
