"""Stage 2: `instructions` (and `instruction_rejects`), one LLM batch per attempt per run."""

import json
import time
from collections.abc import Iterator
from typing import Annotated, Any

import dagster as dg
import polars as pl
from pydantic import Field, create_model, model_validator

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
from unicorn_assets.expansion import llm_metadata
from unicorn_assets.logic import figures, quality
from unicorn_assets.logic.instructions import (
    INSTRUCTION_REJECT_SCHEMA,
    INSTRUCTION_SCHEMA,
    REJECT_REASONS,
    InstructionSettings,
    dialogue_preview,
    generate_instructions,
    image_token_ok,
    json_validity,
    load_prompts,
    mc_letter_replies,
    plan_instructions,
    reject_counts,
    task_counts,
    turns_outside_bounds,
    well_formed,
)
from unicorn_assets.metadata import (
    add_shard_metadata,
    as_metadata,
    frame_metadata,
    markdown_table,
    table_out,
)
from unicorn_assets.partitions import MODEL_RETRY, SHARD_BACKFILL, seed_shards
from unicorn_assets.sharding import split_by_shard
from unicorn_resources.llm import ChatRequest, LLMResource, SamplingParams
from unicorn_resources.quality_gates import QualityGates

# Unicorn v2 made 171K multiple-choice, 199K QA and 100K complex-reasoning records.
# 2: a multiple-choice reply is the letter alone (rationale in `mc_rationale`), LLaVA's suffix
INSTRUCTIONS_VERSION = "2"
PAPER_MIX = {"multiple_choice": 171.0, "question_answering": 199.0, "complex_reasoning": 100.0,
             "multi_turn": 0.0}


class InstructionDefaults(dg.ConfigurableResource):
    """Stage 2 settings of the deployment (resource `stage2`, the profile's `stage2:` section). Every
    run uses them, whatever launched it (job, schedule, sensor, backfill, Materialize in the UI);
    a run's own config (`InstructionConfig`) overrides any field it sets. The defaults follow
    Unicorn v2: 6-8 QA pairs per record, every caption, the paper's task mix."""

    prompt_version: str = Field("v1", description="version of prompts/stage2_<task>/")
    task_mix: dict[str, float] = Field(
        PAPER_MIX, description="weight per task type (multiple_choice, question_answering, "
        "complex_reasoning, multi_turn); each caption draws one, seeded by its id")
    qa_pairs_min: int = Field(6, ge=1, le=50, description="QA pairs per record, min (paper: 6-8)")
    qa_pairs_max: int = Field(8, ge=1, le=50, description="QA pairs per record, max")
    multi_turn_min: int = Field(2, ge=1, le=50, description="turns of a multi_turn dialogue, min")
    multi_turn_max: int = Field(3, ge=1, le=50, description="turns of a multi_turn dialogue, max")
    sample_fraction: float = Field(
        1.0, gt=0, le=1, description="share of captions made into records, a seeded random "
        "sample by a stable hash of the caption id (the paper: 471K records of 1.2M captions, "
        "0.3925); 1: every caption")
    max_captions_per_shard: int = Field(
        0, ge=0, description="a cap: at most the first N (sampled) captions of each shard (demo "
        "budgets); 0: no cap")
    max_attempts: int = Field(3, ge=1, le=100,
                              description="attempts per record; each retry has a new seed")
    temperature: float = Field(0.7, ge=0, le=2)
    top_p: float = Field(0.95, gt=0, le=1)
    max_tokens_per_turn: int = Field(160, ge=1, le=32768,
                                     description="token budget = this x the most turns")
    repeat_penalty: float = Field(1.1, gt=0, le=10)
    sampling_seed: int = Field(4321, ge=0)
    restate_threshold: float = Field(
        0.9, ge=0, le=1, description="an answer whose word set overlaps the question's this much "
        "(Jaccard) restates it")

    @model_validator(mode="after")
    def _consistent(self) -> "InstructionDefaults":
        """min <= max turns, known task types, weights >= 0 with a positive sum."""
        try:
            for low, high in (("qa_pairs_min", "qa_pairs_max"),
                              ("multi_turn_min", "multi_turn_max")):
                if getattr(self, low) > getattr(self, high):
                    raise ValueError(f"{low} ({getattr(self, low)}) is above {high} "
                                     f"({getattr(self, high)}); raise {high} or lower {low}")
            self.settings()
        except TypeError:  # a value still to be resolved at run time (EnvVar)
            pass
        return self

    @property
    def recipe(self) -> dict[str, Any]:
        """The values, for the staleness digest: a changed setting marks Stage 2 stale."""
        return {name: getattr(self, name) for name in type(self).model_fields}

    def overridden_by(self, config: "InstructionConfig") -> "InstructionDefaults":
        """These settings, with every field that the run's config sets (non-null) replaced."""
        overrides = {k: v for k, v in config.model_dump().items() if v is not None}
        return InstructionDefaults(**{**self.recipe, **overrides})

    def settings(self) -> InstructionSettings:
        pairs, dialogue = (self.qa_pairs_min, self.qa_pairs_max), (self.multi_turn_min,
                                                                   self.multi_turn_max)
        return InstructionSettings(
            task_mix=self.task_mix,
            turns={"multiple_choice": pairs, "question_answering": pairs,
                   "complex_reasoning": pairs, "multi_turn": dialogue},
            base_seed=self.sampling_seed, max_attempts=self.max_attempts,
            restate_threshold=self.restate_threshold,
            max_captions_per_shard=self.max_captions_per_shard or None,
            sample_fraction=self.sample_fraction,
        )

    def sampling(self) -> SamplingParams:
        turns = max(self.qa_pairs_max, self.multi_turn_max)
        return SamplingParams(temperature=self.temperature, top_p=self.top_p,
                              max_tokens=self.max_tokens_per_turn * turns,
                              repeat_penalty=self.repeat_penalty)


# The run config: every field of InstructionDefaults, optional; null keeps the deployment's value.
InstructionConfig = create_model(
    "InstructionConfig", __base__=dg.Config,
    __doc__="Overrides of the deployment's Stage 2 settings (resource `stage2`) for this run; "
            "a null field keeps the deployment's value.",
    **{name: ((Annotated[(field.annotation, *field.metadata)] if field.metadata
               else field.annotation) | None, Field(None, description=(
        f"{field.description or name.replace('_', ' ')}. null: the deployment's value "
        f"(resource stage2; default {field.default!r})")))
       for name, field in InstructionDefaults.model_fields.items()})


def conversation_markdown(conversation: list[dict[str, str]]) -> str:
    return "\n\n".join(f"**{t['from']}**: {t['value']}".replace("\n", "  \n")
                       for t in conversation)


instructions_reject_rate = reject_rate_check(
    "instructions", "instruction_rejects", "instruction_max_reject_rate", reject_counts,
    description="share of captions whose record was rejected, under "
                "quality_gates.instruction_max_reject_rate")


def json_validity_outcome(frames, gates: QualityGates) -> quality.Outcome:
    """JSON validity over every attempt, at the first attempt and after the retries, each at
    least its gate."""
    got = figures.instruction_figures(frames["instructions"], frames["instruction_rejects"])
    rate, attempts = json_validity(frames["instructions"], frames["instruction_rejects"])
    overall = quality.min_rate(rate, gates.instruction_min_json_validity, "JSON validity", attempts)
    floors = {"json_valid_first_attempt": gates.instruction_min_json_valid_first_attempt,
              "json_valid_final": gates.instruction_min_json_valid_final}
    below = [name for name, floor in floors.items() if got[name] < floor]  # NaN: not judged
    text = ", ".join(f"{name.removeprefix('json_valid_').replace('_', ' ')} "
                     f"{got[name]:.1%} (min {floor:.0%})" for name, floor in floors.items())
    passed = overall.passed and not below
    fix = "" if passed else ("; use a backend with JSON-schema decoding (llm.backend vllm or "
                             "llama_cpp), a stronger model, or lower max_tokens_per_turn cuts")
    return quality.Outcome(
        passed, f"{overall.description}; of {got['records_n'] + frames['instruction_rejects'].height}"
        f" records: {text}{fix}",
        {**overall.metadata, **{name: got[name] for name in floors},
         **{f"min_{name}": floor for name, floor in floors.items()}})


instructions_json_validity = Check(
    "instructions", "json_validity_rate", json_validity_outcome, blocking=False,
    description="share of LLM attempts (records, rejects, retries) that returned JSON valid for "
    "the schema, over quality_gates.instruction_min_json_validity; and the share of records "
    "valid at the first attempt and after the retries, over "
    "instruction_min_json_valid_first_attempt / _final")


def task_mix_outcome(frame: pl.DataFrame, gates: QualityGates) -> quality.Outcome:
    mixes = frame["task_mix"].unique().to_list()
    if len(mixes) > 1:
        return quality.Outcome(False, f"{len(mixes)} different configured mixes in one shard",
                               {"mixes": mixes})
    expected = json.loads(mixes[0]) if mixes else {}
    return quality.mix_within_tolerance(task_counts(frame), expected,
                                        gates.instruction_mix_tolerance,
                                        gates.instruction_mix_alpha)


def _multiple_choice(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.filter(pl.col("task_type") == "multiple_choice")


INSTRUCTION_COLUMNS = {
    "id": "the record's id: a digest of its caption_id and prompt version",
    "caption_id": "the caption it was made from (expanded_captions.caption_id)",
    "caption_sha256": "SHA-256 of that caption's text, copied from its row: the pairing key",
    "seed_id": "the seed of that caption",
    "shard": "the seed shard (partition key)",
    "task_type": "multiple_choice, question_answering, complex_reasoning or multi_turn",
    "n_turns": "QA pairs asked for",
    "model_id": "the LLM that wrote it (backend:model)",
    "prompt_version": "the task's prompt set and version",
    "prompt_digest": "SHA-256 of the prompt template's text",
    "sampling": "JSON of the sampling parameters",
    "sampling_seed": "the sampling seed of the last attempt",
    "attempts": "LLM attempts it took (a retry has a new seed)",
    "attempt_reasons": "why each failed attempt failed, in order",
    "prompt_tokens": "prompt tokens, summed over attempts",
    "completion_tokens": "generated tokens, summed over attempts",
    "task_mix": "JSON of the configured task-type shares",
    "mc_rationale": "multiple choice: the model's rationale of each turn (the reply itself is "
                    "the letter alone, as in the paper); null for the other task types",
    "conversations": "the LLaVA/Bunny conversation: turns {from: human|gpt, value}; the first "
                     "human turn holds the <image> token",
}


def mc_rationale_outcome(frame: pl.DataFrame, gates: QualityGates) -> quality.Outcome:
    got = figures.mc_figures(frame)
    share, floor = got["mc_rationale_share"], gates.instruction_min_mc_rationale_share
    passed = not share < floor  # NaN (no multiple-choice records): nothing to judge
    return quality.Outcome(
        passed, f"{share:.1%} of {got['mc_records_n']} multiple-choice records give a rationale "
        f"for every turn (min {floor:.0%})" + ("" if passed else ": a reply without its reason "
                                               "cannot be checked; use a stronger model"),
        {"mc_rationale_share": share, "mc_records": got["mc_records_n"],
         "min_mc_rationale_share": floor})


def turns_per_record_check(turns: dict[str, tuple[int, int]]) -> Check:
    """Blocking: every stored conversation has whole human/gpt pairs, as many as the configured
    bounds of its task type allow (`turns`: the run's settings)."""
    def rule(frame: pl.DataFrame, gates: QualityGates) -> quality.Outcome:
        bad = turns_outside_bounds(frame, turns)
        return quality.Outcome(
            not bad, f"{len(bad)} of {frame.height} records have human/gpt pairs outside the "
            f"configured bounds {turns}" + (": fix qa_pairs_min/max or multi_turn_min/max of "
                                            "stage2, or regenerate" if bad else ""),
            {"failing": len(bad), "failing_ids": [b[0] for b in bad[:20]],
             "pairs_found": {b[0]: b[2] for b in bad[:20]},
             "bounds": {k: list(v) for k, v in turns.items()}})
    return frame_check("instructions", "turns_per_record", rule, blocking=True,
                       description="human/gpt pairs of every stored conversation within the "
                       "configured qa_pairs (multi_turn) bounds of its task type")

stage2_checks = [
    *standard_checks("instructions", schema=INSTRUCTION_SCHEMA, id_column="id",
                     required=["id", "caption_id", "caption_sha256", "seed_id", "task_type",
                               "conversations", "model_id", "prompt_version"]),
    instructions_reject_rate,
    instructions_json_validity,
    frame_check("instructions", "task_mix", task_mix_outcome, blocking=False,
                description="each task-type share consistent with the configured mix within "
                "quality_gates.instruction_mix_tolerance: fails when its Wilson interval at "
                "confidence 1 - instruction_mix_alpha lies outside it; too small a shard to "
                "judge passes with too_small_to_judge set"),
    frame_check("instructions", "mc_rationale", mc_rationale_outcome, blocking=False,
                description="share of multiple-choice records with a rationale for every turn, "
                "at least quality_gates.instruction_min_mc_rationale_share"),
    frame_check("instructions", "mc_letter_reply",
                lambda df, q: quality.rows_satisfy(
                    _multiple_choice(df), "conversations", mc_letter_replies,
                    "every multiple-choice question lists 4 distinct options A-D and ends with "
                    "LLaVA's letter instruction, and every reply is exactly one letter A-D"),
                blocking=True, description="multiple-choice replies, read from the stored "
                "conversations, are one letter of the options A-D listed in the question"),
    turns_per_record_check(InstructionDefaults().settings().turns),  # the run's bounds in-asset
    frame_check("instructions", "conversation_shape",
                lambda df, q: quality.rows_satisfy(
                    df, "conversations", lambda c: well_formed(c) and image_token_ok(c),
                    "human and gpt turns alternate in pairs, none empty, one <image> token in "
                    "the first human turn"),
                blocking=True, description="turns alternate human/gpt in pairs; no empty turn; "
                "exactly one <image> token, in the first human turn"),
    *standard_checks("instruction_rejects", schema=INSTRUCTION_REJECT_SCHEMA, id_column=None,
                     required=["caption_id", "reason", "detail"], non_empty=False),
    known_reasons_check("instruction_rejects", REJECT_REASONS, "rule"),
]


@dg.multi_asset(
    outs={
        "instructions": table_out(
            "One LLaVA/Bunny conversation per caption (multiple choice, question "
            "answering, complex reasoning or multi-turn), validated, with full lineage.",
            "2", INSTRUCTIONS_VERSION, (INSTRUCTION_SCHEMA, INSTRUCTION_COLUMNS)),
        "instruction_rejects": table_out(
            "Captions whose conversation stayed invalid after every attempt, each "
            "with its reason, detail and last raw output.",
            "2", INSTRUCTIONS_VERSION),
    },
    check_specs=check_specs(stage2_checks),
    partitions_def=seed_shards,
    group_name="unicorn_stage2",
    backfill_policy=SHARD_BACKFILL,
    pool="gpu",
    retry_policy=MODEL_RETRY,
)
def make_instructions(context: dg.AssetExecutionContext, config: InstructionConfig,
                      stage2: InstructionDefaults, llm: LLMResource, quality_gates: QualityGates,
                      expanded_captions: pl.DataFrame
                      ) -> Iterator[dg.Output | dg.AssetCheckResult]:
    chosen = stage2.overridden_by(config)
    settings, params = chosen.settings(), chosen.sampling()
    prompts = load_prompts(chosen.prompt_version)
    plan = plan_instructions(expanded_captions, settings)
    structured = llm.supports_json_schema
    started = time.perf_counter()
    generation = generate_instructions(
        plan, prompts, lambda requests: llm.generate([ChatRequest.of(**r) for r in requests], params),
        settings, structured=structured, model_id=llm.model_id, sampling=params.as_dict())
    seconds = time.perf_counter() - started

    records = split_by_shard(generation.records, context.partition_keys)
    rejects = split_by_shard(generation.rejects, context.partition_keys)
    for key in context.partition_keys:
        context.log.info(f"{key}: {records[key].height} instruction records, "
                         f"{rejects[key].height} rejected {reject_counts(rejects[key])}")
    def shard_meta(key: str) -> dict:
        shard, validity = records[key], json_validity(records[key], rejects[key])
        meta = frame_metadata(
            shard, column_docs=INSTRUCTION_COLUMNS, task_type_counts=task_counts(shard),
            json_validity_rate=validity[0], attempts=validity[1],
            captions_available=expanded_captions.filter(pl.col("shard") == key).height,
            captions_used=plan.filter(pl.col("shard") == key).height)
        meta.update(as_metadata(figures.instruction_figures(shard, rejects[key])))
        if shard.height:
            meta["sample"] = dg.MetadataValue.md(markdown_table(dialogue_preview(shard)))
            meta["example_conversation"] = dg.MetadataValue.md(
                conversation_markdown(shard["conversations"][0].to_list()))
        return meta

    add_shard_metadata(context, "instructions", shard_meta)
    add_shard_metadata(context, "instruction_rejects", lambda key: frame_metadata(
        rejects[key], ["caption_id", "task_type", "reason", "detail"],
        rejects=reject_counts(rejects[key])))
    run = {"shards_in_run": len(records)}
    yield dg.Output(records, "instructions", metadata={
        **run, "requests_per_attempt": dg.MetadataValue.json(generation.batch_sizes),
        "structured_output": "json_schema" if structured else "prompt_only",
        **as_metadata({"task_mix": settings.shares()}),  # task_mix_<task>: a number each
        "turns": dg.MetadataValue.json({k: list(v) for k, v in settings.turns.items()}),
        "max_captions_per_shard": chosen.max_captions_per_shard or "all",
        "sample_fraction": chosen.sample_fraction,
        "settings": dg.MetadataValue.json(chosen.recipe),
        "prompt_versions": dg.MetadataValue.json(sorted({p.ref for p in prompts.values()})),
        **llm_metadata(llm, generation.completions, seconds)})
    yield dg.Output(rejects, "instruction_rejects", metadata=run)
    yield from evaluate(run_checks(settings), by_shard(
        context.partition_keys, instructions=records, instruction_rejects=rejects), quality_gates)


def run_checks(settings) -> list[Check]:
    """stage2_checks, with the turns check judging against the bounds this run used."""
    return [turns_per_record_check(dict(settings.turns)) if c.name == "turns_per_record" else c
            for c in stage2_checks]
