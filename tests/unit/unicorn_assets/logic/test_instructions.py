"""Stage 2 logic (unicorn_assets/logic/instructions.py): planning, the JSON schemas, every record
rule, retries, the LLaVA conversion; and each Stage 2 check on hand-built frames, passing and
failing."""

from __future__ import annotations

import json
import math
from collections import Counter
from typing import Any

import polars as pl
import pytest

from tests.support import coco_captions
from unicorn_assets.checks import to_result
from unicorn_assets.instructions import (
    PAPER_MIX,
    InstructionConfig,
    InstructionDefaults,
    run_checks,
    stage2_checks,
    turns_per_record_check,
)
from unicorn_assets.logic import quality
from unicorn_assets.logic.instructions import (
    INSTRUCTION_REJECT_SCHEMA,
    INSTRUCTION_SCHEMA,
    MODELS,
    TASK_TYPES,
    InstructionSettings,
    attempt_seed,
    clean_option,
    draw_task_type,
    draw_turns,
    extract_json,
    generate_instructions,
    image_token_ok,
    json_schema,
    json_validity,
    judge,
    load_prompts,
    mc_letter_replies,
    normalise_mix,
    plan_instructions,
    resolve_answer,
    restates,
    task_counts,
    turn_pairs,
    well_formed,
)
from unicorn_assets.logic.text import caption_sha256_series
from unicorn_resources.llm import ChatRequest, FakeLLM, SamplingParams
from unicorn_resources.llm.types import Completion
from unicorn_resources.quality_gates import QualityGates

CAPTIONS = [c["caption"] for c in coco_captions(12)]
EQUAL = {t: 1.0 for t in TASK_TYPES}
TWO = {t: (2, 2) for t in TASK_TYPES}


def captions(n: int, shards: tuple[str, ...] = ("a",)) -> pl.DataFrame:
    texts = pl.Series("caption", [CAPTIONS[i % len(CAPTIONS)] for i in range(n)], dtype=pl.String)
    return pl.DataFrame({
        "caption_id": [f"cap{i}" for i in range(n)], "seed_id": [f"seed{i}" for i in range(n)],
        "shard": [shards[i % len(shards)] for i in range(n)]}).with_columns(
        texts, caption_sha256_series(texts))


def settings(**overrides: Any) -> InstructionSettings:
    return InstructionSettings(**{"task_mix": EQUAL, "turns": TWO, **overrides})


def mc_turn(question="What colour is the bus?", options=("red", "blue", "green", "white"),
            answer="A", rationale="The bus body is painted red.") -> dict:
    return {"question": question, "options": list(options), "answer": answer,
            "rationale": rationale}


def qa_turn(question="What is on the table?", answer="A bowl of fruit.") -> dict:
    return {"question": question, "answer": answer}


def reasoning_turn() -> dict:
    return {"question": "Why might the street be wet?",
            "steps": ["People hold umbrellas.", "The asphalt reflects the lights."],
            "answer": "It has just rained."}


def verdict(task: str, turns: list[dict], finish: str = "stop", bounds=(2, 2)):
    return judge(task, json.dumps({"turns": turns}), finish, bounds, 0.9)


# --- planning ------------------------------------------------------------------------------------

def test_mix_is_normalised_and_checked():
    shares = normalise_mix(PAPER_MIX)
    assert list(shares) == list(TASK_TYPES) and sum(shares.values()) == pytest.approx(1.0)
    assert shares["question_answering"] == pytest.approx(199 / 470)
    assert normalise_mix({"multi_turn": 2})["multi_turn"] == 1.0  # missing types weigh 0
    with pytest.raises(ValueError, match="unknown task types.*'captioning'"):
        normalise_mix({"captioning": 1})
    with pytest.raises(ValueError, match="positive sum"):
        normalise_mix({"multi_turn": 0})
    with pytest.raises(ValueError, match=">= 0"):
        normalise_mix({"multi_turn": -1, "multiple_choice": 2})


def test_task_types_follow_the_mix_deterministically():
    shares = normalise_mix(PAPER_MIX)
    ids = [f"caption-{i}" for i in range(6000)]
    drawn = Counter(draw_task_type(i, shares, 7) for i in ids)
    assert drawn["multi_turn"] == 0  # weight 0 is never drawn
    for task in ("multiple_choice", "question_answering", "complex_reasoning"):
        assert drawn[task] / len(ids) == pytest.approx(shares[task], abs=0.025)
    assert [draw_task_type(i, shares, 7) for i in ids[:50]] == \
        [draw_task_type(i, shares, 7) for i in ids[:50]]
    assert [draw_task_type(i, shares, 7) for i in ids[:50]] != \
        [draw_task_type(i, shares, 8) for i in ids[:50]]  # the seed reshuffles


def test_turns_are_drawn_within_bounds():
    drawn = {draw_turns(f"c{i}", (6, 8), 1) for i in range(200)}
    assert drawn == {6, 7, 8}
    assert draw_turns("c1", (6, 8), 1) == draw_turns("c1", (6, 8), 1)
    assert draw_turns("c1", (2, 2), 1) == 2


@pytest.mark.parametrize("bad, message", [
    ({"turns": TWO | {"multi_turn": (3, 2)}}, "turns of multi_turn must satisfy"),
    ({"turns": TWO | {"multiple_choice": (0, 2)}}, "turns of multiple_choice must satisfy"),
    ({"max_attempts": 0}, "max_attempts must be at least 1"),
    ({"max_captions_per_shard": 0}, "max_captions_per_shard must be at least 1"),
    ({"task_mix": {"vqa": 1}}, "unknown task types"),
])
def test_settings_are_validated(bad, message):
    with pytest.raises(ValueError, match=message):
        settings(**bad)


def test_plan_samples_a_seeded_random_fraction_by_a_stable_hash_of_the_caption_id():
    frame = captions(400)
    plan = plan_instructions(frame, settings(sample_fraction=0.39))
    assert 0.39 * 400 - 40 < plan.height < 0.39 * 400 + 40
    # not the first N: sampled ids are spread over the shard, and the choice is per id
    assert plan["caption_id"].to_list() != frame["caption_id"].head(plan.height).to_list()
    reversed_plan = plan_instructions(frame.reverse(), settings(sample_fraction=0.39))
    assert set(reversed_plan["caption_id"]) == set(plan["caption_id"])
    other_seed = plan_instructions(frame, settings(sample_fraction=0.39, base_seed=7))
    assert set(other_seed["caption_id"]) != set(plan["caption_id"])
    # the per-shard cap still applies, to the sampled captions
    capped = plan_instructions(frame, settings(sample_fraction=0.39, max_captions_per_shard=5))
    assert capped["caption_id"].to_list() == plan["caption_id"].head(5).to_list()
    assert plan_instructions(frame, settings(sample_fraction=1.0)).height == 400
    with pytest.raises(ValueError, match="sample_fraction"):
        settings(sample_fraction=0.0)


def test_plan_caps_captions_per_shard_and_keeps_lineage():
    frame = captions(10, shards=("a", "b"))
    plan = plan_instructions(frame, settings(max_captions_per_shard=3))
    assert plan.group_by("shard").len().sort("shard").rows() == [("a", 3), ("b", 3)]
    assert plan["caption_id"].to_list() == ["cap0", "cap1", "cap2", "cap3", "cap4", "cap5"]
    assert plan.columns == ["caption_id", "caption_sha256", "seed_id", "shard", "caption",
                            "task_type", "n_turns"]
    assert plan_instructions(frame, settings()).height == 10
    assert plan_instructions(frame, settings()).equals(plan_instructions(frame, settings()))


def test_stage2_defaults_follow_the_paper_and_a_run_config_overrides_what_it_sets():
    defaults = InstructionDefaults()
    assert (defaults.qa_pairs_min, defaults.qa_pairs_max) == (6, 8)
    assert defaults.task_mix == PAPER_MIX
    assert defaults.settings().max_captions_per_shard is None  # 0: every caption
    assert defaults.settings().turns["multi_turn"] == (2, 3)
    assert defaults.sampling().max_tokens == 8 * defaults.max_tokens_per_turn
    assert set(InstructionConfig().model_dump().values()) == {None}
    assert set(InstructionConfig.model_fields) == set(InstructionDefaults.model_fields)
    chosen = defaults.overridden_by(InstructionConfig(qa_pairs_max=7, temperature=0.0))
    assert (chosen.qa_pairs_min, chosen.qa_pairs_max, chosen.temperature) == (6, 7, 0.0)
    assert chosen.sampling().max_tokens == 7 * defaults.max_tokens_per_turn


def test_every_task_has_a_versioned_prompt_that_takes_the_caption_and_turns():
    prompts = load_prompts("v1")
    assert sorted(prompts) == sorted(TASK_TYPES)
    for task, prompt in prompts.items():
        assert prompt.ref == f"stage2_{task}/v1"
        user = prompt.messages(caption="A red bus.", n_turns=3)[-1]["content"]
        assert '"A red bus."' in user and "3" in user and "JSON" in user and "$" not in user
    with pytest.raises(FileNotFoundError, match="known versions: v1.yaml"):
        load_prompts("v9")


# --- JSON schemas ---------------------------------------------------------------------------------

@pytest.mark.parametrize("task", TASK_TYPES)
def test_schema_pins_the_turn_count_and_has_no_refs(task):
    schema = json_schema(task, 3)
    assert "$ref" not in json.dumps(schema) and "$defs" not in schema
    turns = schema["properties"]["turns"]
    assert (turns["minItems"], turns["maxItems"]) == (3, 3)
    assert turns["items"]["type"] == "object" and "question" in turns["items"]["required"]
    # a schema-shaped answer validates against the task's pydantic model
    fake = FakeLLM(cache_enabled=False).generate(
        [ChatRequest.of([{"role": "user", "content": "x"}], seed=1, json_schema=schema)],
        SamplingParams())[0]
    assert len(MODELS[task].model_validate_json(fake.text).turns) == 3


def test_multiple_choice_schema_constrains_the_answer_to_a_letter():
    item = json_schema("multiple_choice", 2)["properties"]["turns"]["items"]["properties"]
    assert item["answer"]["enum"] == ["A", "B", "C", "D"]
    assert (item["options"]["minItems"], item["options"]["maxItems"]) == (4, 4)


# --- parsing and the record rules -----------------------------------------------------------------

def test_extract_json_finds_the_object_in_prose():
    assert extract_json('Sure! ```json\n{"turns": []}\n``` done') == {"turns": []}
    assert extract_json('{"a": "two\nlines"}') == {"a": "two\nlines"}  # raw newline
    with pytest.raises(ValueError, match="no JSON object"):
        extract_json("no braces here")
    with pytest.raises(ValueError):
        extract_json('{"turns": [')


@pytest.mark.parametrize("task, turns", [
    ("multiple_choice", [mc_turn(), mc_turn("How many wheels are visible?",
                                            ["two", "four", "six", "none"], "B", "Four show.")]),
    ("question_answering", [qa_turn(), qa_turn("Where is the cat?", "On the sofa.")]),
    ("complex_reasoning", [reasoning_turn(), reasoning_turn() | {"question": "What season?"}]),
    ("multi_turn", [qa_turn(), qa_turn("Is any of it cut?", "Yes, one apple is sliced.")]),
])
def test_valid_outputs_become_llava_conversations(task, turns):
    result = verdict(task, turns)
    assert result.reason is None
    conv = result.conversation
    assert [t["from"] for t in conv] == ["human", "gpt", "human", "gpt"]
    assert conv[0]["value"].startswith("<image>\n") and image_token_ok(conv) and well_formed(conv)
    assert conv[2]["value"].startswith(turns[1]["question"]) and "<image>" not in conv[2]["value"]


def test_multiple_choice_reply_is_the_letter_alone_and_the_rationale_is_lineage():
    """As in the paper (LLaVA's format): the question ends with the letter instruction and the
    reply is the letter; the rationale is kept in the record's mc_rationale column."""
    result = verdict("multiple_choice", [mc_turn(), mc_turn(answer="white", rationale="Pale.")])
    conv = result.conversation
    assert conv[0]["value"] == ("<image>\nWhat colour is the bus?\nA. red\nB. blue\nC. green\n"
                                "D. white\nAnswer with the option's letter from the given choices "
                                "directly.")
    assert conv[1]["value"] == "A"
    assert conv[3]["value"] == "D"  # an answer given as option text becomes its letter
    assert result.mc_rationale == ["The bus body is painted red.", "Pale."]
    assert mc_letter_replies(conv)
    assert verdict("question_answering", [qa_turn(), qa_turn()]).mc_rationale is None


def test_reasoning_conversion_numbers_the_steps():
    conv = verdict("complex_reasoning", [reasoning_turn(), reasoning_turn()]).conversation
    assert conv[1]["value"] == ("1. People hold umbrellas.\n2. The asphalt reflects the lights.\n"
                                "Answer: It has just rained.")


def test_option_labels_the_model_wrote_are_removed():
    assert clean_option("B. blue") == "blue" and clean_option("(C) a green car") == "a green car"
    assert clean_option("a red bus") == "a red bus" and clean_option("D") == ""
    conv = verdict("multiple_choice", [mc_turn(options=["A. red", "B) blue", "C. green", "D. tan"]),
                                       mc_turn()]).conversation
    assert "\nA. red\nB. blue\n" in conv[0]["value"]


def test_resolve_answer():
    options = ["red", "blue", "green", "white"]
    assert [resolve_answer(a, options) for a in ("B", "(C)", "D.", " a ", "Blue", "green!")] == \
        ["B", "C", "D", "A", "B", "C"]
    assert resolve_answer("purple", options) is None
    assert resolve_answer("A red bus", options) is None  # a word, not a letter
    assert resolve_answer("E", options) is None
    assert resolve_answer("B. blue", options) == "B" and resolve_answer("(C) green", options) == "C"


@pytest.mark.parametrize("answer", ["A. blue", "(A) blue", "A) white", "d. red"])
def test_an_answer_whose_letter_and_text_disagree_is_refused(answer):
    options = ["red", "blue", "green", "white"]
    assert resolve_answer(answer, options) is None
    result = verdict("multiple_choice", [mc_turn(answer=answer), mc_turn()])
    assert result.conversation is None and result.reason == "answer_contradicts_option"
    assert "but the text says" in result.detail


def test_restates():
    assert restates("Is the bus red?", "The bus is red.", 0.9)
    assert restates("What is on the table?", "what is on the table", 0.9)
    assert not restates("Is the bus red or blue?", "Red.", 0.9)
    assert not restates("Is the bus red?", "Yes, the bus is red.", 0.9)  # 4/5 < 0.9
    assert not restates("Anything?", "", 0.9)


@pytest.mark.parametrize("task, text, finish, reason", [
    ("question_answering", '{"turns": [{"question": "What is', "length", "truncated"),
    ("question_answering", '{"turns": [{"question": "What is', "stop", "invalid_json"),
    ("question_answering", "I cannot do that.", "stop", "invalid_json"),
    ("question_answering", json.dumps({"turns": [{"question": "Q?"}] * 2}), "stop",
     "schema_mismatch"),
    ("multiple_choice", json.dumps({"turns": [mc_turn() | {"options": ["a", "b", "c"]}] * 2}),
     "stop", "schema_mismatch"),
    ("question_answering", json.dumps({"turns": [qa_turn()] * 3}), "stop", "wrong_turn_count"),
    ("question_answering", json.dumps({"turns": [qa_turn(), qa_turn(answer="  ")]}), "stop",
     "empty_turn"),
    ("question_answering", json.dumps({"turns": [qa_turn(), qa_turn(answer="...")]}), "stop",
     "empty_turn"),
    ("multiple_choice", json.dumps({"turns": [mc_turn(options=["A", "B", "C", "D"])] * 2}),
     "stop", "empty_turn"),
    ("question_answering",
     json.dumps({"turns": [qa_turn(question="<image> What is here?"), qa_turn()]}), "stop",
     "image_token"),
    ("multiple_choice", json.dumps({"turns": [mc_turn(options=["red", "Red.", "blue", "tan"]),
                                              mc_turn()]}), "stop", "options_not_distinct"),
    ("multiple_choice", json.dumps({"turns": [mc_turn(answer="purple"), mc_turn()]}), "stop",
     "answer_not_in_options"),
    ("question_answering", json.dumps({"turns": [qa_turn("Is the bus red?", "The bus is red."),
                                                 qa_turn()]}), "stop", "restates_question"),
    ("multiple_choice", json.dumps({"turns": [mc_turn(rationale="What colour is the bus?"),
                                              mc_turn()]}), "stop", "restates_question"),
])
def test_each_rule_rejects_with_its_reason(task, text, finish, reason):
    result = judge(task, text, finish, (2, 2), 0.9)
    assert result.conversation is None and result.reason == reason and result.detail


def test_turn_count_is_checked_against_the_configured_range():
    turns = [qa_turn(), qa_turn("Where?", "Left."), qa_turn("How many?", "Three.")]
    assert verdict("multi_turn", turns, bounds=(2, 3)).reason is None
    assert verdict("multi_turn", turns[:1], bounds=(2, 3)).reason == "wrong_turn_count"


# --- rules on stored conversations -----------------------------------------------------------------

GOOD = [{"from": "human", "value": "<image>\nWhat is it?\nA. cat\nB. dog\nC. cow\nD. hen\n"
                                  "Answer with the option's letter from the given choices directly."},
        {"from": "gpt", "value": "B"}]


@pytest.mark.parametrize("conv, ok", [
    (GOOD, True),
    ([GOOD[0] | {"value": "What is it?"}, GOOD[1]], False),  # no token
    ([GOOD[0] | {"value": "<image>\n<image>\nWhat?"}, GOOD[1]], False),  # two tokens
    ([*GOOD, {"from": "human", "value": "<image>\nAnd?"}, GOOD[1]], False),  # a later token
    ([], False),
])
def test_image_token_ok(conv, ok):
    assert image_token_ok(conv) is ok


@pytest.mark.parametrize("conv, ok", [
    (GOOD, True),
    (GOOD[:1], False),
    ([GOOD[1], GOOD[0]], False),
    ([GOOD[0], GOOD[1] | {"value": " "}], False),
    ([GOOD[0] | {"value": "<image>\n"}, GOOD[1]], False),
])
def test_well_formed(conv, ok):
    assert well_formed(conv) is ok


SUFFIX = "\nAnswer with the option's letter from the given choices directly."


@pytest.mark.parametrize("conv, ok", [
    (GOOD, True),
    ([GOOD[0], GOOD[1] | {"value": "E"}], False),
    ([GOOD[0], GOOD[1] | {"value": "B. It barks."}], False),  # the letter alone
    ([GOOD[0], GOOD[1] | {"value": "It barks."}], False),
    ([GOOD[0] | {"value": "<image>\nWhat?\nA. cat\nB. dog\nC. cow" + SUFFIX}, GOOD[1]], False),
    ([GOOD[0] | {"value": "<image>\nWhat?\nA. cat\nB. dog\nC. Dog\nD. hen" + SUFFIX}, GOOD[1]],
     False),
    ([GOOD[0] | {"value": "<image>\nWhat?\nA. cat\nB. dog\nC. cow\nD. hen"}, GOOD[1]], False),
    (GOOD[:1], False),
])
def test_mc_letter_replies(conv, ok):
    assert mc_letter_replies(conv) is ok


@pytest.mark.parametrize("conv, pairs", [
    (GOOD, 1), (GOOD * 3, 3), (GOOD[:1], 0), ([GOOD[1], GOOD[0]], 0), ([*GOOD, GOOD[0]], 1)])
def test_turn_pairs(conv, pairs):
    assert turn_pairs(conv) == pairs


# --- generation with retries ------------------------------------------------------------------------

class Scripted:
    """A completer that answers each batch from a script: a function of (request, batch number)."""

    def __init__(self, answer):
        self.answer, self.batches = answer, []

    def __call__(self, requests):
        self.batches.append(requests)
        return [Completion(text=self.answer(r, len(self.batches)), prompt_tokens=10,
                           completion_tokens=20, finish_reason="stop") for r in requests]


def valid_qa(request, batch):
    return json.dumps({"turns": [qa_turn(), qa_turn("Where is it?", "On the left.")]})


def run(plan, completer, **kw):
    return generate_instructions(plan, load_prompts("v1"), completer,
                                 kw.pop("settings", settings(task_mix={"question_answering": 1})),
                                 structured=kw.pop("structured", True), model_id="test:model",
                                 sampling={"temperature": 0.7})


def test_one_batch_when_every_output_is_valid():
    plan = plan_instructions(captions(5), settings(task_mix={"question_answering": 1}))
    completer = Scripted(valid_qa)
    result = run(plan, completer)
    assert [len(b) for b in completer.batches] == [5] and result.batch_sizes == [5]
    assert result.records.height == 5 and result.rejects.height == 0
    assert result.records.schema == INSTRUCTION_SCHEMA
    assert result.records["attempts"].to_list() == [1] * 5
    first = completer.batches[0][0]
    assert first["json_schema"] == json_schema("question_answering", 2)
    assert first["seed"] == attempt_seed(4321, "cap0", 0)
    assert CAPTIONS[0] in first["messages"][-1]["content"]
    row = result.records.row(0, named=True)
    assert row["model_id"] == "test:model" and row["prompt_version"] == "stage2_question_answering/v1"
    assert row["prompt_tokens"] == 10 and row["completion_tokens"] == 20
    assert json.loads(row["task_mix"])["question_answering"] == 1.0
    assert json.loads(row["sampling"]) == {"temperature": 0.7}


def test_invalid_outputs_are_retried_with_new_seeds_then_rejected_with_reasons():
    plan = plan_instructions(captions(4), settings(task_mix={"question_answering": 1}))

    def answer(request, batch):
        if request["messages"][-1]["content"].count(CAPTIONS[0]):  # cap0: never valid
            return "not json"
        return "oops" if batch == 1 and CAPTIONS[1] in request["messages"][-1]["content"] \
            else valid_qa(request, batch)

    completer = Scripted(answer)
    result = run(plan, completer, settings=settings(task_mix={"question_answering": 1},
                                                    max_attempts=3))
    assert [len(b) for b in completer.batches] == [4, 2, 1]  # only the invalid ones again
    assert [r["seed"] for b in completer.batches for r in b if r["messages"] ==
            completer.batches[0][0]["messages"]] == [attempt_seed(4321, "cap0", k) for k in range(3)]
    records = {r["caption_id"]: r for r in result.records.iter_rows(named=True)}
    assert records["cap1"]["attempts"] == 2 and records["cap1"]["attempt_reasons"] == ["invalid_json"]
    assert records["cap1"]["sampling_seed"] == attempt_seed(4321, "cap1", 1)
    assert records["cap1"]["prompt_tokens"] == 20  # summed over attempts
    assert records["cap2"]["attempts"] == 1
    reject = result.rejects.row(0, named=True)
    assert result.rejects.schema == INSTRUCTION_REJECT_SCHEMA
    assert (reject["caption_id"], reject["reason"], reject["attempts"]) == ("cap0", "invalid_json", 3)
    assert reject["attempt_reasons"] == ["invalid_json"] * 3 and reject["raw_output"] == "not json"
    assert "no JSON object" in reject["detail"]
    # none silently dropped
    assert sorted(result.records["caption_id"].to_list() + result.rejects["caption_id"].to_list()) \
        == plan["caption_id"].to_list()
    rate, attempts = json_validity(result.records, result.rejects)
    assert attempts == 7 and rate == pytest.approx(3 / 7)


def test_without_structured_output_the_prompt_alone_asks_for_json():
    plan = plan_instructions(captions(2), settings(task_mix={"question_answering": 1}))
    completer = Scripted(lambda r, b: "Here you go: " + valid_qa(r, b))
    result = run(plan, completer, structured=False)
    assert all(r["json_schema"] is None for r in completer.batches[0])
    assert "JSON" in completer.batches[0][0]["messages"][-1]["content"]
    assert result.records.height == 2


def test_an_empty_plan_asks_nothing():
    plan = plan_instructions(captions(0), settings())
    completer = Scripted(valid_qa)
    result = run(plan, completer)
    assert completer.batches == [] and result.records.height == 0 and result.rejects.height == 0


def test_a_short_completion_list_is_an_error():
    plan = plan_instructions(captions(2), settings(task_mix={"question_answering": 1}))
    with pytest.raises(ValueError, match="1 completions for 2 requests"):
        run(plan, lambda requests: Scripted(valid_qa)(requests)[:1])


# --- each Stage 2 check on hand-built frames ----------------------------------------------------------

CHECKS = {f"{check.asset}:{check.name}": check for check in stage2_checks}
GATES = QualityGates()


def record(i: int, task: str = "question_answering", conv=None, **over: Any) -> dict:
    conv = conv or [{"from": "human", "value": f"<image>\nQuestion {i}?"},
                    {"from": "gpt", "value": f"Answer {i}."}]
    return {"id": f"r{i}", "caption_id": f"c{i}", "seed_id": f"s{i}", "shard": "a",
            "task_type": task, "n_turns": len(conv) // 2, "model_id": "m", "prompt_version": "p/v1",
            "prompt_digest": "d", "sampling": "{}", "sampling_seed": i, "attempts": 1,
            "attempt_reasons": [], "prompt_tokens": 1, "completion_tokens": 1,
            "task_mix": json.dumps(normalise_mix({"question_answering": 1})),
            "conversations": conv, **over}


def records(rows: list[dict]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema=INSTRUCTION_SCHEMA)


def rejects(reasons: list[str], attempts: int = 1) -> pl.DataFrame:
    rows = []
    for i, reason in enumerate(reasons):
        row = record(100 + i, attempts=attempts, attempt_reasons=[reason] * attempts)
        row.pop("conversations")
        rows.append(row | {"reason": reason, "detail": "why", "raw_output": "raw"})
    return pl.DataFrame(rows, schema=INSTRUCTION_REJECT_SCHEMA)


def check(name: str, **inputs: Any):
    """The check's result on one shard's frames: `data` is the checked asset's frame."""
    rule = CHECKS[name]
    names = {"data": rule.asset, "rejects": "instruction_rejects", "instructions": "instructions"}
    frames = {names[key]: frame for key, frame in inputs.items()}
    return to_result(rule.outcome({"a": frames}, GATES))


def test_schema_and_id_checks():
    good = records([record(i) for i in range(3)])
    assert check("instructions:schema", data=good).passed
    assert not check("instructions:schema", data=good.drop("conversations")).passed
    assert check("instructions:unique_ids", data=good).passed
    assert not check("instructions:unique_ids", data=pl.concat([good, good.head(1)])).passed
    assert check("instructions:non_empty", data=good).passed
    assert not check("instructions:non_empty", data=good.clear()).passed
    assert check("instruction_rejects:schema", data=rejects(["invalid_json"])).passed
    assert not check("instruction_rejects:schema",
                     data=rejects(["invalid_json"]).drop("raw_output")).passed


def test_reject_rate_check():
    good = records([record(i) for i in range(3)])
    assert check("instructions:reject_rate", data=good,
                 rejects=rejects(["empty_turn"] * 3)).passed  # 50 %
    result = check("instructions:reject_rate", data=good.head(1),
                   rejects=rejects(["empty_turn"] * 19))  # 95 % > 90 %
    assert not result.passed and result.metadata["rejects_empty_turn"].value == 19  # a number


def test_json_validity_check():
    retried = record(1, attempts=2, attempt_reasons=["invalid_json"])
    good = records([record(0), retried])
    passing = check("instructions:json_validity_rate", instructions=good,
                    rejects=rejects(["restates_question"], attempts=3))  # 1 bad of 6 attempts
    assert passing.passed and passing.metadata["rate"].value == pytest.approx(5 / 6)
    failing = check("instructions:json_validity_rate", instructions=good,
                    rejects=rejects(["schema_mismatch", "truncated"], attempts=3))  # 7 bad of 9
    assert not failing.passed and failing.metadata["measured"].value == 9


def test_task_mix_check():
    mix = json.dumps(normalise_mix({"question_answering": 1, "multiple_choice": 1}))
    rows = [record(i, task=("question_answering", "multiple_choice")[i % 2], task_mix=mix)
            for i in range(40)]
    assert check("instructions:task_mix", data=records(rows)).passed
    skewed = [r | {"task_type": "question_answering"} for r in rows]
    result = check("instructions:task_mix", data=records(skewed))
    assert not result.passed and sorted(result.metadata["off"].data) == \
        ["multiple_choice", "question_answering"]
    mixed = [rows[0] | {"task_mix": json.dumps(normalise_mix({"multi_turn": 1}))}, *rows[1:]]
    assert not check("instructions:task_mix", data=records(mixed)).passed


PAPER = normalise_mix(PAPER_MIX)


def mixed_records(counts: dict[str, int], mix: dict[str, float]) -> pl.DataFrame:
    tasks = [task for task, n in counts.items() for _ in range(n)]
    return records([record(i, task=task, task_mix=json.dumps(mix)) for i, task in enumerate(tasks)])


def test_task_mix_check_says_when_a_shard_is_too_small_to_judge():
    # 12 records in the paper's proportions (171 : 199 : 100): 4, 5, 3
    result = check("instructions:task_mix", data=mixed_records(
        {"multiple_choice": 4, "question_answering": 5, "complex_reasoning": 3}, PAPER))
    minimum = result.metadata["min_records"].value
    assert result.passed and result.metadata["too_small_to_judge"].value is True
    assert "too small to judge: 12 records" in result.description
    assert f"needs at least {minimum}" in result.description
    # the minimum: z^2 p (1 - p) / tolerance^2 at the widest share (question answering, 0.42)
    z = quality._mix_z(GATES.instruction_mix_alpha, 4)
    p = PAPER["question_answering"]
    assert minimum == math.ceil(z * z * p * (1 - p) / GATES.instruction_mix_tolerance ** 2)
    for name in ("share_multiple_choice", "lower_multiple_choice", "upper_multiple_choice",
                 "expected_multiple_choice"):
        assert isinstance(result.metadata[name].value, float), name  # numbers, plotted


def test_task_mix_check_fails_a_small_shard_that_is_off_beyond_chance():
    # 12 records, every one multiple choice where the paper asks 36 %: failed at 12 records
    result = check("instructions:task_mix", data=mixed_records({"multiple_choice": 12}, PAPER))
    assert not result.passed
    assert result.metadata["off"].data == ["multiple_choice"]  # 0 of 12 QA is still possible
    assert "check stage2.task_mix" in result.description


def test_task_mix_check_judges_a_large_shard_to_the_tolerance():
    n = quality.mix_min_records(PAPER, GATES.instruction_mix_tolerance,
                                GATES.instruction_mix_alpha, 4)
    share = {"multiple_choice": 0.364, "question_answering": 0.423, "complex_reasoning": 0.213}
    close = {t: round(s * n) for t, s in share.items()}
    judged = check("instructions:task_mix", data=mixed_records(close, PAPER))
    assert judged.passed and judged.metadata["too_small_to_judge"].value is False
    # 12 points too few multiple-choice records, made question answering: off beyond 0.05
    skew = {"multiple_choice": round(0.244 * n), "question_answering": round(0.543 * n),
            "complex_reasoning": close["complex_reasoning"]}
    result = check("instructions:task_mix", data=mixed_records(skew, PAPER))
    assert not result.passed and "multiple_choice" in result.metadata["off"].data


def test_wilson_interval_matches_a_hand_computation():
    # 0 of 10 at z = 2: upper = z^2 / (n + z^2) = 4 / 14
    assert quality.wilson_interval(0, 10, 2.0) == pytest.approx((0.0, 4 / 14))
    low, high = quality.wilson_interval(5, 10, 2.0)  # centred on 0.5, half-width 2*sqrt(.025+.01)/1.4
    assert (low + high) / 2 == pytest.approx(0.5)
    assert high - 0.5 == pytest.approx(2 * math.sqrt(0.025 + 0.01) / 1.4)


def test_json_validity_check_judges_first_attempt_and_final_validity():
    first_bad = record(1, attempts=2, attempt_reasons=["invalid_json"])
    good = records([record(0), first_bad])
    strict = QualityGates(instruction_min_json_validity=0.0,
                          instruction_min_json_valid_first_attempt=0.9)
    outcome = CHECKS["instructions:json_validity_rate"].outcome(
        {"a": {"instructions": good, "instruction_rejects": rejects([])}}, strict)
    assert not outcome.passed and outcome.metadata["json_valid_first_attempt"] == 0.5
    assert "first attempt 50.0% (min 90%)" in outcome.description
    assert CHECKS["instructions:json_validity_rate"].outcome(
        {"a": {"instructions": records([record(0)]), "instruction_rejects": rejects([])}},
        strict).passed
    # two of three records end in invalid JSON: final validity 1/3 under the default 0.5
    final = CHECKS["instructions:json_validity_rate"].outcome(
        {"a": {"instructions": records([record(0)]),
               "instruction_rejects": rejects(["invalid_json", "truncated"])}},
        QualityGates(instruction_min_json_validity=0.0))
    assert not final.passed and final.metadata["json_valid_final"] == pytest.approx(1 / 3)
    # a reject that failed a record rule had valid JSON: final validity 2/3 passes
    assert CHECKS["instructions:json_validity_rate"].outcome(
        {"a": {"instructions": records([record(0)]),
               "instruction_rejects": rejects(["restates_question", "invalid_json"])}},
        QualityGates(instruction_min_json_validity=0.0)).passed


def test_mc_rationale_check():
    with_reason = record(0, "multiple_choice", GOOD, mc_rationale=["a dog barks"])
    without = record(1, "multiple_choice", GOOD, mc_rationale=[""])
    assert check("instructions:mc_rationale", data=records([with_reason, record(2)])).passed
    result = check("instructions:mc_rationale", data=records([with_reason, without, without]))
    assert not result.passed and result.metadata["mc_rationale_share"].value == pytest.approx(1 / 3)
    assert check("instructions:mc_rationale", data=records([record(2)])).passed  # none to judge


def test_mc_letter_reply_check():
    good = records([record(0, "multiple_choice", GOOD), record(1)])  # QA records are not examined
    assert check("instructions:mc_letter_reply", data=good).passed
    bad = records([record(0, "multiple_choice", [GOOD[0], GOOD[1] | {"value": "B. It barks."}])])
    result = check("instructions:mc_letter_reply", data=bad)
    assert not result.passed and result.metadata["failing_ids"].data == ["r0"]


def test_turns_per_record_check_counts_stored_pairs_against_the_configured_bounds():
    bounds = {t: (2, 3) for t in TASK_TYPES}
    rule = turns_per_record_check(bounds)
    two, one, four = GOOD * 2, GOOD, GOOD * 4
    frame = records([record(0, "multiple_choice", two), record(1, conv=one),
                     record(2, conv=four), record(3, conv=[*two, GOOD[0]])])
    outcome = rule.outcome({"a": {"instructions": frame}}, GATES)
    assert not outcome.passed and outcome.metadata["failing_ids"] == ["r1", "r2", "r3"]
    assert "qa_pairs_min/max" in outcome.description
    assert rule.outcome({"a": {"instructions": frame.head(1)}}, GATES).passed


def test_the_run_checks_judge_turns_with_the_runs_bounds():
    settings = InstructionDefaults(qa_pairs_min=1, qa_pairs_max=1).settings()
    (turns,) = [c for c in run_checks(settings) if c.name == "turns_per_record"]
    frame = records([record(0, conv=GOOD)])
    assert turns.outcome({"a": {"instructions": frame}}, GATES).passed
    assert not CHECKS["instructions:turns_per_record"].outcome(  # the paper's 6-8
        {"a": {"instructions": frame}}, GATES).passed


def test_conversation_shape_check_holds_the_image_token_rule():
    assert check("instructions:conversation_shape", data=records([record(0), record(1)])).passed
    two = [{"from": "human", "value": "<image>\nQ? <image>"}, {"from": "gpt", "value": "A."}]
    none = [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A."}]
    result = check("instructions:conversation_shape",
                   data=records([record(0), record(1, conv=two), record(2, conv=none)]))
    assert not result.passed and result.metadata["failing_ids"].data == ["r1", "r2"]


def test_conversation_shape_check():
    assert check("instructions:conversation_shape", data=records([record(0)])).passed
    empty = [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": ""}]
    assert not check("instructions:conversation_shape", data=records([record(0, conv=empty)])).passed


def test_known_reasons_check():
    assert check("instruction_rejects:known_reasons", data=rejects(["invalid_json"])).passed
    assert not check("instruction_rejects:known_reasons", data=rejects(["mystery"])).passed


def test_quality_rules_for_stage2():
    assert quality.min_rate(0.9, 0.8, "JSON validity", 10).passed
    assert not quality.min_rate(0.7, 0.8, "JSON validity", 10).passed
    assert quality.mix_within_tolerance({}, {"a": 1.0}, 0.05).passed  # nothing to measure
    # 4 records cannot show a 25 % share precisely: its Wilson interval lets 2 of 4 pass
    assert quality.mix_within_tolerance({"a": 2, "b": 2}, {"a": 0.25, "b": 0.75}, 0.05).passed
    assert not quality.mix_within_tolerance({"a": 200, "b": 200}, {"a": 0.25, "b": 0.75},
                                            0.05).passed
    frame = pl.DataFrame({"id": ["x", "y"], "v": [1, 2]})
    assert quality.rows_satisfy(frame, "v", lambda v: v > 0, "positive").passed
    assert quality.rows_satisfy(frame, "v", lambda v: v > 1, "big").metadata["failing_ids"] == ["x"]


def test_task_counts_list_every_type():
    frame = records([record(0), record(1, "multiple_choice", GOOD)])
    assert task_counts(frame) == {"multiple_choice": 1, "question_answering": 1,
                                  "complex_reasoning": 0, "multi_turn": 0}
