"""Seed faithfulness of an expanded caption: cheap deterministic signals that the caption keeps
what its seed says, and an optional LLM judge.

Signals (each a column of the caption rows, each with a reject reason and a quality_gates
threshold):

- `seed_coverage`: the share of the seed's content lemmas the caption repeats. Lemmas come from
  `lemma`, a small rule lemmatiser (irregular plurals, then suffix rules for -ies, -ves, -es, -s,
  -ing, -ed): crude, but seed and caption go through the same rules, so both forms meet.
- `count_conflicts`: counts the seed states ("two dogs", "a dog", "3 cats") that the caption
  restates differently for the same noun ("three dogs") without also saying the seed's.
- `colour_conflicts`: a colour the seed gives a noun ("red bus") where the caption gives the same
  noun only colours of other families ("blue bus"); shades fold into families (navy is blue).
- `object_conflicts`: a seed object replaced by another of its mutually exclusive class (a zebra
  described as a giraffe, a tennis court as sand dunes: the caption names a member of the class and
  never the seed's), and body parts the seed's animal cannot have (a zebra's "antlers").

Pure functions of the two texts: no model, no I/O, no Dagster.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import polars as pl

_TOKEN = re.compile(r"[a-z]+|\d+")

STOPWORDS = frozenset(["a", "an", "the", "and", "or", "but", "of", "on", "in", "at", "to", "for", "from", "with", "without", "by", "into", "onto", "over", "under", "above", "below", "near", "next", "beside", "behind", "front", "top", "its", "it", "it's", "is", "are", "was", "were", "be", "been", "being", "has", "have", "had", "do", "does", "this", "that", "these", "those", "there", "here", "their", "they", "them", "he", "she", "his", "her", "him", "we", "our", "you", "your", "i", "my", "me", "some", "any", "each", "every", "all", "both", "other", "another", "such", "very", "more", "most", "much", "many", "few", "several", "lot", "lots", "as", "so", "than", "then", "also", "just", "while", "who", "whom", "which", "what", "where", "when", "how", "up", "down", "out", "off", "about", "around", "through", "across", "along", "between", "against", "up", "can", "could", "would", "should", "will", "may", "might", "not", "no", "nor", "only", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve", "image", "picture", "photo", "photograph", "scene", "view", "shown", "showing", "show", "appears", "appear", "seen", "see", "looking", "sits", "sitting", "stands", "standing", "kind", "sort", "type", "way", "side"])

NUMBER_WORDS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
                "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "dozen": 12,
                "pair": 2, "couple": 2, "single": 1, "lone": 1}

# colour word -> family: a caption may name a shade of the seed's colour
COLOUR_FAMILY = {
    "red": "red", "crimson": "red", "scarlet": "red", "maroon": "red", "burgundy": "red",
    "pink": "pink", "magenta": "pink",
    "orange": "orange", "tan": "brown", "brown": "brown", "beige": "brown", "bronze": "brown",
    "chocolate": "brown", "yellow": "yellow", "golden": "yellow", "gold": "yellow",
    "green": "green", "olive": "green", "lime": "green", "emerald": "green",
    "blue": "blue", "navy": "blue", "azure": "blue", "turquoise": "blue", "teal": "blue",
    "cyan": "blue", "purple": "purple", "violet": "purple", "lavender": "purple",
    "white": "white", "ivory": "white", "cream": "white", "black": "black", "ebony": "black",
    "grey": "grey", "gray": "grey", "silver": "grey", "charcoal": "grey",
}

# Classes whose members exclude each other as the same object: a caption naming another member
# and never the seed's has replaced the seed's object.
EXCLUSIVE_CLASSES: dict[str, frozenset[str]] = {
    "animal": frozenset(["dog", "cat", "horse", "zebra", "giraffe", "elephant", "cow", "sheep", "bear", "bird", "deer", "moose", "elk", "goat", "pig", "lion", "tiger", "monkey", "duck", "goose", "pigeon", "seagull", "gull", "parrot", "owl", "eagle", "squirrel", "rabbit", "fox", "wolf", "camel", "kangaroo"]),
    "vehicle": frozenset(["bus", "car", "truck", "train", "motorcycle", "motorbike", "bicycle", "bike", "airplane", "plane", "jet", "helicopter", "boat", "ship", "tram", "trolley", "scooter", "van", "taxi"]),
    "sport": frozenset(["tennis", "baseball", "soccer", "football", "basketball", "frisbee", "skateboard", "surfboard", "ski", "snowboard", "golf", "volleyball"]),
    "terrain": frozenset(["court", "beach", "desert", "dune", "snow", "ocean", "runway", "pasture", "forest", "jungle", "kitchen", "bathroom", "bedroom"]),
    "adult": frozenset(["man", "woman"]),
    "child": frozenset(["boy", "girl"]),
}
# body parts -> the animals that have them (an animal seed whose caption adds one of these
# without naming an owner is described wrongly)
BODY_PARTS: dict[str, frozenset[str]] = {
    "antler": frozenset(["deer", "moose", "elk", "reindeer", "caribou"]),
    "tusk": frozenset(["elephant", "walrus", "boar", "warthog"]),
    "hump": frozenset(["camel"]),
    "beak": EXCLUSIVE_CLASSES["animal"] & frozenset(
        ["bird", "duck", "goose", "pigeon", "seagull", "gull", "parrot", "owl", "eagle"]),
    "feather": frozenset(["bird", "duck", "goose", "pigeon", "seagull", "gull", "parrot", "owl", "eagle"]),
    "trunk": frozenset(["elephant"]),  # also a tree's or a car's: only counted for animals
}

_IRREGULAR = {"men": "man", "women": "woman", "people": "person", "children": "child",
              "mice": "mouse", "teeth": "tooth", "feet": "foot", "geese": "goose",
              "knives": "knife", "leaves": "leaf", "shelves": "shelf", "wolves": "wolf",
              "calves": "calf", "halves": "half", "loaves": "loaf", "sheep": "sheep",
              "deer": "deer", "dunes": "dune", "skis": "ski", "buses": "bus", "busses": "bus",
              "glasses": "glass", "grass": "grass", "bus": "bus", "dress": "dress",
              "gray": "grey", "aeroplane": "airplane", "colour": "color", "giraffes": "giraffe"}
_DOUBLE = re.compile(r"([bdgklmnprt])\1$")


def lemma(word: str) -> str:
    """A crude lemma: irregular forms from a table, then suffix rules (documented above)."""
    w = word.lower()
    if w in _IRREGULAR:
        return _IRREGULAR[w]
    if len(w) > 4 and w.endswith("ies"):
        return w[:-3] + "y"
    if len(w) > 4 and w.endswith("ves"):
        return w[:-3] + "f"
    if len(w) > 4 and w.endswith(("ches", "shes", "sses", "xes", "zes")):
        return w[:-2]
    if len(w) > 3 and w.endswith("s") and not w.endswith(("ss", "us", "is")):
        return w[:-1]
    for suffix in ("ing", "ed"):
        if len(w) > len(suffix) + 3 and w.endswith(suffix):
            stem = w[: -len(suffix)]
            return stem[:-1] if _DOUBLE.search(stem) else stem
    return w


def tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def content_lemmas(text: str) -> set[str]:
    return {lemma(t) for t in tokens(text) if t not in STOPWORDS and not t.isdigit()
            and len(t) > 1}


def _count_of(token: str) -> int | None:
    if token.isdigit():
        return int(token)
    return NUMBER_WORDS.get(token)


def counted_nouns(text: str, articles: bool = True) -> set[tuple[int, str]]:
    """(count, noun lemma) pairs: a number (digits or a word) and the first content word within
    the next three tokens that is not a colour; with `articles`, "a"/"an" counts 1 for the word
    right after it."""
    toks = tokens(text)
    pairs = set()
    for i, tok in enumerate(toks):
        if tok in ("a", "an"):
            if not articles:
                continue
            nxt = toks[i + 1] if i + 1 < len(toks) else ""
            if nxt and nxt not in STOPWORDS and nxt not in COLOUR_FAMILY and not nxt.isdigit():
                pairs.add((1, lemma(nxt)))
            continue
        count = _count_of(tok)
        if count is None or (i + 1 < len(toks) and toks[i + 1] == "of"):
            continue  # "one of the dogs" states no count
        for nxt in toks[i + 1 : i + 4]:
            if nxt in STOPWORDS or nxt in COLOUR_FAMILY or nxt.isdigit() or nxt in NUMBER_WORDS:
                continue
            pairs.add((count, lemma(nxt)))
            break
    return pairs


def count_conflicts(seed: str, caption: str) -> int:
    """Seed counts the caption contradicts with an explicit number ("a zebra ... another zebra"
    does not contradict "two zebras"; "three dogs" contradicts "two dogs" and "a dog")."""
    said = counted_nouns(caption)
    explicit = {noun for _, noun in counted_nouns(caption, articles=False)}
    return sum(1 for count, noun in counted_nouns(seed)
               if noun in explicit and (count, noun) not in said)


def coloured_nouns(text: str) -> dict[str, set[str]]:
    """{noun lemma: colour families given it}: colours (joined by "and", "-", "or") before the
    first following content word."""
    toks = tokens(text)
    out: dict[str, set[str]] = {}
    i = 0
    while i < len(toks):
        if toks[i] in COLOUR_FAMILY:
            families = set()
            while i < len(toks) and (toks[i] in COLOUR_FAMILY or toks[i] in ("and", "or")):
                if toks[i] in COLOUR_FAMILY:
                    families.add(COLOUR_FAMILY[toks[i]])
                i += 1
            if i < len(toks) and toks[i] not in STOPWORDS and not toks[i].isdigit():
                out.setdefault(lemma(toks[i]), set()).update(families)
            continue
        i += 1
    return out


def colour_conflicts(seed: str, caption: str) -> int:
    said = coloured_nouns(caption)
    return sum(1 for noun, families in coloured_nouns(seed).items()
               if noun in said and not families & said[noun])


def object_conflicts(seed: str, caption: str) -> int:
    seed_words, caption_words = content_lemmas(seed), content_lemmas(caption)
    conflicts = 0
    for members in EXCLUSIVE_CLASSES.values():
        in_seed, in_caption = seed_words & members, caption_words & members
        if in_seed and in_caption and not in_seed & in_caption:
            conflicts += 1
    if seed_words & EXCLUSIVE_CLASSES["animal"]:
        named = seed_words | caption_words
        conflicts += sum(1 for part, owners in BODY_PARTS.items()
                         if part in caption_words and part not in seed_words
                         and not owners & named)
    return conflicts


def seed_coverage(seed: str, caption: str) -> float:
    """Share of the seed's content lemmas found in the caption (1.0 for a seed with none)."""
    wanted = content_lemmas(seed)
    if not wanted:
        return 1.0
    return len(wanted & content_lemmas(caption)) / len(wanted)


@dataclass(frozen=True)
class FaithfulnessScores:
    seed_coverage: float
    count_conflicts: int
    colour_conflicts: int
    object_conflicts: int


@dataclass(frozen=True)
class FaithfulnessRules:
    """Reject thresholds (quality_gates carries them; these defaults are ours, chosen on the
    benchmark in BENCHMARKS.md)."""

    min_seed_coverage: float = 0.3
    max_count_conflicts: int = 0
    max_colour_conflicts: int = 0
    max_object_conflicts: int = 0


# reasons in the order they are tested; the judge's comes last
REASONS = ("low_seed_coverage", "count_conflict", "colour_conflict", "object_conflict",
           "judge_contradiction")
# +1: higher is more faithful; -1: lower is
SIGNAL_DIRECTIONS = {"seed_coverage": 1, "count_conflicts": -1, "colour_conflicts": -1,
                     "object_conflicts": -1}
SIGNAL_NOTES = {
    "seed_coverage": "share of the seed's content lemmas the caption repeats",
    "count_conflicts": "seed counts restated differently (two dogs -> three dogs)",
    "colour_conflicts": "seed colours of a noun replaced by another colour family",
    "object_conflicts": "seed object replaced within its exclusive class, impossible body parts",
}


def score(seed: str, caption: str) -> FaithfulnessScores:
    return FaithfulnessScores(seed_coverage(seed, caption), count_conflicts(seed, caption),
                              colour_conflicts(seed, caption), object_conflicts(seed, caption))


def combined(s: FaithfulnessScores) -> float:
    """One number for ranking: coverage, less 0.25 per conflict."""
    return s.seed_coverage - 0.25 * (s.count_conflicts + s.colour_conflicts + s.object_conflicts)


def reason(s: FaithfulnessScores, rules: FaithfulnessRules,
           judge_contradicts: bool | None = None) -> str | None:
    """The first faithfulness rule the caption fails, or None."""
    if s.seed_coverage < rules.min_seed_coverage:
        return "low_seed_coverage"
    if s.count_conflicts > rules.max_count_conflicts:
        return "count_conflict"
    if s.colour_conflicts > rules.max_colour_conflicts:
        return "colour_conflict"
    if s.object_conflicts > rules.max_object_conflicts:
        return "object_conflict"
    if judge_contradicts:
        return "judge_contradiction"
    return None


# --- the optional LLM judge ---------------------------------------------------------------------

JUDGE_SCHEMA = {"type": "object", "properties": {"contradicts": {"enum": ["yes", "no"]}},
                "required": ["contradicts"]}
JUDGE_SYSTEM = ("You check image descriptions against a short reference caption of the same "
                "image. Answer in JSON.")
JUDGE_USER = ('Reference caption: "{seed}"\nDescription: "{caption}"\n'
              "Does the description contradict the reference caption (another object, animal, "
              "count, colour or place)? Answer {{\"contradicts\": \"yes\"}} or "
              "{{\"contradicts\": \"no\"}}.")


def judge_messages(seed: str, caption: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": JUDGE_SYSTEM},
            {"role": "user", "content": JUDGE_USER.format(seed=seed, caption=caption)}]


_YES_NO = re.compile(r"\b(yes|no)\b", re.IGNORECASE)


def parse_judge(text: str) -> bool | None:
    """True: contradicts; False: does not; None: no answer could be read (never a reject). JSON
    first (backends with schema support return it); otherwise the first bare yes or no."""
    try:
        value = json.loads(text)
        answer = value.get("contradicts") if isinstance(value, dict) else None
    except ValueError:
        answer = None
    if answer is None:
        found = _YES_NO.search(text or "")
        answer = found.group(1) if found else None
    if isinstance(answer, bool):
        return answer
    if isinstance(answer, str) and answer.lower() in ("yes", "no"):
        return answer.lower() == "yes"
    return None


# --- columns of the Stage 1 caption rows ---------------------------------------------------------

COLUMN_SCHEMA = {
    "seed_coverage": pl.Float64,
    "count_conflicts": pl.Int32,
    "colour_conflicts": pl.Int32,
    "object_conflicts": pl.Int32,
    "judge_contradicts": pl.Boolean,
}


def score_columns(seeds: pl.Series, captions: pl.Series) -> list[pl.Series]:
    """The signal columns for captions beside their seeds (judge_contradicts null: not asked)."""
    scores = [score(s or "", c or "") for s, c in zip(seeds, captions)]
    return [
        pl.Series("seed_coverage", [round(s.seed_coverage, 4) for s in scores], dtype=pl.Float64),
        *(pl.Series(name, [getattr(s, name) for s in scores], dtype=pl.Int32)
          for name in ("count_conflicts", "colour_conflicts", "object_conflicts")),
        pl.Series("judge_contradicts", [None] * len(scores), dtype=pl.Boolean),
    ]


def reason_column(frame: pl.DataFrame, rules: FaithfulnessRules, name: str) -> pl.Series:
    """Each row's first failed faithfulness rule (null: faithful), from its signal columns."""
    rows = frame.select(*COLUMN_SCHEMA).iter_rows()
    return pl.Series(name, [reason(FaithfulnessScores(cov, count, colour, obj), rules, judged)
                            for cov, count, colour, obj, judged in rows], dtype=pl.String)


def with_judgements(frame: pl.DataFrame, verdicts: list[bool | None]) -> pl.DataFrame:
    """Sets judge_contradicts on every row (in row order) from the judge's parsed answers."""
    if len(verdicts) != frame.height:
        raise ValueError(f"{len(verdicts)} judge answers for {frame.height} captions")
    return frame.with_columns(pl.Series("judge_contradicts", verdicts, dtype=pl.Boolean))
