"""Stage 1: `expanded_captions` (and `expanded_caption_rejects`), one LLM batch per shard."""

import time
from collections.abc import Iterator
from dataclasses import replace

import dagster as dg
import polars as pl
from pydantic import Field

from unicorn_assets.checks import (
    Check,
    by_shard,
    check_specs,
    evaluate,
    frame_check,
    known_reasons_check,
    reject_rate_check,
    standard_checks,
)
from unicorn_assets.logic import faithfulness, figures, pairing, quality
from unicorn_assets.logic.expansion import (
    CAPTION_REJECT_SCHEMA,
    CAPTION_SCHEMA,
    REJECT_REASONS,
    CaptionFilters,
    assemble_captions,
    filter_captions,
    length_finish_share,
    plan_expansions,
    reject_counts,
)
from unicorn_assets.logic.prompts import load_prompt_set
from unicorn_assets.metadata import (
    add_shard_metadata,
    as_metadata,
    frame_metadata,
    table_out,
)
from unicorn_assets.partitions import MODEL_RETRY, SHARD_BACKFILL, seed_shards
from unicorn_assets.sharding import split_by_shard
from unicorn_resources.llm import ChatRequest, LLMResource, SamplingParams
from unicorn_resources.quality_gates import QualityGates

# Bumped when caption ids or their keys change (2: qualified by the shard; 3: a caption_sha256
# column), so the nightly run regenerates shards made before; their LLM requests are unchanged,
# so the response cache answers them.
CAPTION_ID_VERSION = "ids-3"
UNTRAINED_NOTE = "stand-in model: its text is meaningless, for tests and overhead benchmarks only"


class ExpansionConfig(dg.Config):
    prompt: str = "stage1_expand"
    # v2: the paper's single main-subject prompt; v1: the style-focus prompt made before
    prompt_version: str = "v2"
    # Opt-in (ours): K distinct style focuses per seed (objects, attributes, spatial, lighting,
    # background). Empty, as in the paper: one expansion per seed, the main-subject prompt alone.
    styles: list[str] = []  # noqa: RUF012 - a dg.Config field (pydantic copies it); Dagster shows it as the default
    expansions_per_seed: int = Field(1, ge=1, le=100)
    temperature: float = 0.7
    top_p: float = 0.95
    # Ours, for real models: the paper's captions average 129 words (about 170 tokens), so a
    # budget of 160 cut 18% of them; 384 leaves the length distribution unclipped at its mean.
    max_tokens: int = Field(384, ge=1, le=32768)
    repeat_penalty: float = 1.1
    sampling_seed: int = 1234
    min_words: int = 15
    max_words: int = 300
    max_repeated_trigram_ratio: float = 0.3
    min_new_words: int = 5
    near_duplicate_threshold: float = 0.85
    # Ours: ask the LLM whether each caption contradicts its seed (one short JSON-constrained
    # request per caption) and reject those it says do. Off: the deterministic signals only.
    faithfulness_judge: bool = False

    def sampling(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_p=self.top_p,
                              max_tokens=self.max_tokens, repeat_penalty=self.repeat_penalty)

    def filters(self) -> CaptionFilters:
        return CaptionFilters(
            min_words=self.min_words, max_words=self.max_words,
            max_repeated_trigram_ratio=self.max_repeated_trigram_ratio,
            min_new_words=self.min_new_words, near_duplicate_threshold=self.near_duplicate_threshold,
        )


def faithfulness_rules(gates: QualityGates) -> faithfulness.FaithfulnessRules:
    """The seed-faithfulness reject thresholds, from quality_gates."""
    return faithfulness.FaithfulnessRules(
        min_seed_coverage=gates.caption_min_seed_coverage,
        max_count_conflicts=gates.caption_max_count_conflicts,
        max_colour_conflicts=gates.caption_max_colour_conflicts,
        max_object_conflicts=gates.caption_max_object_conflicts)


JUDGE_PARAMS = SamplingParams(temperature=0.0, top_p=1.0, max_tokens=16, repeat_penalty=1.0)


def judge_faithfulness(llm: LLMResource, captions: pl.DataFrame) -> pl.DataFrame:
    """The optional LLM judge: "does this caption contradict its seed?", JSON-constrained where the
    backend supports a schema (any other backend's answer is read for a bare yes or no). Empty
    captions are not asked; an unreadable answer leaves judge_contradicts null (not a reject)."""
    schema = faithfulness.JUDGE_SCHEMA if llm.supports_json_schema else None
    asked = [i for i, text in enumerate(captions["caption"]) if text]
    requests = [ChatRequest.of(faithfulness.judge_messages(captions["seed_caption"][i],
                                                           captions["caption"][i]),
                               seed=0, json_schema=schema) for i in asked]
    answers = llm.generate(requests, JUDGE_PARAMS) if requests else []
    verdicts: list[bool | None] = [None] * captions.height
    for i, answer in zip(asked, answers):
        verdicts[i] = faithfulness.parse_judge(answer.text)
    return faithfulness.with_judgements(captions, verdicts)


def llm_metadata(llm: LLMResource, completions: list, seconds: float) -> dict:
    generated = sum(c.completion_tokens for c in completions if not c.cached)  # by the model now
    hits = sum(1 for c in completions if c.cached)
    meta = {
        "model_id": llm.model_id,
        "llm_requests": len(completions),
        "tokens_generated": generated,
        "tokens_prompt": sum(c.prompt_tokens for c in completions),
        "generation_seconds": round(seconds, 3),
        "tokens_per_second": round(generated / seconds, 2) if seconds > 0 else 0.0,
        "cache_hits": hits,
        "cache_hit_rate": round(hits / len(completions), 4) if completions else 0.0,
    }
    if not llm.is_trained_model:
        meta["model_note"] = UNTRAINED_NOTE
    return meta


expanded_captions_reject_rate = reject_rate_check(
    "expanded_captions", "expanded_caption_rejects", "caption_max_reject_rate", reject_counts,
    description="share of expanded captions rejected, under "
                "quality_gates.caption_max_reject_rate")

CAPTION_COLUMNS = {
    "caption_id": "the caption's id: a digest of shard, seed, prompt version and expansion index",
    "seed_id": "the seed it was expanded from (caption_seeds.seed_id)",
    "shard": "the seed shard (partition key)",
    "seed_caption": "the seed caption the LLM was given",
    "caption": "the expanded caption: the LLM's text, whitespace-normalised, quotes stripped",
    "caption_sha256": "SHA-256 of the caption text: the key that pairs embeddings, instructions "
                      "and exports with this caption",
    "style": "the expansion style asked for: main_subject (the prompt alone, the default) or an "
             "opt-in focus (objects, attributes, spatial, lighting, background)",
    "expansion_index": "which of the seed's K expansions this is (0-based)",
    "model_id": "the LLM that wrote it (backend:model)",
    "prompt_version": "the prompt set and its version (prompts/<name>/<version>)",
    "prompt_digest": "SHA-256 of the prompt template's text",
    "sampling": "JSON of the sampling parameters (temperature, top_p, max_tokens, ...)",
    "sampling_seed": "the request's sampling seed",
    "prompt_tokens": "tokens in the prompt",
    "completion_tokens": "tokens the model generated",
    "finish_reason": "why generation stopped: stop, or length (hit max_tokens; the caption was "
                     "trimmed to its last sentence)",
    "n_words": "words in the caption",
    "seed_coverage": "share of the seed's content lemmas the caption repeats (0-1)",
    "count_conflicts": "seed counts the caption restates differently (two dogs -> three dogs)",
    "colour_conflicts": "seed colours of a noun the caption replaces with another colour family",
    "object_conflicts": "seed objects replaced by another of their class (zebra -> giraffe, "
                        "tennis court -> dunes) or given impossible parts (a zebra's antlers)",
    "judge_contradicts": "the LLM judge's answer to 'does it contradict the seed?' (null: the "
                         "judge is off, or its answer could not be read)",
}

def length_finish_outcome(frames, gates: QualityGates) -> quality.Outcome:
    share, generated = length_finish_share(frames["expanded_captions"],
                                           frames["expanded_caption_rejects"])
    ok = share <= gates.caption_max_length_finish_rate
    return quality.Outcome(
        ok, f"{share:.1%} of {generated} expansions stopped at max_tokens (finish_reason "
        f"'length'; max {gates.caption_max_length_finish_rate:.0%})" + (
            "" if ok else ": raise max_tokens of expand_captions' config, so that the length "
            "distribution is not cut"),
        {"length_finish_rate": share, "generated": generated})


expanded_captions_length_finish = Check(
    "expanded_captions", "length_finish_rate", length_finish_outcome, blocking=False,
    description="share of expansions (kept and rejected, from their stored finish_reason) that "
    "hit the token budget, under quality_gates.caption_max_length_finish_rate")

def minimum_figures(frames, gates: QualityGates, limits: dict[str, str], what: str,
                    fix: str) -> quality.Outcome:
    """Each Stage 1 figure named in `limits` ({figure: gate}) at least its gate's value; NaN (no
    captions) is not judged."""
    got = figures.caption_figures(frames["expanded_captions"], frames["expanded_caption_rejects"])
    low = {name: getattr(gates, gate) for name, gate in limits.items()}
    below = [name for name, floor in low.items() if got[name] < floor]  # NaN < x is False
    text = ", ".join(f"{name} {got[name]:.3f} (min {low[name]:g})" for name in limits)
    return quality.Outcome(
        not below, f"{what} over {got['captions_n']} captions: {text}"
        + (f"; below the gate: {below}: {fix}" if below else ""),
        {**{name: got[name] for name in limits},
         **{f"min_{name}": low[name] for name in limits}, "captions": got["captions_n"]})


expanded_captions_lexical_diversity = Check(
    "expanded_captions", "lexical_diversity", lambda frames, gates: minimum_figures(
        frames, gates, {"distinct_1": "caption_min_distinct_1",
                        "distinct_2": "caption_min_distinct_2",
                        "type_token_ratio": "caption_min_type_token_ratio"},
        "lexical diversity", "the model repeats itself; raise temperature or repeat_penalty of "
        "expand_captions, or use a stronger model"), blocking=False,
    description="distinct-1 and distinct-2 over the shard's captions and their mean type-token "
    "ratio at least quality_gates.caption_min_distinct_1 / _distinct_2 / _type_token_ratio")

expanded_captions_seed_coverage = Check(
    "expanded_captions", "seed_coverage", lambda frames, gates: minimum_figures(
        frames, gates, {"seed_coverage": "caption_min_mean_seed_coverage"},
        "mean seed coverage", "the captions drop what their seeds say; check the prompt and "
        "the model"), blocking=False,
    description="the mean share of the seed's content words the shard's captions keep, at "
    "least quality_gates.caption_min_mean_seed_coverage")

stage1_checks = [
    *standard_checks("expanded_captions", schema=CAPTION_SCHEMA, id_column="caption_id",
                     required=["caption_id", "seed_id", "caption", "caption_sha256", "model_id",
                               "prompt_version"]),
    expanded_captions_reject_rate,
    expanded_captions_length_finish,
    expanded_captions_lexical_diversity,
    expanded_captions_seed_coverage,
    frame_check("expanded_captions", "caption_length",
                lambda df, q: quality.length_distribution(
                    df["n_words"], q.caption_min_median_words, q.caption_max_median_words,
                    q.caption_max_p95_words, q.caption_min_p5_words),
                blocking=True, description="median, p5 and p95 caption length in words within "
                "bounds"),
    frame_check("expanded_captions", "caption_digest",
                lambda df, q: pairing.digests_match_text(df), blocking=True,
                description="caption_sha256 is the SHA-256 of the caption text, on every row"),
    frame_check("expanded_captions", "near_duplicate_rate",
                lambda df, q: quality.near_duplicate_rate(
                    df["caption"].to_list(), q.near_duplicate_threshold, q.max_near_duplicate_rate),
                blocking=True, description="near duplicates left after the filter, measured by "
                "exact shingle Jaccard on a sample (independent of the MinHash filter)"),
    *standard_checks("expanded_caption_rejects", schema=CAPTION_REJECT_SCHEMA, id_column=None,
                     required=["caption_id", "reason"], non_empty=False),
    known_reasons_check("expanded_caption_rejects", REJECT_REASONS, "filter"),
]


@dg.multi_asset(
    outs={
        "expanded_captions": table_out(
            "Detailed captions expanded from the seeds by the LLM (one per seed, or K "
            "with style focuses), "
            "filtered and de-duplicated, with full lineage.",
            "1", CAPTION_ID_VERSION, (CAPTION_SCHEMA, CAPTION_COLUMNS)),
        "expanded_caption_rejects": table_out(
            "Expanded captions the filters removed, each with its reason.",
            "1", CAPTION_ID_VERSION),
    },
    check_specs=check_specs(stage1_checks),
    partitions_def=seed_shards,
    group_name="unicorn_stage1",
    backfill_policy=SHARD_BACKFILL,
    pool="gpu",
    retry_policy=MODEL_RETRY,
)
def expand_captions(context: dg.AssetExecutionContext, config: ExpansionConfig,
                    llm: LLMResource, quality_gates: QualityGates,
                    caption_seeds: pl.DataFrame) -> Iterator[dg.Output | dg.AssetCheckResult]:
    prompts = load_prompt_set(config.prompt, config.prompt_version)
    plan = plan_expansions(caption_seeds, prompts, config.styles, config.expansions_per_seed,
                           config.sampling_seed)
    requests = [
        ChatRequest.of(prompts.messages(style, caption=caption), seed=seed)
        for style, caption, seed in plan.select("style", "seed_caption", "sampling_seed").iter_rows()
    ]
    params = config.sampling()
    started = time.perf_counter()
    completions = llm.generate(requests, params) if requests else []
    seconds = time.perf_counter() - started

    captions = assemble_captions(plan, completions, llm.model_id, prompts, params.as_dict())
    if config.faithfulness_judge:
        captions = judge_faithfulness(llm, captions)
    kept, rejected = {}, {}
    for key, shard_captions in split_by_shard(captions, context.partition_keys).items():
        kept[key], rejected[key] = filter_captions(shard_captions, replace(
            config.filters(), faithfulness=faithfulness_rules(quality_gates)))
        context.log.info(f"{key}: {kept[key].height} captions kept, {rejected[key].height} "
                         f"rejected {reject_counts(rejected[key])}")
    add_shard_metadata(context, "expanded_captions", lambda key: {
        **frame_metadata(kept[key], ["caption_id", "style", "caption"], CAPTION_COLUMNS),
        **as_metadata(figures.caption_figures(kept[key], rejected[key])),
        "words_histogram": dg.MetadataValue.md(figures.word_histogram_markdown(
            kept[key]["n_words"]))})
    add_shard_metadata(context, "expanded_caption_rejects", lambda key: frame_metadata(
        rejected[key], ["reason", "caption"], rejects=reject_counts(rejected[key])))
    run = {"shards_in_run": len(kept)}
    yield dg.Output(kept, "expanded_captions", metadata={
        **run, "prompt_version": prompts.ref, **llm_metadata(llm, completions, seconds)})
    yield dg.Output(rejected, "expanded_caption_rejects", metadata=run)
    yield from evaluate(stage1_checks, by_shard(context.partition_keys, expanded_captions=kept,
                                                expanded_caption_rejects=rejected), quality_gates)
