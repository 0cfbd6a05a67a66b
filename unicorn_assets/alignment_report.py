"""The corpus-wide `alignment_report`: on a paired reference set (captions with the images they
describe), how far each transfer method moves caption embeddings toward their own images: the
centroid gap, the mean cosine to the own image, text->image R@1 and R@5, the k-NN neighbourhood
overlap with the raw text space, and the trace ratio (logic/alignment.py). Each figure is a number
in the metadata (`<method>/<figure>`), so the UI plots it across runs, with a small plot beside."""

from collections.abc import Iterator

import dagster as dg
import numpy as np
import polars as pl
from PIL import Image
from pydantic import Field

from unicorn_assets.logic import alignment
from unicorn_assets.metadata import OWNERS, stage_tags
from unicorn_assets.modality import CORPUS_GROUP, IMAGE_CHUNK
from unicorn_assets.partitions import GPU_OP_TAGS, MODEL_RETRY
from unicorn_resources.clip import UNTRAINED_CLIP_NOTE, ClipResource

REPORT_VERSION = "1"
RANGE_CHECK = "figures_in_range"
FIGURES_SCHEMA = pl.Schema({"method": pl.String, "figure": pl.String, "value": pl.Float64})
PAPERS = ("ReAlign (arXiv 2602.07026) reports the modality gap falling from 0.39 to 2.6e-4 with "
          "87 % of k-NN neighbourhoods kept; AnisoAlign (arXiv 2605.07825) Table 1 scores "
          "text-only trained MLLMs: mean shift 42.57, ReAlign 45.00, AnisoAlign 47.49.")
OFFLINE_NOTE = ("With an untrained CLIP the figures say nothing about real alignment: retrieval "
                "and the pair cosine are chance; the centroid gap, the trace ratio and the k-NN "
                "overlap still describe the geometry each transfer produces. On real weights they "
                "are the evidence.")


class AlignmentReportConfig(dg.Config):
    pairs: str | None = Field(None, description=(
        "a pairs.jsonl of a paired reference set, one JSON object a line with `image` (a path "
        "relative to the file's folder) and `caption`, e.g. "
        "../shared/data/coco_mini_val2017/pairs.jsonl (79 COCO images, 395 captions); null: the "
        "report has nothing to measure (ours)"))
    k: int = Field(10, ge=1, le=100, description="neighbours of the k-NN overlap (ours: 10)")
    max_pairs: int = Field(20_000, ge=10, le=200_000, description=(
        "at most this many pairs are read (the first ones): the k-NN overlap compares every "
        "caption with every other, in chunks (ours)"))


def encode_images(clip: ClipResource, paths: list) -> np.ndarray:
    out = []
    for start in range(0, len(paths), IMAGE_CHUNK):
        images = []
        for path in paths[start : start + IMAGE_CHUNK]:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        out.append(clip.encode_images(images))
    return np.concatenate(out)


def report_markdown(figures: dict[str, dict[str, float]], pairs: alignment.Pairs, source: str,
                    k: int, clip: ClipResource) -> str:
    lines = ["# Alignment by transfer method\n",
             (f"{len(pairs.captions)} captions of {len(pairs.images)} images from `{source}`, "
             f"encoded by {clip.model_id}; k = {k}. Each method's statistics are fitted on this "
             "set (text side from its captions, image side from its images); captions are "
             "transferred by the method, images mapped by its inference recipe (centred for "
             "mean_shift, as they are otherwise).\n"),
             alignment.figures_markdown_table(figures), "",
             alignment.figures_png_markdown(figures), "",
             "| figure | meaning |", "|---|---|",
             *(f"| {name} | {text} |" for name, text in alignment.FIGURES.items()), "",
             f"Papers: {PAPERS}"]
    if not clip.is_pretrained:
        lines[1:1] = [f"**{UNTRAINED_CLIP_NOTE}.** {OFFLINE_NOTE}\n"]
    return "\n".join(lines)


@dg.asset(
    description="On a paired reference set (config pairs: a pairs.jsonl), per transfer method "
    "(none, mean_shift, mean_shift_to_image_mean, realign): the centroid gap, the mean cosine of "
    "each caption to its own image, text->image R@1 and R@5, the k-NN overlap with the raw text "
    "space and the trace ratio. Each figure a number in the metadata, with a plot.",
    group_name=CORPUS_GROUP,
    kinds={"numpy", "parquet", "markdown"},
    owners=OWNERS,
    tags=stage_tags("report"),
    code_version=REPORT_VERSION,
    check_specs=[dg.AssetCheckSpec(
        RANGE_CHECK, asset="alignment_report", blocking=True,
        description="every figure finite and in its range (a gap of at most 2 between unit "
        "vectors, cosines in [-1, 1], shares in [0, 1], a positive trace ratio), R@1 <= R@5, and "
        "no transfer (none) keeps every neighbour")],
    pool="gpu",  # it encodes the reference pairs with the clip resource
    op_tags=GPU_OP_TAGS,
    retry_policy=MODEL_RETRY,
)
def alignment_report(context: dg.AssetExecutionContext, config: AlignmentReportConfig,
                     clip: ClipResource) -> Iterator[dg.Output | dg.AssetCheckResult]:
    if config.pairs is None:
        note = ("nothing to measure: no paired reference set; set "
                "ops.alignment_report.config.pairs to a pairs.jsonl (image path + caption a line), "
                "e.g. ../shared/data/coco_mini_val2017/pairs.jsonl")
        context.log.info(note)
        yield dg.Output(pl.DataFrame(schema=FIGURES_SCHEMA), metadata={
            "note": dg.MetadataValue.text(note), "dagster/row_count": dg.MetadataValue.int(0)})
        yield dg.AssetCheckResult(check_name=RANGE_CHECK, asset_key="alignment_report",
                                  passed=True, description="no figures: nothing was measured")
        return
    pairs = alignment.read_pairs(config.pairs, config.max_pairs)
    paired = alignment.PairedSet(np.asarray(clip.encode_text(pairs.captions), dtype=np.float64),
                                 np.asarray(encode_images(clip, pairs.images), dtype=np.float64),
                                 pairs.image_of)
    figures = alignment.alignment_figures(paired, config.k, clip.model_id, clip.is_pretrained)
    frame = pl.DataFrame([{"method": method, "figure": name, "value": value}
                          for method, values in figures.items() for name, value in values.items()],
                         schema=FIGURES_SCHEMA)
    context.log.info(f"alignment of {len(pairs.captions)} captions / {len(pairs.images)} images: "
                     + "; ".join(f"{m} gap {v['centroid_gap']:.3g}" for m, v in figures.items()))
    metadata: dict[str, dg.MetadataValue] = {
        "report": dg.MetadataValue.md(report_markdown(figures, pairs, config.pairs, config.k,
                                                      clip)),
        "pairs": dg.MetadataValue.path(config.pairs),
        "captions": dg.MetadataValue.int(len(pairs.captions)),
        "images": dg.MetadataValue.int(len(pairs.images)),
        "k": dg.MetadataValue.int(config.k),
        "model_id": dg.MetadataValue.text(clip.model_id),
        "dagster/row_count": dg.MetadataValue.int(frame.height),
    }
    if not clip.is_pretrained:
        metadata["model_note"] = dg.MetadataValue.text(f"{UNTRAINED_CLIP_NOTE}. {OFFLINE_NOTE}")
    for method, values in figures.items():  # numbers, so the UI plots each across runs
        for name, value in values.items():
            metadata[f"{method}/{name}"] = dg.MetadataValue.float(value)
    yield dg.Output(frame, metadata=metadata)
    outcome = alignment.figures_in_range(figures)
    yield dg.AssetCheckResult(check_name=RANGE_CHECK, asset_key="alignment_report",
                              passed=outcome.passed, description=outcome.description,
                              metadata=outcome.metadata)


alignment_assets = [alignment_report]
