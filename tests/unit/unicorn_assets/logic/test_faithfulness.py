"""Seed faithfulness (logic/faithfulness.py): each deterministic signal on hand-made seed/caption
pairs, in both directions (the faithful caption passes, the contradicting one is caught), the
reject reasons and thresholds, and the LLM judge's request and answer parsing."""

from __future__ import annotations

import json

import polars as pl
import pytest

from tests.support import coco_captions
from unicorn_assets.expansion import judge_faithfulness
from unicorn_assets.logic import faithfulness as f
from unicorn_assets.logic.expansion import CaptionFilters
from unicorn_resources.llm import FakeLLM

ZEBRA = "Two zebras grazing on dry grass in a field."
TENNIS = "A woman swinging a racket on a tennis court."
DOGS = "Two dogs playing with a frisbee in the park."
BUS = "A red bus driving down a city street."


@pytest.mark.parametrize("word, expected", [
    ("dogs", "dog"), ("buses", "bus"), ("puppies", "puppy"), ("knives", "knife"), ("men", "man"),
    ("people", "person"), ("boxes", "box"), ("glass", "glass"), ("playing", "play"),
    ("parked", "park"), ("sitting", "sit"), ("ties", "tie"), ("zebras", "zebra"), ("dunes", "dune"),
])
def test_rule_lemmatiser(word, expected):
    assert f.lemma(word) == expected


def test_coverage_counts_seed_content_lemmas_in_any_form():
    assert f.content_lemmas(DOGS) == {"dog", "play", "frisbee", "park"}
    faithful = "The dogs play with a bright frisbee across the grass of a sunny park."
    assert f.seed_coverage(DOGS, faithful) == 1.0
    assert f.seed_coverage(DOGS, "A dog runs on a beach.") == 0.25
    assert f.seed_coverage(TENNIS, "Rolling sand dunes stretch to the horizon.") == 0.0
    assert f.seed_coverage("A the of.", "anything") == 1.0  # a seed with no content word


def test_counts_preserved_two_vs_three_dogs():
    assert f.count_conflicts(DOGS, "Three dogs chase a frisbee across the park.") == 1
    assert f.count_conflicts(DOGS, "3 dogs chase a frisbee across the park.") == 1
    assert f.count_conflicts(DOGS, "Two dogs chase a frisbee across the park.") == 0
    assert f.count_conflicts(DOGS, "2 playful dogs chase a frisbee.") == 0
    # "a dog ... another dog" restates no count; "one of the dogs" is not a count either
    assert f.count_conflicts(DOGS, "A dog leaps while another dog waits; one of the dogs barks.") == 0
    # a seed's "a dog" against an explicit "three dogs"
    assert f.count_conflicts("A dog on a sofa.", "Three dogs sleep on a sofa.") == 1
    assert f.count_conflicts("A dog on a sofa.", "A dog sleeps on a sofa beside two cushions.") == 0


def test_colours_red_vs_blue_bus():
    assert f.colour_conflicts(BUS, "A blue bus drives down a busy city street.") == 1
    assert f.colour_conflicts(BUS, "A crimson double-decker bus drives down the street.") == 0
    assert f.colour_conflicts(BUS, "A red and white bus drives down the street.") == 0
    assert f.colour_conflicts(BUS, "A bus drives past a blue car.") == 0  # another noun's colour
    assert f.colour_conflicts("A man with a blue tie.", "A man with a navy tie.") == 0  # a shade


def test_objects_zebra_antlers_and_tennis_court_dunes():
    antlers = "Two zebras with massive black antlers graze on dry grass in a field."
    assert f.object_conflicts(ZEBRA, antlers) == 1
    assert f.object_conflicts("Two deer in a field.", "Two deer with antlers in a field.") == 0
    assert f.object_conflicts(ZEBRA, "Two giraffes graze on dry grass in a field.") == 1
    assert f.object_conflicts(ZEBRA, "Two zebras graze near a giraffe in a field.") == 0
    dunes = "A woman swings a racket among rolling sand dunes in the desert."
    assert f.object_conflicts(TENNIS, dunes) == 1
    assert f.object_conflicts(TENNIS, "A woman swings a racket on a clay tennis court.") == 0
    assert f.object_conflicts(BUS, "A red truck drives down a city street.") == 1
    assert f.object_conflicts(TENNIS, "A man swings a racket on a tennis court.") == 1


def test_each_signal_has_its_reason_and_threshold():
    rules = f.FaithfulnessRules()
    cases = {
        None: (DOGS, "The two dogs play with a yellow frisbee on the grass of the park."),
        "low_seed_coverage": (TENNIS, "Rolling sand dunes stretch to the horizon under the sun."),
        "count_conflict": (DOGS, "Three dogs play with a yellow frisbee in the park."),
        "colour_conflict": (BUS, "A blue bus is driving down a wide city street."),
        "object_conflict": (ZEBRA, "Two zebras with antlers grazing on dry grass in a field."),
    }
    for expected, (seed, caption) in cases.items():
        assert f.reason(f.score(seed, caption), rules) == expected, (expected, f.score(seed, caption))
    assert f.reason(f.score(*cases[None]), rules, judge_contradicts=True) == "judge_contradiction"
    assert f.reason(f.score(*cases[None]), rules, judge_contradicts=None) is None
    # thresholds are configuration: relaxed, the same captions pass
    loose = f.FaithfulnessRules(min_seed_coverage=0.0, max_count_conflicts=1,
                                max_colour_conflicts=1, max_object_conflicts=1)
    assert all(f.reason(f.score(*pair), loose) is None for pair in cases.values())


def test_real_coco_captions_against_themselves_pass_and_against_others_mostly_fail():
    """A seed always covers itself; real captions of other images mostly do not."""
    seeds = [r["caption"] for r in coco_captions(40, offset=500)]
    rules = f.FaithfulnessRules()
    assert all(f.reason(f.score(s, s), rules) is None for s in seeds)
    others = [f.reason(f.score(s, seeds[(i + 20) % 40]), rules) for i, s in enumerate(seeds)]
    assert sum(r is not None for r in others) >= 30


def test_filter_columns_and_reasons_in_stage1_frame():
    seeds = [DOGS, BUS]
    captions = [("Three dogs chase a yellow frisbee across the park in the afternoon sun, "
                "their paws kicking up grass while a child watches from a bench nearby."),
                ("A red bus drives down a city street lined with tall glass buildings, its windows "
                "reflecting the late afternoon light as pedestrians wait at the corner.")]
    frame = pl.DataFrame({"seed_caption": seeds, "caption": captions}).with_columns(
        f.score_columns(pl.Series(seeds), pl.Series(captions)))
    assert frame["count_conflicts"].to_list() == [1, 0]
    assert frame["judge_contradicts"].null_count() == 2
    assert f.reason_column(frame, f.FaithfulnessRules(), "r").to_list() == ["count_conflict", None]
    assert CaptionFilters().faithfulness == f.FaithfulnessRules()
    with pytest.raises(ValueError, match="1 judge answers for 2 captions"):
        f.with_judgements(frame, [True])


@pytest.mark.parametrize("text, expected", [
    ('{"contradicts": "yes"}', True), ('{"contradicts": "no"}', False),
    ('{"contradicts": true}', True), ("No, it matches.", False), ("Yes.", True),
    ("I cannot tell.", None), ("", None), ('{"other": 1}', None),
])
def test_judge_answers(text, expected):
    assert f.parse_judge(text) is expected


def test_judge_asks_every_non_empty_caption_with_the_schema(tmp_path):
    """The judge sends one JSON-constrained request per non-empty caption and writes its parsed
    answer; FakeLLM answers JSON requests with schema-valid JSON."""
    llm = FakeLLM(cache_path=str(tmp_path / "cache.sqlite"))
    frame = pl.DataFrame({"seed_caption": [DOGS, BUS, BUS], "caption": ["Dogs.", "", "A bus."]})
    judged = judge_faithfulness(llm, frame)
    answers = judged["judge_contradicts"].to_list()
    assert answers[1] is None and all(a in (True, False) for a in (answers[0], answers[2]))
    schema = f.JUDGE_SCHEMA
    assert json.loads(json.dumps(schema))["required"] == ["contradicts"]
    messages = f.judge_messages(DOGS, "Dogs.")
    assert DOGS in messages[1]["content"] and "contradict" in messages[1]["content"]

