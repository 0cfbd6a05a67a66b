"""Stage 2: turn each caption into one instruction conversation about its image.

Task types (Unicorn v2, plus a multi-turn dialogue): multiple choice (4 options, the answer
letter and a rationale), question answering (short answers), complex reasoning (step-by-step
answers) and multi-turn (follow-up questions). The LLM answers in JSON (schema-constrained where
the backend supports it); the JSON is validated with pydantic, then by the record rules. Invalid
outputs are retried with a new sampling seed; what is still invalid becomes a reject with its
reason. Records are LLaVA/Bunny conversations.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import polars as pl
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from unicorn_assets.logic.prompts import PromptSet, load_prompt_set
from unicorn_assets.logic.text import excerpt, normalise_ws, stable_id, stable_int, words

TASK_TYPES = ("multiple_choice", "question_answering", "complex_reasoning", "multi_turn")
LETTERS = ("A", "B", "C", "D")
IMAGE_TOKEN = "<image>"
# LLaVA's multiple-choice instruction (as in the Unicorn paper): the reply is the letter alone
MC_SUFFIX = "Answer with the option's letter from the given choices directly."

# Reasons an attempt fails; the first three mean the output was not valid JSON for the schema.
JSON_REASONS = ("truncated", "invalid_json", "schema_mismatch")
RULE_REASONS = ("wrong_turn_count", "empty_turn", "image_token", "options_not_distinct",
                "answer_not_in_options", "answer_contradicts_option", "restates_question")
REJECT_REASONS = JSON_REASONS + RULE_REASONS

CONVERSATION = pl.List(pl.Struct({"from": pl.String, "value": pl.String}))
_LINEAGE = {
    "caption_id": pl.String,
    "caption_sha256": pl.String,  # copied from the caption row the record was made from
    "seed_id": pl.String,
    "shard": pl.String,
    "task_type": pl.String,
    "n_turns": pl.Int32,  # QA pairs asked for
    "model_id": pl.String,
    "prompt_version": pl.String,
    "prompt_digest": pl.String,
    "sampling": pl.String,  # JSON of the sampling parameters
    "sampling_seed": pl.Int64,  # of the last attempt
    "attempts": pl.Int32,
    "attempt_reasons": pl.List(pl.String),  # why each failed attempt failed, in order
    "prompt_tokens": pl.Int32,  # summed over attempts
    "completion_tokens": pl.Int32,
    "task_mix": pl.String,  # JSON of the configured task-type shares
    "mc_rationale": pl.List(pl.String),  # multiple choice: each turn's rationale (the reply is
                                         # the letter alone); null for the other task types
}
INSTRUCTION_SCHEMA = pl.Schema({"id": pl.String, **_LINEAGE, "conversations": CONVERSATION})
INSTRUCTION_REJECT_SCHEMA = pl.Schema({"id": pl.String, **_LINEAGE, "reason": pl.String,
                                       "detail": pl.String, "raw_output": pl.String})


# --- the JSON each task type asks for -------------------------------------------------------

class _Output(BaseModel):
    model_config = ConfigDict(extra="ignore")  # keys the model adds on its own are dropped


class MultipleChoiceTurn(_Output):
    question: str
    options: list[str] = Field(min_length=4, max_length=4)
    # The schema constrains decoding to a letter; the rules also accept an option's text.
    answer: str = Field(json_schema_extra={"enum": list(LETTERS)})
    rationale: str


class AnswerTurn(_Output):
    question: str
    answer: str


class ReasoningTurn(_Output):
    question: str
    steps: list[str] = Field(min_length=2, max_length=4)
    answer: str


T = TypeVar("T", MultipleChoiceTurn, AnswerTurn, ReasoningTurn)


class Dialogue(_Output, Generic[T]):
    turns: list[T]


MODELS: dict[str, type[Dialogue]] = {
    "multiple_choice": Dialogue[MultipleChoiceTurn],
    "question_answering": Dialogue[AnswerTurn],
    "complex_reasoning": Dialogue[ReasoningTurn],
    "multi_turn": Dialogue[AnswerTurn],
}


def _inline_refs(node: Any, defs: Mapping[str, Any]) -> Any:
    if isinstance(node, dict):
        if "$ref" in node:
            return _inline_refs(defs[node["$ref"].rsplit("/", 1)[-1]], defs)
        return {k: _inline_refs(v, defs) for k, v in node.items()}
    if isinstance(node, list):
        return [_inline_refs(v, defs) for v in node]
    return node


def json_schema(task_type: str, n_turns: int) -> dict[str, Any]:
    """The JSON schema of a task type's answer with exactly `n_turns` turns, refs inlined (some
    constrained decoders do not follow $ref)."""
    schema = MODELS[task_type].model_json_schema()
    schema = _inline_refs({k: v for k, v in schema.items() if k != "$defs"},
                          schema.get("$defs", {}))
    schema["properties"]["turns"].update(minItems=n_turns, maxItems=n_turns)
    return schema


# --- planning ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class InstructionSettings:
    task_mix: Mapping[str, float]  # weights; normalised to shares
    turns: Mapping[str, tuple[int, int]]  # task type -> (min, max) QA pairs per record
    base_seed: int = 4321
    max_attempts: int = 3
    restate_threshold: float = 0.9  # answer/question word-set Jaccard that counts as restating
    max_captions_per_shard: int | None = None
    sample_fraction: float = 1.0  # share of captions used, drawn by a stable hash of the id

    def __post_init__(self) -> None:
        self.shares()
        for task in TASK_TYPES:
            low, high = self.turns[task]
            if not 1 <= low <= high:
                raise ValueError(f"turns of {task} must satisfy 1 <= min <= max, got {low}-{high}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts}")
        if self.max_captions_per_shard is not None and self.max_captions_per_shard < 1:
            raise ValueError("max_captions_per_shard must be at least 1, or null for every caption")
        if not 0 < self.sample_fraction <= 1:
            raise ValueError(f"sample_fraction must be in (0, 1], got {self.sample_fraction}")

    def shares(self) -> dict[str, float]:
        return normalise_mix(self.task_mix)


def normalise_mix(mix: Mapping[str, float]) -> dict[str, float]:
    unknown = sorted(set(mix) - set(TASK_TYPES))
    if unknown:
        raise ValueError(f"task_mix names unknown task types {unknown}; known: {list(TASK_TYPES)}")
    if any(w < 0 for w in mix.values()) or sum(mix.values()) <= 0:
        raise ValueError(f"task_mix weights must be >= 0 with a positive sum, got {dict(mix)}")
    total = sum(mix.values())
    return {t: mix.get(t, 0.0) / total for t in TASK_TYPES}


def draw_task_type(caption_id: str, shares: Mapping[str, float], base_seed: int) -> str:
    """A task type drawn with the configured shares, the same every time for a caption."""
    u = stable_int(base_seed, "task", caption_id) / 2**31
    acc = 0.0
    for task in TASK_TYPES:
        acc += shares.get(task, 0.0)
        if u < acc:
            return task
    return [t for t in TASK_TYPES if shares.get(t, 0.0) > 0][-1]


def draw_turns(caption_id: str, bounds: tuple[int, int], base_seed: int) -> int:
    low, high = bounds
    return low + stable_int(base_seed, "turns", caption_id) % (high - low + 1)


def attempt_seed(base_seed: int, caption_id: str, attempt: int) -> int:
    return stable_int(base_seed, caption_id, attempt)


def sampled(caption_id: str, fraction: float, base_seed: int) -> bool:
    """Whether a caption is in the seeded random sample: a stable hash of its id and the seed,
    so the same caption is in or out on every run and in every shard order."""
    return fraction >= 1 or stable_int(base_seed, "sample", caption_id) / 2**31 < fraction


def plan_instructions(captions: pl.DataFrame, settings: InstructionSettings) -> pl.DataFrame:
    """One row per record to make: the caption, its task type and its number of turns. With
    `sample_fraction` < 1, a seeded random share of the captions (by a stable hash of the caption
    id); then with `max_captions_per_shard`, at most the first N of those per shard. Each row
    keeps the caption's `caption_sha256`, so the record says which text it is about."""
    shares = settings.shares()
    if settings.sample_fraction < 1:
        captions = captions.filter(pl.Series([
            sampled(c, settings.sample_fraction, settings.base_seed)
            for c in captions["caption_id"].to_list()], dtype=pl.Boolean))
    if settings.max_captions_per_shard is not None:
        captions = captions.filter(
            pl.int_range(pl.len()).over("shard") < settings.max_captions_per_shard)
    rows = []
    for caption_id, digest, seed_id, shard, caption in captions.select(
            "caption_id", "caption_sha256", "seed_id", "shard", "caption").iter_rows():
        task = draw_task_type(caption_id, shares, settings.base_seed)
        rows.append({"caption_id": caption_id, "caption_sha256": digest, "seed_id": seed_id,
                     "shard": shard, "caption": caption, "task_type": task,
                     "n_turns": draw_turns(caption_id, settings.turns[task], settings.base_seed)})
    return pl.DataFrame(rows, schema={"caption_id": pl.String, "caption_sha256": pl.String,
                                      "seed_id": pl.String, "shard": pl.String,
                                      "caption": pl.String, "task_type": pl.String,
                                      "n_turns": pl.Int32})


def load_prompts(version: str) -> dict[str, PromptSet]:
    return {task: load_prompt_set(f"stage2_{task}", version) for task in TASK_TYPES}


# --- validation -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Verdict:
    conversation: list[dict[str, str]] | None
    reason: str | None = None
    detail: str = ""
    mc_rationale: list[str] | None = None  # multiple choice: each turn's rationale


def extract_json(text: str) -> Any:
    """The first JSON object in `text` (a model without constrained decoding may wrap it in
    prose or a code fence). Raw newlines inside strings are accepted: llama.cpp's JSON grammar
    allows them."""
    start = text.find("{")
    if start < 0:
        raise ValueError("no JSON object in the output")
    return json.JSONDecoder(strict=False).raw_decode(text[start:])[0]


_OPTION_LABEL = re.compile(r"^\s*(?:\(?[A-D][.):]\)?\s*|[A-D]\s*$)")
_LETTER_ANSWER = re.compile(r"^\s*\(?([A-Da-d])(?:[.):]|\)|\s*$)")


def clean_option(option: str) -> str:
    """An option without a letter label of its own ("B. red" -> "red", "B" -> ""): the letters
    are added on conversion."""
    return normalise_ws(_OPTION_LABEL.sub("", option, count=1))


def _fold(text: str) -> str:
    return " ".join(words(text))


_LABELLED_ANSWER = re.compile(r"^\s*\(?([A-Da-d])(?:[.):]|\))\s*(.+)$", re.DOTALL)


def answer_contradiction(answer: str, options: Sequence[str]) -> str | None:
    """Why an answer's letter and text disagree ("A. blue" where A is red), or None. The text
    after a letter label must contain the words of that letter's option."""
    match = _LABELLED_ANSWER.match(answer)
    if not match or not _fold(match.group(2)):
        return None
    letter, text = match.group(1).upper(), _fold(match.group(2))
    if letter not in LETTERS[: len(options)]:
        return None
    own = _fold(options[LETTERS.index(letter)])
    if f" {own} " in f" {text} ":
        return None
    other = [f"{m}. {o}" for m, o in zip(LETTERS, options) if _fold(o) == text]
    names = f", which is option {other[0]}" if other else ""
    return f"letter {letter} is {options[LETTERS.index(letter)]!r} but the text says {text!r}{names}"


def resolve_answer(answer: str, options: Sequence[str]) -> str | None:
    """The letter of the chosen option: the answer is a letter ("B", "(B)", "B."), a letter with
    its option's text ("B. blue"), or the text of one option; None when it is none of them, or
    its letter and text disagree ("A. blue" where A is red)."""
    by_text = {_fold(o): letter for letter, o in zip(LETTERS, options) if _fold(o)}
    if _fold(answer) in by_text:
        return by_text[_fold(answer)]
    if answer_contradiction(answer, options):
        return None
    match = _LETTER_ANSWER.match(answer)
    letter = match.group(1).upper() if match else None
    return letter if letter in LETTERS[: len(options)] else None


def restates(question: str, answer: str, threshold: float) -> bool:
    """True when the answer's words are (nearly) the question's words."""
    q, a = set(words(question)), set(words(answer))
    return bool(a) and len(q & a) / len(q | a) >= threshold


def _texts(turn: BaseModel) -> list[str]:
    out = []
    for value in turn.model_dump().values():
        out.extend(value if isinstance(value, list) else [value])
    return out


def _answer_text(task_type: str, turn: Any) -> str:
    if task_type == "multiple_choice":
        return turn.rationale
    if task_type == "complex_reasoning":
        return " ".join([*turn.steps, turn.answer])
    return turn.answer


def rule_violation(task_type: str, dialogue: Dialogue, bounds: tuple[int, int],
                   restate_threshold: float) -> tuple[str, str] | None:
    """The first record rule the parsed output breaks, as (reason, detail), or None."""
    turns = dialogue.turns
    if not bounds[0] <= len(turns) <= bounds[1]:
        return "wrong_turn_count", f"{len(turns)} turns, expected {bounds[0]}-{bounds[1]}"
    for i, turn in enumerate(turns, 1):
        if any(not words(t) for t in _texts(turn)):
            return "empty_turn", f"turn {i} has a field with no words"
        if any(IMAGE_TOKEN in t for t in _texts(turn)):
            return "image_token", f"turn {i} writes {IMAGE_TOKEN} itself"
        if task_type == "multiple_choice":
            options = [clean_option(o) for o in turn.options]
            if not all(map(_fold, options)):
                return "empty_turn", f"turn {i} has an option with no words: {turn.options}"
            if len({_fold(o) for o in options}) != len(options):
                return "options_not_distinct", f"turn {i} options {options}"
            conflict = answer_contradiction(turn.answer, options)
            if conflict and _fold(turn.answer) not in {_fold(o) for o in options}:
                return "answer_contradicts_option", f"turn {i} answer {turn.answer!r}: {conflict}"
            if resolve_answer(turn.answer, options) is None:
                return "answer_not_in_options", f"turn {i} answer {turn.answer!r} not in {options}"
        if restates(turn.question, _answer_text(task_type, turn), restate_threshold):
            return "restates_question", f"turn {i} answer restates {excerpt(turn.question, 80)!r}"
    return None


def to_conversation(task_type: str, dialogue: Dialogue) -> list[dict[str, str]]:
    """LLaVA/Bunny turns; the first human turn starts with the one `<image>` token."""
    conversation = []
    for i, turn in enumerate(dialogue.turns):
        question = normalise_ws(turn.question)
        if task_type == "multiple_choice":
            options = [clean_option(o) for o in turn.options]
            question += "".join(f"\n{letter}. {o}" for letter, o in zip(LETTERS, options))
            question += f"\n{MC_SUFFIX}"
            reply = resolve_answer(turn.answer, options)  # the letter alone, as in the paper
        elif task_type == "complex_reasoning":
            steps = "\n".join(f"{n}. {normalise_ws(s)}" for n, s in enumerate(turn.steps, 1))
            reply = f"{steps}\nAnswer: {normalise_ws(turn.answer)}"
        else:
            reply = normalise_ws(turn.answer)
        conversation.append({"from": "human",
                             "value": f"{IMAGE_TOKEN}\n{question}" if i == 0 else question})
        conversation.append({"from": "gpt", "value": reply})
    return conversation


def judge(task_type: str, text: str, finish_reason: str, bounds: tuple[int, int],
          restate_threshold: float) -> Verdict:
    """Parse, validate and convert one completion."""
    try:
        data = extract_json(text)
    except ValueError as err:
        reason = "truncated" if finish_reason == "length" else "invalid_json"
        return Verdict(None, reason, str(err))
    try:
        dialogue = MODELS[task_type].model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        return Verdict(None, "schema_mismatch",
                       f"{err.error_count()} error(s), first at {'.'.join(map(str, first['loc']))}: "
                       f"{first['msg']}")
    broken = rule_violation(task_type, dialogue, bounds, restate_threshold)
    if broken:
        return Verdict(None, *broken)
    rationale = ([normalise_ws(t.rationale) for t in dialogue.turns]
                 if task_type == "multiple_choice" else None)
    return Verdict(to_conversation(task_type, dialogue), mc_rationale=rationale)


# --- rules on stored conversations (the asset checks use these) ----------------------------------

def image_token_ok(conversation: Sequence[Mapping[str, str]]) -> bool:
    """Exactly one `<image>` token, in the first human turn."""
    return (bool(conversation) and conversation[0]["from"] == "human"
            and conversation[0]["value"].count(IMAGE_TOKEN) == 1
            and all(IMAGE_TOKEN not in t["value"] for t in conversation[1:]))


def well_formed(conversation: Sequence[Mapping[str, str]]) -> bool:
    """Human and gpt turns alternate, starting with human, in pairs, none without words."""
    return (len(conversation) >= 2 and len(conversation) % 2 == 0
            and all(t["from"] == ("human" if i % 2 == 0 else "gpt")
                    for i, t in enumerate(conversation))
            and all(words(t["value"].replace(IMAGE_TOKEN, "")) for t in conversation))


_OPTION_LINE = re.compile(r"^([A-D])\. (.+)$", re.MULTILINE)


def turn_pairs(conversation: Sequence[Mapping[str, str]]) -> int:
    """The number of (human, gpt) pairs, counted from the start while turns alternate."""
    pairs = 0
    for human, gpt in zip(conversation[::2], conversation[1::2]):
        if human["from"] != "human" or gpt["from"] != "gpt":
            break
        pairs += 1
    return pairs


def mc_letter_replies(conversation: Sequence[Mapping[str, str]]) -> bool:
    """Every question lists 4 distinct options A-D and ends with LLaVA's instruction to answer
    with the letter, and every reply is exactly one of the letters A-D (nothing else)."""
    if len(conversation) < 2 or len(conversation) % 2:
        return False
    for human, gpt in zip(conversation[::2], conversation[1::2]):
        options = dict(_OPTION_LINE.findall(human["value"]))
        if (sorted(options) != list(LETTERS) or len({_fold(o) for o in options.values()}) != 4
                or not human["value"].rstrip().endswith(MC_SUFFIX)
                or gpt["value"] not in LETTERS):
            return False
    return True


def turns_outside_bounds(frame: pl.DataFrame, turns: Mapping[str, tuple[int, int]]
                         ) -> list[tuple[str, str, int]]:
    """(id, task type, pairs) of every stored record whose conversation's human/gpt pairs are
    outside the configured bounds of its task type."""
    out = []
    for rid, task, conversation in frame.select("id", "task_type", "conversations").iter_rows():
        low, high = turns.get(task, (1, 0))
        pairs = turn_pairs(conversation)
        if pairs * 2 != len(conversation) or not low <= pairs <= high:
            out.append((rid, task, pairs))
    return out


# --- generation with bounded retries --------------------------------------------------------------

@dataclass
class Generation:
    records: pl.DataFrame
    rejects: pl.DataFrame
    completions: list[Any] = field(default_factory=list)  # every completion of every attempt
    batch_sizes: list[int] = field(default_factory=list)  # requests per attempt


def generate_instructions(
    plan: pl.DataFrame, prompts: Mapping[str, PromptSet],
    complete: Callable[[list[dict[str, Any]]], Sequence[Any]], settings: InstructionSettings, *,
    structured: bool, model_id: str, sampling: Mapping[str, Any],
) -> Generation:
    """Ask for every planned record in one batch, then retry the invalid ones in one batch per
    attempt (a new sampling seed each time), up to `max_attempts`.

    `complete` takes requests {"messages", "seed", "json_schema"} and returns completions with
    `.text`, `.finish_reason`, `.prompt_tokens`, `.completion_tokens`, in order. With
    `structured`, each request carries its JSON schema; otherwise the prompt alone asks for JSON.
    """
    rows = plan.to_dicts()
    for row in rows:
        row.update(attempts=0, attempt_reasons=[], prompt_tokens=0, completion_tokens=0,
                   mc_rationale=None,
                   messages=prompts[row["task_type"]].messages(caption=row["caption"],
                                                               n_turns=row["n_turns"]))
    result = Generation(records=pl.DataFrame(schema=INSTRUCTION_SCHEMA),
                        rejects=pl.DataFrame(schema=INSTRUCTION_REJECT_SCHEMA))
    accepted, pending = [], rows
    for attempt in range(settings.max_attempts):
        if not pending:
            break
        requests = []
        for row in pending:
            row["sampling_seed"] = attempt_seed(settings.base_seed, row["caption_id"], attempt)
            requests.append({"messages": row["messages"], "seed": row["sampling_seed"],
                             "json_schema": json_schema(row["task_type"], row["n_turns"])
                             if structured else None})
        completions = list(complete(requests))
        if len(completions) != len(requests):
            raise ValueError(f"{len(completions)} completions for {len(requests)} requests")
        result.completions.extend(completions)
        result.batch_sizes.append(len(requests))
        still = []
        for row, completion in zip(pending, completions):
            row["attempts"] += 1
            row["prompt_tokens"] += completion.prompt_tokens
            row["completion_tokens"] += completion.completion_tokens
            verdict = judge(row["task_type"], completion.text, completion.finish_reason,
                            settings.turns[row["task_type"]], settings.restate_threshold)
            if verdict.conversation is not None:
                row["conversations"] = verdict.conversation
                row["mc_rationale"] = verdict.mc_rationale
                accepted.append(row)
            else:
                row["attempt_reasons"].append(verdict.reason)
                row.update(reason=verdict.reason, detail=verdict.detail, raw_output=completion.text)
                still.append(row)
        pending = still

    common = {
        "model_id": model_id, "sampling": json.dumps(dict(sampling), sort_keys=True),
        "task_mix": json.dumps(settings.shares()),
    }
    result.records = _frame(accepted, prompts, common, INSTRUCTION_SCHEMA)
    result.rejects = _frame(pending, prompts, common, INSTRUCTION_REJECT_SCHEMA)
    return result


def _frame(rows: list[dict[str, Any]], prompts: Mapping[str, PromptSet], common: dict[str, Any],
           schema: pl.Schema) -> pl.DataFrame:
    out = []
    for row in rows:
        prompt = prompts[row["task_type"]]
        full = {**row, **common, "id": stable_id(row["caption_id"], prompt.ref),
                "prompt_version": prompt.ref, "prompt_digest": prompt.digest}
        out.append({name: full[name] for name in schema.names()})
    return pl.DataFrame(out, schema=schema)


# --- measures ---------------------------------------------------------------------------------------

def json_validity(records: pl.DataFrame, rejects: pl.DataFrame) -> tuple[float, int]:
    """(share of attempts whose output was valid JSON for the schema, number of attempts)."""
    attempts = int(records["attempts"].sum()) + int(rejects["attempts"].sum())
    reasons = pl.concat([records["attempt_reasons"], rejects["attempt_reasons"]]).explode()
    invalid = int(reasons.is_in(list(JSON_REASONS)).sum())
    return (1 - invalid / attempts if attempts else 1.0), attempts


def task_counts(frame: pl.DataFrame) -> dict[str, int]:
    counts = dict(frame.group_by("task_type").len().iter_rows())
    return {task: int(counts.get(task, 0)) for task in TASK_TYPES}


def reject_counts(rejects: pl.DataFrame) -> dict[str, int]:
    counts = dict(rejects.group_by("reason").len().iter_rows())
    return {reason: int(counts.get(reason, 0)) for reason in REJECT_REASONS}


def dialogue_preview(frame: pl.DataFrame, width: int = 70) -> pl.DataFrame:
    """id, task type and the first exchange as one short line, for Markdown samples."""
    first = [" / ".join(excerpt(t["value"].replace("\n", " "), width) for t in conv[:2])
             for conv in frame["conversations"].to_list()]
    return frame.select("id", "task_type", "n_turns").with_columns(
        pl.Series("first_exchange", first, dtype=pl.String))
