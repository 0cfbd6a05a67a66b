"""The SynthVLM branch (asset group `synthvlm`, off the nightly job): render expanded captions into
images with SDXL, score them by CLIP similarity and encoder-resize SSIM, keep the best, export
LLaVA data. Scores are named by their scale (see unicorn_assets/logic/synthvlm.py): the ranking
uses the paper's clip_cosine_clipped + lambda * ssim; CLIPScore (x2.5) is reported beside it.

Per shard: `synthvlm_candidates` -> `synthetic_images` (files under the storage base) -> `image_scores`.
Corpus-wide: `synthvlm_selection` -> `synthvlm_dataset` (an export folder with its manifest).
"""

import json
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import dagster as dg
import polars as pl
from PIL import Image
from pydantic import Field

from unicorn_assets import checks
from unicorn_assets.checks import frame_check, standard_checks, to_result
from unicorn_assets.expansion import llm_metadata
from unicorn_assets.logic import images as img
from unicorn_assets.logic import synthvlm as logic
from unicorn_assets.logic.exports import drop_duplicate_captions
from unicorn_assets.logic.prompts import load_lines, load_prompt_set
from unicorn_assets.logic.quality import Outcome
from unicorn_assets.logic.text import caption_sha256_series, excerpt, stable_int
from unicorn_assets.metadata import (
    OWNERS,
    add_shard_metadata,
    frame_metadata,
    markdown_table,
    stage_tags,
)
from unicorn_assets.partitions import GPU_OP_TAGS, MODEL_RETRY, SHARD_BACKFILL, seed_shards
from unicorn_assets.sharding import split_by_shard
from unicorn_resources.clip import UNTRAINED_CLIP_NOTE, ClipResource
from unicorn_resources.diffusion import UNTRAINED_NOTE, DiffusionResource
from unicorn_resources.llm import ChatRequest, LLMResource, SamplingParams
from unicorn_resources.quality_gates import QualityGates
from unicorn_resources.storage import (
    ChecksumMismatch,
    ParquetIOManager,
    copy_file,
    file_sha256,
    join,
    partition_path,
    read_bytes,
    write_bytes,
)

GROUP = "synthvlm"
# Files (images, exports) go under the IO manager's storage base, local or s3://.
Storage = dg.ResourceParam[ParquetIOManager]
EXPORT_SCHEMA = pl.Schema({"id": pl.String, "image": pl.String, "caption": pl.String,
                           "prompt": pl.String, "shard": pl.String,
                           "weighted_score": pl.Float64, "clip_cosine_clipped": pl.Float64,
                           "clipscore_x2_5": pl.Float64, "ssim": pl.Float64,
                           "sha256": pl.String})
# Owners, stage tag and code version of every SynthVLM asset (2: scores on the paper's scale,
# columns named by their scale, duplicate captions dropped before top-K).
ASSET_META = {"owners": OWNERS, "tags": stage_tags("synthvlm"), "code_version": "2"}

# Each asset's checks, evaluated inside it on the frames it just built. Those that verify the
# stored files (files_decode, records_resolve) stay separate steps: see the end of this module.
CANDIDATE_CHECKS = standard_checks(
    "synthvlm_candidates", schema=logic.CANDIDATE_SCHEMA, id_column="caption_id",
    required=["caption_id", "caption", "caption_quality"])
IMAGE_CHECKS = standard_checks(
    "synthetic_images", schema=logic.IMAGE_SCHEMA, id_column="image_id",
    required=["image_id", "caption_id", "uri", "sha256", "seed"])
SCORE_CHECKS = [
    *standard_checks("image_scores", schema=logic.SCORE_SCHEMA, id_column="image_id",
                     required=["image_id", "clip_cosine_clipped", "ssim"]),
    frame_check("image_scores", "no_nan_scores", lambda df, q: logic.no_nan_scores(df),
                blocking=True, description="no NaN or missing cosine, clipped cosine, CLIPScore "
                "or SSIM"),
    frame_check("image_scores", "score_ranges",
                lambda df, q: logic.score_ranges(df, q.synthvlm_min_median_clip_cosine_clipped),
                blocking=True, description="cosine and SSIM in [-1, 1], clip_cosine_clipped = "
                "max(cos, 0), clipscore_x2_5 = 2.5 * clip_cosine_clipped, and the median "
                "clip_cosine_clipped over quality_gates.synthvlm_min_median_clip_cosine_clipped"),
    checks.Check("image_scores", "every_image_scored", lambda frames, q: logic.scores_cover_images(
        frames["image_scores"], frames["synthetic_images"]), blocking=True,
        description="the scores cover exactly the shard's images"),
]
SELECTION_CHECKS = [
    *standard_checks("synthvlm_selection", schema=logic.SELECTION_SCHEMA, id_column="image_id",
                     required=["image_id", "weighted_score", "uri"]),
    frame_check("synthvlm_selection", "selection_ratio", lambda df, q: logic.selection_ratio(df),
                blocking=True, description="one best image per caption, as many selected as the "
                "configured top fraction / top K of the distinct captions gives, no caption text "
                "selected twice"),
    frame_check("synthvlm_selection", "no_nan_scores",
                lambda df, q: logic.no_nan_scores(df, ("clip_cosine_clipped", "ssim",
                                                       "weighted_score")),
                blocking=True, description="no NaN or missing score"),
]
DATASET_CHECKS = standard_checks("synthvlm_dataset", schema=EXPORT_SCHEMA, id_column="id",
                                 required=["id", "image", "caption"])


def storage_uri(io_manager: ParquetIOManager, *parts: str) -> str:
    """A URI under the storage base; a local base is made absolute so the URI works anywhere."""
    base = io_manager.base_uri
    if "://" not in base:
        base = str(Path(base).resolve())
    return join(base, *parts)


def file_reader(io_manager: ParquetIOManager) -> Callable[[str], bytes | None]:
    def read(uri: str) -> bytes | None:
        fs, path = io_manager.s3.fs(uri)
        return read_bytes(fs, path) if fs.exists(path) else None

    return read


def file_digest(io_manager: ParquetIOManager) -> Callable[[str], str | None]:
    """SHA-256 of the file at a URI, hashed as it streams (None when it does not exist)."""
    def digest(uri: str) -> str | None:
        fs, path = io_manager.s3.fs(uri)
        return file_sha256(fs, path)[0] if fs.exists(path) else None

    return digest


def remove_orphans(io_manager: ParquetIOManager, folder: str, keep: Collection[str]) -> int:
    """Delete every file under `folder` whose name (relative to `folder`) is not in `keep`; call
    it once the files to keep are written, so that a crash before it loses nothing. Returns how
    many it deleted."""
    fs, root = io_manager.s3.fs(folder)
    kept = {join(root, name) for name in keep}
    removed = 0
    if fs.exists(root):
        for path in fs.find(root):
            if path not in kept:
                fs.rm(path)
                removed += 1
    return removed


def replace_folder(io_manager: ParquetIOManager, folder: str, files: Mapping[str, bytes]) -> None:
    """Write `files` (name -> bytes, names relative to `folder`) atomically, then delete every other
    file under `folder`: a re-run replaces the folder's contents and leaves no orphan behind. For a
    few small files; images are written one by one as they are made (see synthetic_images)."""
    fs, root = io_manager.s3.fs(folder)
    for name, data in files.items():
        write_bytes(fs, join(root, name), data)
    remove_orphans(io_manager, folder, files)


# --- synthvlm_candidates -------------------------------------------------------------------------

class CandidateConfig(dg.Config):
    length_filter: bool = True
    min_words: int = 8
    max_words: int = 150
    repetition_filter: bool = True
    max_repeated_trigram_ratio: float = 0.2
    special_char_filter: bool = True
    max_special_char_ratio: float = 0.05
    llm_judge: bool = True
    prompt: str = "synthvlm_judge"  # the judge's versioned prompt (named so staleness sees it)
    prompt_version: str = "v1"
    judge_max_tokens: int = 16
    quality_top_fraction: float | None = None  # e.g. 0.5: render only the better half by quality

    def rules(self) -> logic.CandidateRules:
        return logic.CandidateRules(
            length_filter=self.length_filter, min_words=self.min_words, max_words=self.max_words,
            repetition_filter=self.repetition_filter,
            max_repeated_trigram_ratio=self.max_repeated_trigram_ratio,
            special_char_filter=self.special_char_filter,
            max_special_char_ratio=self.max_special_char_ratio,
            quality_top_fraction=self.quality_top_fraction)


def judge(llm: LLMResource, config: CandidateConfig, frame: pl.DataFrame
          ) -> tuple[pl.DataFrame, dict]:
    """Asks the LLM, for every caption that passed the rules, whether it can guide a renderer."""
    prompts = load_prompt_set(config.prompt, config.prompt_version)
    open_rows = frame.filter(pl.col("reason").is_null())
    schema = logic.JUDGE_SCHEMA if llm.supports_json_schema else None
    requests = [ChatRequest.of(prompts.messages(caption=caption),
                               seed=stable_int("synthvlm-judge", caption_id), json_schema=schema)
                for caption_id, caption in open_rows.select("caption_id", "caption").iter_rows()]
    params = SamplingParams(temperature=0.0, top_p=1.0, max_tokens=config.judge_max_tokens,
                            repeat_penalty=1.0)
    started = time.perf_counter()
    completions = llm.generate(requests, params) if requests else []
    seconds = time.perf_counter() - started
    judged = logic.apply_judgements(frame, [logic.parse_judgement(c.text) for c in completions])
    return judged, {"judge_prompt": prompts.ref,
                    **{f"judge_{k}": v for k, v in llm_metadata(llm, completions, seconds).items()}}


@dg.asset(
    description="Expanded captions chosen for rendering: SynthVLM's rule filters (length, "
    "repetition, special characters), the LLM's yes/no judgement of descriptiveness, and an "
    "optional top-fraction cap by caption quality; each step can be switched off.",
    partitions_def=seed_shards, group_name=GROUP, backfill_policy=SHARD_BACKFILL, pool="gpu",
    kinds={"polars", "parquet"}, retry_policy=MODEL_RETRY, **ASSET_META,
    check_specs=checks.check_specs(CANDIDATE_CHECKS),
)
def synthvlm_candidates(context: dg.AssetExecutionContext, config: CandidateConfig,
                        llm: LLMResource, quality_gates: QualityGates,
                        expanded_captions: pl.DataFrame) -> Iterator[dg.Output | dg.AssetCheckResult]:
    rules = config.rules()
    frame = logic.rule_reasons(logic.caption_features(expanded_captions), rules)
    judge_meta: dict = {"llm_judge": config.llm_judge}
    if config.llm_judge:
        frame, extra = judge(llm, config, frame)
        judge_meta.update(extra)
    by_shard, rejects = {}, {}
    for key, shard in split_by_shard(frame, context.partition_keys).items():
        # the cap is per shard, so a shard's candidates never depend on the run it was part of
        by_shard[key], rejects[key] = logic.split_candidates(
            logic.cap_by_quality(shard, rules.quality_top_fraction))
        context.log.info(f"{key}: {by_shard[key].height} caption(s) to render")
    add_shard_metadata(context, "synthvlm_candidates", lambda key: frame_metadata(
        by_shard[key], ["caption_id", "caption_quality", "judgement", "caption"],
        captions_in=expanded_captions.filter(pl.col("shard") == key).height,
        rejects_by_reason=logic.reason_counts(rejects[key]),
        rejected_sample=dg.MetadataValue.md(_rejects_markdown(rejects[key]))))
    yield dg.Output(by_shard, metadata={"shards_in_run": len(by_shard), **judge_meta})
    yield from checks.evaluate(CANDIDATE_CHECKS, checks.by_shard(
        context.partition_keys, synthvlm_candidates=by_shard), quality_gates)


def _rejects_markdown(rejected: pl.DataFrame) -> str:
    return markdown_table(rejected.with_columns(pl.col("caption").map_elements(
        lambda t: excerpt(t, 120), return_dtype=pl.String)), ["reason", "caption"]) \
        if rejected.height else "_none rejected_"


# --- synthetic_images ----------------------------------------------------------------------------

class RenderConfig(dg.Config):
    # N of best-of-N; ours 2 for CPU demos; the public SynthVLM code renders 5 (the gpu profile)
    images_per_caption: int = Field(2, ge=1, le=64)
    image_format: Literal["png", "webp"] = "png"  # WebP is written lossless
    chunk_size: int = 32  # images rendered per step; each is written as soon as it is encoded
    folder: str = "synthetic_images"  # under the storage base: <folder>/<shard>/<image_id>.<ext>
    # keep an image already on disk from the same model, settings, caption and seed (its file
    # checked against the SHA-256 recorded when it was written): a re-run after a crash renders
    # only what is missing
    reuse_finished: bool = True


# Beside each image file, once the file is whole, a record of how it was made (its row as JSON):
# <folder>/.renders/<shard>/<image_id>.json. A later run keeps the image when the record matches
# its plan on every field that decides the picture and the file still has the recorded SHA-256.
RENDER_RECORDS = ".renders"
RENDER_KEY = ("image_id", "caption", "seed", "uri", "format", "model_id", "pretrained",
              "render_settings")
RENDER_RESULT = ("width", "height", "n_bytes", "sha256")


def finished_render(io_manager: ParquetIOManager, record_uri: str, planned: dict) -> dict | None:
    """`planned` completed from the record of an earlier render of the same picture, or None when
    there is none, it was made differently, or the file is gone or differs from its record."""
    fs, path = io_manager.s3.fs(record_uri)
    if not fs.exists(path):
        return None
    try:
        record = json.loads(read_bytes(fs, path))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or any(record.get(k) != planned[k] for k in RENDER_KEY) \
            or any(k not in record for k in RENDER_RESULT):
        return None
    image_fs, image_path = io_manager.s3.fs(planned["uri"])
    if not image_fs.exists(image_path) \
            or file_sha256(image_fs, image_path) != (record["sha256"], record["n_bytes"]):
        return None
    return {**planned, **{k: record[k] for k in RENDER_RESULT}}


def write_image(io_manager: ParquetIOManager, record_uri: str, planned: dict,
                image: Image.Image) -> dict:
    """Encode and write one image (atomically), then its render record; returns its row."""
    data = img.encode_image(image, planned["format"])
    row = {**planned, "width": image.width, "height": image.height, "n_bytes": len(data),
           "sha256": img.sha256(data)}
    fs, path = io_manager.s3.fs(planned["uri"])
    write_bytes(fs, path, data)  # the file first: a record always describes a whole file
    fs, path = io_manager.s3.fs(record_uri)
    write_bytes(fs, path, json.dumps(row).encode())
    return row


@dg.asset(
    description="Images rendered from the candidates (N per caption, deterministic seeds), stored "
    "as PNG/WebP files under the storage base; the table holds paths, seeds, sizes and SHA-256.",
    partitions_def=seed_shards, group_name=GROUP, backfill_policy=SHARD_BACKFILL, pool="gpu",
    kinds={"polars", "parquet", "diffusers"}, retry_policy=MODEL_RETRY, op_tags=GPU_OP_TAGS,
    **ASSET_META, check_specs=checks.check_specs(IMAGE_CHECKS),
)
def synthetic_images(context: dg.AssetExecutionContext, config: RenderConfig,
                     diffusion: DiffusionResource, io_manager: Storage, quality_gates: QualityGates,
                     synthvlm_candidates: pl.DataFrame
                     ) -> Iterator[dg.Output | dg.AssetCheckResult]:
    plan = logic.plan_renders(synthvlm_candidates, config.images_per_caption)
    settings = json.dumps(diffusion.settings(), sort_keys=True)
    lineage = {"model_id": diffusion.model_id, "pretrained": diffusion.is_pretrained,
               "render_settings": settings}
    out: dict[str, pl.DataFrame] = {}
    thumbs: list[tuple[Image.Image, str]] = []
    reused = 0
    started = time.perf_counter()
    for key, shard_plan in split_by_shard(plan, context.partition_keys).items():
        folder = partition_path(storage_uri(io_manager, config.folder), key)  # the key gate
        records = partition_path(storage_uri(io_manager, config.folder, RENDER_RECORDS), key)
        rows, kept = [], 0
        # Each image is written as soon as it is encoded, so memory holds one chunk and a crash
        # keeps every finished image; the shard's orphans go only once all its images are written.
        for chunk in shard_plan.iter_slices(config.chunk_size):
            planned = [{**row, "uri": join(folder, f"{row['image_id']}.{config.image_format}"),
                        "format": config.image_format, **lineage}
                       for row in chunk.iter_rows(named=True)]
            found = [finished_render(io_manager, join(records, f"{row['image_id']}.json"), row)
                     if config.reuse_finished else None for row in planned]
            todo = [row for row, done in zip(planned, found) if done is None]
            made = diffusion.render([row["caption"] for row in todo],
                                    [row["seed"] for row in todo]) if todo else []
            if len(made) != len(todo):
                raise RuntimeError(f"{diffusion.model_id} returned {len(made)} image(s) for "
                                   f"{len(todo)} prompt(s); every prompt needs its image")
            images = dict(zip((row["image_id"] for row in todo), made))
            del made
            for row, done in zip(planned, found):
                if done is None:
                    image = images.pop(row["image_id"])
                    done = write_image(io_manager, join(records, f"{row['image_id']}.json"), row,
                                       image)
                else:
                    kept += 1
                    image = _stored_image(io_manager, row["uri"]) if len(thumbs) < 4 else None
                rows.append({name: done[name] for name in logic.IMAGE_SCHEMA})
                if image is not None and len(thumbs) < 4:
                    thumbs.append((image, row["caption"]))
        names = [row["uri"].rsplit("/", 1)[1] for row in rows]
        removed = remove_orphans(io_manager, folder, names)
        remove_orphans(io_manager, records, [f"{row['image_id']}.json" for row in rows])
        out[key] = pl.DataFrame(rows, schema=logic.IMAGE_SCHEMA)
        reused += kept
        context.log.info(f"{key}: {len(rows)} image(s) under {folder}: {len(rows) - kept} "
                         f"rendered, {kept} kept from an earlier run with the same model, "
                         f"settings and seed; {removed} file(s) of older renders removed")
    seconds = time.perf_counter() - started
    rendered = sum(frame.height for frame in out.values()) - reused
    meta = {"shards_in_run": len(out), "diffusion_model": diffusion.model_id,
            "render_settings": dg.MetadataValue.json(json.loads(settings)),
            "images_per_caption": config.images_per_caption, "render_seconds": round(seconds, 2),
            "images_rendered": rendered, "images_reused": reused,
            "images_per_second": round(rendered / seconds, 3) if seconds > 0 else 0.0,
            "image_folder": dg.MetadataValue.path(storage_uri(io_manager, config.folder)),
            "examples": dg.MetadataValue.md(_thumbnail_table(
                [(i, caption, {}) for i, caption in thumbs]))}
    if not diffusion.is_pretrained:
        meta["model_note"] = UNTRAINED_NOTE
    # How many captions SDXL's 77-token text encoders cut: the renderer never sees their tail.
    tokens = token_table(synthvlm_candidates, diffusion.prompt_token_counts)
    meta.update(truncation_metadata("sdxl_prompt", tokens))
    add_shard_metadata(context, "synthetic_images", lambda key: frame_metadata(
        out[key], ["image_id", "image_index", "seed", "uri"],
        **truncation_metadata("sdxl_prompt", tokens.filter(pl.col("shard") == key))))
    yield dg.Output(out, metadata=meta)
    yield from checks.evaluate(IMAGE_CHECKS, checks.by_shard(
        context.partition_keys, synthetic_images=out), quality_gates)


def token_table(captions: pl.DataFrame,
                count: Callable[[list[str]], Mapping[str, tuple[list[int], int]]]) -> pl.DataFrame:
    """One row per distinct caption (by caption_id) and text encoder: its shard, the encoder, the
    caption's token count and the encoder's maximum. `count(texts)` gives, per encoder, (token
    counts, maximum), as DiffusionResource.prompt_token_counts does."""
    schema = {"shard": pl.String, "encoder": pl.String, "tokens": pl.Int64, "max_tokens": pl.Int64}
    distinct = captions.unique("caption_id", keep="first", maintain_order=True)
    if distinct.is_empty():
        return pl.DataFrame(schema=schema)
    shards = distinct["shard"].to_list()
    frames = [pl.DataFrame({"shard": shards, "encoder": [name] * len(counts), "tokens": counts,
                            "max_tokens": [limit] * len(counts)}, schema=schema)
              for name, (counts, limit) in count(distinct["caption"].to_list()).items()]
    return pl.concat(frames) if frames else pl.DataFrame(schema=schema)


def truncation_metadata(prefix: str, tokens: pl.DataFrame) -> dict:
    """`<prefix>_truncation`: per encoder, the share of captions it truncates and the token-count
    distribution; `<prefix>_truncated_share`: the largest of those shares (a number the UI plots
    over materialisations). Nothing when the backend cannot count tokens."""
    if tokens.is_empty():
        return {}
    per_encoder = {name: logic.truncation(group["tokens"].to_list(), int(group["max_tokens"][0]))
                   for (name,), group in tokens.group_by("encoder", maintain_order=True)}
    return {f"{prefix}_truncation": dg.MetadataValue.json(per_encoder),
            f"{prefix}_truncated_share": max(v["truncated_share"] for v in per_encoder.values())}


def _stored_image(io_manager: ParquetIOManager, uri: str) -> Image.Image:
    fs, path = io_manager.s3.fs(uri)
    return img.decode_image(read_bytes(fs, path))


def _thumbnail_table(rows: Sequence[tuple[Image.Image, str, dict]]) -> str:
    """Markdown table: thumbnail (a data: URI PNG), caption excerpt, then the given columns."""
    if not rows:
        return "_no images_"
    extra = list(rows[0][2])
    lines = ["| image | caption | " + " | ".join(extra) + " |",
             "|---|---|" + "---|" * len(extra)]
    for image, caption, values in rows:
        cells = [f"![]({img.thumbnail_data_uri(image)})",
                 excerpt(caption, 100).replace("|", "/")] + [str(values[k]) for k in extra]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


@dg.asset_check(asset="synthetic_images", name="files_decode", blocking=True,
                partitions_def=seed_shards,
                description="every image file exists, matches its SHA-256 and decodes at the "
                "configured resolution")
def synthetic_images_files_decode(io_manager: Storage, synthetic_images: pl.DataFrame
                                  ) -> dg.AssetCheckResult:
    return to_result(logic.verify_image_files(synthetic_images, file_reader(io_manager)))


# --- image_scores --------------------------------------------------------------------------------

class ScoreConfig(dg.Config):
    prompt_prefix: str = logic.CLIPSCORE_PREFIX
    ssim_size: int | None = None  # None: the CLIP encoder's input size (336 for ViT-L-14-336)
    chunk_size: int = 64  # images decoded and scored at a time


@dg.asset(
    description="Per image, with the CLIP resource: the cosine, the paper's clipped cosine "
    "max(cos, 0) and CLIPScore 2.5 * max(cos, 0); and SSIM between the image and its round trip "
    "through the vision encoder's resize.",
    partitions_def=seed_shards, group_name=GROUP, backfill_policy=SHARD_BACKFILL, pool="gpu",
    kinds={"polars", "parquet"}, retry_policy=MODEL_RETRY, op_tags=GPU_OP_TAGS, **ASSET_META,
    check_specs=checks.check_specs(SCORE_CHECKS),
)
def image_scores(context: dg.AssetExecutionContext, config: ScoreConfig, clip: ClipResource,
                 io_manager: Storage, quality_gates: QualityGates,
                 synthetic_images: pl.DataFrame) -> Iterator[dg.Output | dg.AssetCheckResult]:
    ssim_size = config.ssim_size or clip.image_size
    read = file_reader(io_manager)
    out: dict[str, pl.DataFrame] = {}
    started = time.perf_counter()
    for key, shard in split_by_shard(synthetic_images, context.partition_keys).items():
        parts = []
        for chunk in shard.iter_slices(config.chunk_size):
            images, digests = [], []
            for uri in chunk["uri"]:
                data = read(uri)
                if data is None:
                    raise FileNotFoundError(f"{uri}: image file of shard {key} is missing; "
                                            "re-materialise synthetic_images for this shard")
                images.append(img.decode_image(data))
                digests.append(img.sha256(data))  # of the bytes scored, not the row's claim
            texts = logic.clipscore_texts(chunk["caption"].to_list(), config.prompt_prefix)
            cosine, clipped, clipscore = logic.clip_scores(clip.encode_images(images),
                                                           clip.encode_text(texts))
            parts.append(chunk.select("image_id", "caption_id", "shard", "image_index").with_columns(
                pl.Series("clip_cosine", cosine, dtype=pl.Float64),
                pl.Series("clip_cosine_clipped", clipped, dtype=pl.Float64),
                pl.Series("clipscore_x2_5", clipscore, dtype=pl.Float64),
                pl.Series("ssim", [img.resize_ssim(i, ssim_size) for i in images],
                          dtype=pl.Float64),
                pl.lit(ssim_size, dtype=pl.Int32).alias("ssim_size"),
                pl.lit(clip.model_id).alias("clip_model_id"),
                pl.lit(clip.is_pretrained).alias("clip_pretrained"),
                pl.Series("sha256", digests, dtype=pl.String),
                caption_sha256_series(chunk["caption"]),
            ))
        out[key] = pl.concat(parts) if parts else pl.DataFrame(schema=logic.SCORE_SCHEMA)
    meta = {"shards_in_run": len(out), "clip_model": clip.model_id, "ssim_size": ssim_size,
            "prompt_prefix": config.prompt_prefix, "clipscore_weight": logic.CLIPSCORE_WEIGHT,
            "score_seconds": round(time.perf_counter() - started, 2)}
    if not clip.is_pretrained:
        meta["model_note"] = UNTRAINED_CLIP_NOTE
    # How many CLIPScore texts ("A photo depicts <caption>") CLIP's text encoder cuts.
    captions = synthetic_images.unique("caption_id", keep="first", maintain_order=True)
    tokens = token_table(captions.with_columns(pl.Series(
        "caption", logic.clipscore_texts(captions["caption"].to_list(), config.prompt_prefix),
        dtype=pl.String)),
        lambda texts: {"clip": (clip.count_tokens(texts).tolist(), clip.max_text_tokens)})
    meta.update(truncation_metadata("clip_text", tokens))
    add_shard_metadata(context, "image_scores", lambda key: frame_metadata(
        out[key], ["image_id", "clip_cosine", "clip_cosine_clipped", "clipscore_x2_5", "ssim"],
        clip_cosine_clipped=logic.distribution(out[key]["clip_cosine_clipped"]),
        clipscore_x2_5=logic.distribution(out[key]["clipscore_x2_5"]),
        ssim=logic.distribution(out[key]["ssim"]),
        **truncation_metadata("clip_text", tokens.filter(pl.col("shard") == key))))
    yield dg.Output(out, metadata=meta)
    yield from checks.evaluate(SCORE_CHECKS, checks.by_shard(
        context.partition_keys, image_scores=out,
        synthetic_images=split_by_shard(synthetic_images, context.partition_keys)), quality_gates)


# --- synthvlm_selection (corpus-wide) ------------------------------------------------------------

class SelectionConfig(dg.Config):
    # weighted_score = clip_cosine_clipped + lambda * SSIM; 0.5 is the SynthVLM paper's lambda
    score_lambda: float = Field(0.5, ge=0, le=10)
    # keep this share of the distinct captions' best images (ours; the paper keeps about 10 %) ...
    top_fraction: float = Field(0.5, ge=0, le=1)
    # ... or exactly this many (overrides top_fraction; the paper: 100K, the gpu profile)
    top_k: int | None = Field(None, ge=0)
    thumbnails: int = 4  # selected and rejected examples shown in the metadata


@dg.asset(
    description="Per caption the best of its N images by the paper's weighted score, clipped "
    "cosine max(cos, 0) + lambda * SSIM; exact duplicate captions dropped; then the global top "
    "fraction (or top K) of the distinct captions. Every image is listed with its status; "
    "thresholds and distributions are in the metadata.",
    group_name=GROUP, kinds={"polars", "parquet"}, **ASSET_META,
    check_specs=checks.check_specs(SELECTION_CHECKS, partitions_def=None),
)
def synthvlm_selection(context: dg.AssetExecutionContext, config: SelectionConfig,
                       io_manager: Storage, quality_gates: QualityGates, image_scores: pl.LazyFrame,
                       synthetic_images: pl.LazyFrame) -> Iterator[dg.Output | dg.AssetCheckResult]:
    scores = image_scores.collect()
    images = synthetic_images.collect()
    joined = logic.pair_scores(images.select("image_id", "seed_id", "shard", "caption", "uri",
                                             "format", "sha256", "model_id", "pretrained"),
                               scores).drop("shard_image", "caption_sha256")
    selection = logic.select_pairs(joined, config.score_lambda, config.top_fraction, config.top_k)
    summary = logic.selection_summary(selection)
    histograms = _histograms(io_manager, selection)
    yield dg.Output(selection, metadata=frame_metadata(
        selection, ["image_id", "clip_cosine_clipped", "ssim", "weighted_score", "selected",
                    "reason"],
        **summary, score_lambda=config.score_lambda, score_formula=SCORE_FORMULA,
        rule=f"top {config.top_k}" if config.top_k is not None else f"top {config.top_fraction:.0%}",
        examples=dg.MetadataValue.md(_examples(io_manager, selection, config.thumbnails)),
        **histograms))
    yield from checks.evaluate(SELECTION_CHECKS, {"": {"synthvlm_selection": selection}},
                               quality_gates)


SCORE_FORMULA = "weighted_score = clip_cosine_clipped + lambda * ssim"


def _histograms(io_manager: ParquetIOManager, selection: pl.DataFrame) -> dict:
    """Clipped-cosine, SSIM and weighted-score histograms before/after selection: PNG files under
    the storage base and the same images inline in Markdown."""
    meta = {}
    for column, title in (("clip_cosine_clipped", "max(CLIP cosine, 0)"), ("ssim", "SSIM"),
                          ("weighted_score", "weighted score")):
        png = img.histogram_png(title, {
            "all images": selection[column].to_list(),
            "selected": selection.filter("selected")[column].to_list()})
        uri = storage_uri(io_manager, "synthvlm_selection", f"{column}_histogram.png")
        fs, path = io_manager.s3.fs(uri)
        write_bytes(fs, path, png)
        meta[f"{column}_histogram"] = dg.MetadataValue.md(img.png_markdown(png, title))
        meta[f"{column}_histogram_file"] = dg.MetadataValue.path(uri)
    return meta


def _examples(io_manager: ParquetIOManager, selection: pl.DataFrame, n: int) -> str:
    read = file_reader(io_manager)
    chosen = selection.filter("selected").head(n)
    rejected = selection.filter(~pl.col("selected")).sort("weighted_score").head(n)
    rows = []
    for status, frame in (("selected", chosen), ("rejected", rejected)):
        for row in frame.iter_rows(named=True):
            data = read(row["uri"])
            if data is None:
                continue
            rows.append((img.decode_image(data), row["caption"], {
                "status": status if status == "selected" else row["reason"],
                "max(cos, 0)": f"{row['clip_cosine_clipped']:.3f}",
                "SSIM": f"{row['ssim']:.3f}",
                "weighted score": f"{row['weighted_score']:.3f}"}))
    return _thumbnail_table(rows)


# --- synthvlm_dataset (corpus-wide) --------------------------------------------------------------

class ExportConfig(dg.Config):
    export_dir: str = "exports/synthvlm"  # under the storage base, or a full URI
    prompts: str = "brief_description/v1.txt"  # the brief-description instructions, one a line
    records_file: str = "pretrain.json"


def export_root(io_manager: ParquetIOManager, export_dir: str) -> str:
    return export_dir if "://" in export_dir or export_dir.startswith("/") \
        else storage_uri(io_manager, export_dir)


@dg.asset(
    description="The selected pairs in LLaVA pretraining format (JSON array; image paths relative "
    "to the export folder, a brief-description prompt per record), the images copied beside it, "
    "and manifest.json with counts and SHA-256 checksums of every file.",
    group_name=GROUP, kinds={"polars", "parquet", "json"}, **ASSET_META,
    check_specs=checks.check_specs(DATASET_CHECKS, partitions_def=None),
)
def synthvlm_dataset(context: dg.AssetExecutionContext, config: ExportConfig,
                     io_manager: Storage, quality_gates: QualityGates,
                     synthvlm_selection: pl.DataFrame) -> Iterator[dg.Output | dg.AssetCheckResult]:
    root = export_root(io_manager, config.export_dir)
    selected = synthvlm_selection.filter("selected").lazy()
    kept, duplicates = drop_duplicate_captions(selected, selected)  # first (shard, id) keeps it
    chosen = kept.collect().sort("image_id")
    out_fs, out_root = io_manager.s3.fs(root)
    # One image at a time: streamed from its file into the export folder and hashed as it passes,
    # so memory holds one chunk of one image however many are exported.
    checksums: dict[str, str] = {}
    paths = {}
    for image_id, shard, uri, fmt, digest in chosen.select(
            "image_id", "shard", "uri", "format", "sha256").iter_rows():
        name = f"{partition_path('images', shard)}/{image_id}.{fmt}"
        paths[image_id] = name
        src_fs, src = io_manager.s3.fs(uri)
        problem = "missing" if not src_fs.exists(src) else None
        if problem is None:
            try:
                checksums[name] = copy_file(src_fs, src, out_fs, join(out_root, name), digest)[0]
            except ChecksumMismatch:
                problem = "changed"
        if problem:
            raise ValueError(f"{uri}: the selected image is {problem} since it was scored; "
                             "re-materialise synthetic_images, image_scores and "
                             f"synthvlm_selection for shard {shard}")
    prompts = load_lines(config.prompts)
    records = logic.llava_records(chosen, prompts, paths)
    records_data = json.dumps(records, ensure_ascii=False, indent=1).encode()
    write_bytes(out_fs, join(out_root, config.records_file), records_data)
    checksums[config.records_file] = img.sha256(records_data)
    del records_data
    first = synthvlm_selection.head(1)
    manifest = {
        "format": "llava_pretrain", "records_file": config.records_file,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "counts": {"records": len(records), "images": len(paths),
                   "scored_images": synthvlm_selection.height,
                   "duplicates_dropped": duplicates,
                   "captions": int(synthvlm_selection["best_of_n"].sum()),
                   "by_shard": dict(sorted(chosen.group_by("shard").len().iter_rows()))},
        "selection": {"score": SCORE_FORMULA,
                      "lambda": first["score_lambda"].item() if first.height else None,
                      "target_fraction": first["target_fraction"].item() if first.height else None,
                      "target_k": first["target_k"].item() if first.height else None,
                      "duplicate_captions_before_top_k": int(
                          synthvlm_selection["duplicate_of"].is_not_null().sum()),
                      "weighted_score_threshold": float(chosen["weighted_score"].min())
                      if chosen.height else None,
                      "selected_means": {c: round(float(chosen[c].mean()), 4)
                                         if chosen.height else None
                                         for c in ("clip_cosine_clipped", "ssim",
                                                   "weighted_score")}},
        "models": {"diffusion": sorted(set(synthvlm_selection["model_id"])),
                   "diffusion_pretrained": bool(synthvlm_selection["pretrained"].all()),
                   "clip": sorted(set(synthvlm_selection["clip_model_id"])),
                   "clip_pretrained": bool(synthvlm_selection["clip_pretrained"].all())},
        "prompts": config.prompts,
        "sha256": dict(sorted(checksums.items())),
    }
    if not (manifest["models"]["diffusion_pretrained"] and manifest["models"]["clip_pretrained"]):
        manifest["note"] = "built with untrained models: images and scores are meaningless"
    # manifest.json is written last, and files of an earlier export go only after it
    write_bytes(out_fs, join(out_root, "manifest.json"), json.dumps(manifest, indent=1).encode())
    remove_orphans(io_manager, root, [*checksums, "manifest.json"])
    index = chosen.select(pl.col("image_id").alias("id"), "caption", "shard", "weighted_score",
                          "clip_cosine_clipped", "clipscore_x2_5", "ssim").with_columns(
        pl.Series("image", [r["image"] for r in records], dtype=pl.String),
        pl.Series("prompt", [r["conversations"][0]["value"].removeprefix("<image>\n")
                             for r in records], dtype=pl.String),
        pl.Series("sha256", [manifest["sha256"][r["image"]] for r in records], dtype=pl.String),
    ).select(EXPORT_SCHEMA.names())
    context.log.info(f"{len(records)} record(s) exported to {root}")
    yield dg.Output(index, metadata=frame_metadata(
        index, ["id", "image", "prompt", "caption"], export_dir=dg.MetadataValue.path(root),
        counts=manifest["counts"], models=manifest["models"],
        **({"model_note": manifest["note"]} if "note" in manifest else {})))
    yield from checks.evaluate(DATASET_CHECKS, {"": {"synthvlm_dataset": index}}, quality_gates)


@dg.asset_check(asset="synthvlm_dataset", name="records_resolve", blocking=True,
                description="every export record's image resolves inside the export folder and "
                "every file matches its manifest checksum")
def synthvlm_dataset_records_resolve(context: dg.AssetCheckExecutionContext,
                                     io_manager: Storage) -> dg.AssetCheckResult:
    event = context.instance.get_latest_materialization_event(dg.AssetKey("synthvlm_dataset"))
    if event is None or event.asset_materialization is None:
        return to_result(Outcome(False, "synthvlm_dataset has not been materialised"))
    root = event.asset_materialization.metadata["export_dir"].value
    return to_result(logic.verify_export(root, file_reader(io_manager), file_digest(io_manager)))


synthvlm_assets = [synthvlm_candidates, synthetic_images, image_scores, synthvlm_selection,
                   synthvlm_dataset]
# The checks that read the stored files back; the others run inside their assets.
synthvlm_checks = [synthetic_images_files_decode, synthvlm_dataset_records_resolve]
