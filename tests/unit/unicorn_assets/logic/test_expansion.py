"""Stage 1 logic: planning K expansions per seed, cleaning completions, lineage columns, the
filters (one case per reject reason) and MinHash near-duplicate removal."""

from __future__ import annotations

import json
import re

import polars as pl
import pytest

from tests.support import coco_captions
from unicorn_assets.expansion import (
    ExpansionConfig,
    expanded_captions_lexical_diversity,
    expanded_captions_seed_coverage,
)
from unicorn_assets.logic.dedup import (
    exact_duplicate_mask,
    exact_jaccard_pair_rate,
    near_duplicate_mask,
    shingles,
)
from unicorn_assets.logic.expansion import (
    CAPTION_REJECT_SCHEMA,
    CAPTION_SCHEMA,
    REJECT_REASONS,
    CaptionFilters,
    assemble_captions,
    clean_completion,
    filter_captions,
    length_finish_share,
    plan_expansions,
    reject_counts,
)
from unicorn_assets.logic.faithfulness import FaithfulnessRules, with_judgements
from unicorn_assets.logic.prompts import load_lines, load_prompt_set
from unicorn_assets.logic.text import word_count_expr
from unicorn_resources.llm import ChatRequest, Completion, FakeLLM, SamplingParams
from unicorn_resources.quality_gates import QualityGates

PROMPTS = load_prompt_set("stage1_expand", "v1")
STYLES = list(PROMPTS.styles)  # the opt-in style focuses
DEFAULT = ExpansionConfig()


def seeds_frame(n: int = 4, shard: str = "a") -> pl.DataFrame:
    recs = coco_captions(n)
    return pl.DataFrame({"seed_id": [r["id"] for r in recs], "shard": [shard] * n,
                         "caption": [r["caption"] for r in recs]})


# ---------------------------------------------------------------- prompts and planning


def test_prompt_templates_are_versioned_files():
    assert PROMPTS.ref == "stage1_expand/v1" and len(PROMPTS.digest) == 12
    assert set(STYLES) <= set(PROMPTS.styles)  # the default config only names known styles
    messages = PROMPTS.messages("lighting", caption="A red bus.")
    assert [m["role"] for m in messages] == ["system", "user"]
    assert '"A red bus."' in messages[1]["content"]
    assert PROMPTS.styles["lighting"] in messages[1]["content"]
    assert "$" not in messages[1]["content"]
    with pytest.raises(FileNotFoundError, match="known versions: v1.yaml, v2.yaml"):
        load_prompt_set("stage1_expand", "v999")


def test_the_default_is_the_papers_one_main_subject_expansion_per_seed():
    """Unicorn v2: one expansion per seed, one prompt about the main subject's observable,
    objective details in one paragraph; the style focuses are an opt-in."""
    assert (DEFAULT.styles, DEFAULT.expansions_per_seed) == ([], 1)
    assert DEFAULT.max_tokens >= 384  # what a real model gets: the paper's mean is not clipped
    prompts = load_prompt_set(DEFAULT.prompt, DEFAULT.prompt_version)
    plan = plan_expansions(seeds_frame(6), prompts, DEFAULT.styles, DEFAULT.expansions_per_seed,
                           DEFAULT.sampling_seed)
    assert plan.height == 6 and plan["seed_id"].n_unique() == 6
    assert set(plan["style"]) == {"main_subject"} and set(plan["expansion_index"]) == {0}
    user = prompts.messages("main_subject", caption="A red bus.")[1]["content"]
    assert "main subject" in user and "one detailed paragraph" in user and "No rhetoric" in user
    assert '"A red bus."' in user and "$" not in user and user == user.rstrip()
    assert not any(focus in user for focus in prompts.styles.values())
    # the opt-in still works with the same prompt set: a focus line per style
    assert prompts.styles["lighting"] in prompts.messages("lighting", caption="x")[1]["content"]
    with pytest.raises(ValueError, match="set expansions_per_seed: 1, or name K style focuses"):
        plan_expansions(seeds_frame(1), prompts, [], 2, 1)


def test_max_tokens_is_bounded():
    with pytest.raises(ValueError, match="max_tokens"):
        ExpansionConfig(max_tokens=0)


def test_length_finish_share_counts_kept_and_rejected_rows():
    kept = pl.DataFrame({"finish_reason": ["stop", "length", "stop"]})
    rejected = pl.DataFrame({"finish_reason": ["length"]})
    assert length_finish_share(kept, rejected) == (0.5, 4)
    assert length_finish_share(kept.clear(), rejected.clear()) == (0.0, 0)


def test_plan_gives_k_distinct_styles_per_seed_with_recorded_sampling_seeds():
    seeds = seeds_frame(6)
    plan = plan_expansions(seeds, PROMPTS, STYLES, 3, base_seed=1234)
    assert plan.height == 18
    for _, group in plan.group_by("seed_id"):
        assert group["style"].n_unique() == 3
        assert group["expansion_index"].sort().to_list() == [0, 1, 2]
    assert plan["caption_id"].n_unique() == 18
    assert plan["sampling_seed"].n_unique() == 18
    assert set(plan["style"]) <= set(STYLES) and plan["style"].n_unique() > 3  # styles vary
    # reproducible: the same seeds and base seed give the same plan; another base seed does not
    assert plan.equals(plan_expansions(seeds, PROMPTS, STYLES, 3, base_seed=1234))
    other = plan_expansions(seeds, PROMPTS, STYLES, 3, base_seed=99)
    assert other["sampling_seed"].to_list() != plan["sampling_seed"].to_list()


def test_plan_refuses_unknown_styles_and_impossible_k():
    seeds = seeds_frame(1)
    with pytest.raises(ValueError, match="not in prompt stage1_expand/v1"):
        plan_expansions(seeds, PROMPTS, ["objects", "smell"], 1, 1)
    with pytest.raises(ValueError, match="expansions_per_seed must be 1..2"):
        plan_expansions(seeds, PROMPTS, ["objects", "spatial"], 3, 1)
    with pytest.raises(ValueError, match="expansions_per_seed"):
        plan_expansions(seeds, PROMPTS, STYLES, 0, 1)


def test_plan_of_no_seeds_is_an_empty_frame():
    empty = seeds_frame(1).clear()
    plan = plan_expansions(empty, PROMPTS, STYLES, 2, 1)
    assert plan.height == 0 and "sampling_seed" in plan.columns


# ---------------------------------------------------------------- completions and lineage


@pytest.mark.parametrize("text, finish, expected", [
    ('  "A red  bus\nparked." ', "stop", "A red bus parked."),
    ("\u201cA red bus.\u201d", "stop", "A red bus."),
    ("A red bus. It is parked near a", "length", "A red bus."),
    ('He said "stop." Then the bus', "length", 'He said "stop."'),
    ("A red bus parked near a", "length", ""),
    ("A red bus parked near a", "stop", "A red bus parked near a"),
])
def test_clean_completion(text, finish, expected):
    assert clean_completion(text, finish) == expected


def test_assembled_captions_carry_full_lineage():
    seeds = seeds_frame(2)
    plan = plan_expansions(seeds, PROMPTS, STYLES, 2, 7)
    completions = [Completion(f"Text {i}. More", 30 + i, 12 + i, "length" if i % 2 else "stop")
                   for i in range(plan.height)]
    sampling = SamplingParams(max_tokens=96).as_dict()
    frame = assemble_captions(plan, completions, "llama_cpp:model.gguf", PROMPTS, sampling)
    assert frame.schema == CAPTION_SCHEMA
    row = frame.row(1, named=True)
    assert row["seed_id"] == plan["seed_id"][1] and row["shard"] == "a"
    assert row["model_id"] == "llama_cpp:model.gguf"
    assert row["prompt_version"] == "stage1_expand/v1" and row["prompt_digest"] == PROMPTS.digest
    assert json.loads(row["sampling"]) == sampling
    assert row["sampling_seed"] == plan["sampling_seed"][1]
    assert (row["prompt_tokens"], row["completion_tokens"], row["finish_reason"]) == (31, 13,
                                                                                      "length")
    assert row["caption"] == "Text 1." and row["n_words"] == 2
    assert frame["caption"][0] == "Text 0. More"
    with pytest.raises(ValueError, match="3 completions for 4 requests"):
        assemble_captions(plan, completions[:3], "m", PROMPTS, sampling)


# ---------------------------------------------------------------- filters

SEED = "A man in a dark suit with a blue tie and a white shirt stands in front of a brick wall."
GOOD = ("A tall man stands before a weathered red brick wall, wearing a tailored charcoal suit, a "
        "crisp white shirt and a narrow navy tie; soft daylight falls from the left and casts a "
        "faint shadow across the mortar lines behind his shoulders.")
OTHER = ("Three green apples rest in a shallow ceramic bowl on a pale oak table, their waxy skins "
         "catching light from a window above, while crumbs and a folded linen napkin lie beside "
         "the bowl near its chipped rim.")
CASES = {
    "kept": (GOOD, "stop"),
    "empty": ("   ", "stop"),
    "truncated": ("a long paragraph the token budget cut before its first full stop", "length"),
    "too_short": ("A man in a suit.", "stop"),
    "too_long": (" ".join(f"word{i}" for i in range(301)) + ".", "stop"),
    "boilerplate": ("Sure! Here is a detailed description of the image: " + OTHER, "stop"),
    "repetition": ("The man wears a suit and the man wears a tie and " * 4 + "done.", "stop"),
    "echoes_seed": (SEED + " He is there.", "stop"),
    "duplicate": (GOOD.upper().replace(";", ","), "stop"),
    "near_duplicate": (GOOD.replace("shoulders", "back"), "stop"),
    # seed faithfulness (logic/faithfulness.py; its own tests cover each signal)
    "low_seed_coverage": (OTHER, "stop"),
    "count_conflict": (("Two men stand before a weathered red brick wall, wearing tailored "
                        "charcoal suits, crisp white shirts and narrow navy ties; soft daylight "
                        "falls from the left across the mortar lines."), "stop"),
    "colour_conflict": (GOOD.replace("navy tie", "orange tie"), "stop"),
    "object_conflict": (GOOD.replace("tall man", "tall woman").replace("his", "her"), "stop"),
    "judge_contradiction": (GOOD.replace("soft daylight", "pale daylight"), "stop"),
}


def captions_frame(cases: dict[str, tuple[str, str]]) -> pl.DataFrame:
    seeds = pl.DataFrame({"seed_id": list(cases), "shard": ["a"] * len(cases),
                          "caption": [SEED] * len(cases)})
    plan = plan_expansions(seeds, PROMPTS, STYLES, 1, 1)
    completions = [Completion(text, 40, 60, finish) for text, finish in cases.values()]
    frame = assemble_captions(plan, completions, "m", PROMPTS, SamplingParams().as_dict())
    return with_judgements(frame, [True if case == "judge_contradiction" else None
                                   for case in frame["seed_id"]])  # as the judge would answer


def test_each_filter_rejects_with_its_reason_and_nothing_vanishes():
    frame = captions_frame(CASES)
    kept, rejected = filter_captions(frame, CaptionFilters())
    assert kept.schema == CAPTION_SCHEMA and rejected.schema == CAPTION_REJECT_SCHEMA
    assert kept["seed_id"].to_list() == ["kept"]
    assert dict(rejected.select("seed_id", "reason").iter_rows()) == {
        case: case for case in CASES if case != "kept"}
    assert sorted(kept["caption_id"].to_list() + rejected["caption_id"].to_list()) == \
        sorted(frame["caption_id"].to_list())
    assert reject_counts(rejected) == {r: (0 if r == "kept" else 1) for r in REJECT_REASONS}


@pytest.mark.parametrize("case", [c for c in CASES if c not in ("kept", "duplicate",
                                                               "near_duplicate")])
def test_each_filter_alone(case):
    """The failing case is rejected for its reason; the good caption beside it is kept."""
    kept, rejected = filter_captions(captions_frame({"kept": CASES["kept"], case: CASES[case]}),
                                     CaptionFilters())
    assert kept["seed_id"].to_list() == ["kept"]
    assert rejected.select("seed_id", "reason").rows() == [(case, case)]


@pytest.mark.parametrize("text", [
    "As an AI language model, I cannot see the image, but " + OTHER,
    "I'm sorry, I am unable to describe this image. " + OTHER,
    "Here is a detailed description: " + OTHER,
    "Certainly! " + OTHER,
    OTHER + " I hope this helps, and feel free to ask for more.",
])
def test_boilerplate_patterns(text):
    _, rejected = filter_captions(captions_frame({"x": (text, "stop")}), CaptionFilters())
    assert rejected["reason"].to_list() == ["boilerplate"]


def test_boilerplate_patterns_do_not_flag_plain_descriptions():
    texts = {str(i): (c["caption"] + " " + OTHER, "stop") for i, c in enumerate(coco_captions(20))}
    _, rejected = filter_captions(captions_frame(texts),
                                  CaptionFilters(near_duplicate_threshold=1.0))
    assert rejected.filter(pl.col("reason") == "boilerplate").height == 0
    for pattern in load_lines("filters/boilerplate_v1.txt"):  # valid in Python's syntax too
        re.compile(pattern)


def test_filter_thresholds_are_configuration():
    frame = captions_frame({"kept": CASES["kept"], "short": CASES["too_short"]})
    kept, _ = filter_captions(frame, CaptionFilters(  # the short one repeats 2 of 11 seed words
        min_words=3, min_new_words=0, faithfulness=FaithfulnessRules(min_seed_coverage=0.1)))
    assert kept.height == 2
    kept, rejected = filter_captions(frame, CaptionFilters(max_words=10))
    assert rejected["reason"].to_list() == ["too_long", "too_short"]


def test_filtering_no_captions():
    kept, rejected = filter_captions(pl.DataFrame(schema=CAPTION_SCHEMA), CaptionFilters())
    assert kept.height == rejected.height == 0
    assert set(reject_counts(rejected).values()) == {0}


# ---------------------------------------------------------------- dedup


def test_exact_duplicates_ignore_case_and_punctuation():
    mask = exact_duplicate_mask(pl.Series(["A red bus.", "a RED bus", "A red  bus!", "A blue bus"]))
    assert mask.to_list() == [False, True, True, False]


def test_near_duplicates_are_found_by_minhash_and_agree_with_exact_jaccard():
    long = " ".join(c["caption"] for c in coco_captions(6))
    texts = [long, long.rsplit(" ", 1)[0] + " umbrella", OTHER, GOOD,
             " ".join(long.split()[: len(long.split()) // 2])]
    exact = [len(set(shingles(t)) & set(shingles(texts[0]))) / len(set(shingles(t))
             | set(shingles(texts[0]))) for t in texts]
    assert exact[1] > 0.9 and exact[4] < 0.6  # the half-length text is no near duplicate
    assert near_duplicate_mask(texts, threshold=0.85) == [False, True, False, False, False]
    rate, examined = exact_jaccard_pair_rate(texts, 0.85)
    assert (rate, examined) == (1 / 5, 5)


def test_near_duplicate_mask_scales_linearly_on_distinct_texts():
    texts = [r["caption"] + f" number {i} of the set" for i, r in enumerate(coco_captions(300))]
    mask = near_duplicate_mask(texts, threshold=0.85)
    assert len(mask) == 300 and sum(mask) <= 3  # real COCO captions are nearly all distinct


# ---------------------------------------------------------------- with the fake LLM


def test_fake_llm_expansions_pass_the_filters(tmp_path):
    seeds = seeds_frame(5)
    plan = plan_expansions(seeds, PROMPTS, STYLES, 2, 1234)
    requests = [ChatRequest.of(PROMPTS.messages(style, caption=caption), seed=seed)
                for style, caption, seed in plan.select("style", "seed_caption",
                                                        "sampling_seed").iter_rows()]
    llm = FakeLLM(cache_path=str(tmp_path / "cache.sqlite"))
    params = SamplingParams(max_tokens=96)
    completions = llm.generate(requests, params)
    frame = assemble_captions(plan, completions, llm.model_id, PROMPTS, params.as_dict())
    kept, rejected = filter_captions(frame, CaptionFilters())
    assert kept.height == 10, rejected.select("reason", "caption").rows()
    assert kept["caption"].str.starts_with(kept["seed_caption"]).all()
    assert (kept["model_id"] == "fake:deterministic").all()


# --- the Stage 1 figure checks on stored frames, passing and failing ---------------------------------

def figure_frames(texts: list[str], seeds: list[str]) -> dict[str, pl.DataFrame]:
    kept = pl.DataFrame({"caption": texts, "seed_caption": seeds,
                         "finish_reason": ["stop"] * len(texts)}).with_columns(
        word_count_expr("caption").cast(pl.Int32).alias("n_words"))
    return {"expanded_captions": kept,
            "expanded_caption_rejects": kept.head(0).with_columns(reason=pl.lit("empty"))}


def test_lexical_diversity_check_fails_a_model_that_repeats_itself():
    texts = [c["caption"] for c in coco_captions(12)]
    gates = QualityGates()
    good = expanded_captions_lexical_diversity.outcome({"a": figure_frames(texts, texts)}, gates)
    assert good.passed and good.metadata["distinct_2"] > gates.caption_min_distinct_2
    looping = ["A dog on a bed, a dog on a bed, a dog on a bed, a dog on a bed."] * 12
    bad = expanded_captions_lexical_diversity.outcome({"a": figure_frames(looping, texts)}, gates)
    assert not bad.passed and "below the gate" in bad.description
    assert bad.metadata["type_token_ratio"] < gates.caption_min_type_token_ratio


def test_seed_coverage_check_fails_captions_that_drop_their_seeds():
    texts = [c["caption"] for c in coco_captions(12)]
    gates = QualityGates()
    assert expanded_captions_seed_coverage.outcome({"a": figure_frames(texts, texts)}, gates).passed
    others = [c["caption"] for c in coco_captions(12, offset=200)]  # another image's seed
    bad = expanded_captions_seed_coverage.outcome({"a": figure_frames(texts, others)}, gates)
    assert not bad.passed and bad.metadata["seed_coverage"] < gates.caption_min_mean_seed_coverage
