"""Small text helpers shared by every stage."""

from __future__ import annotations

import hashlib
import re
import unicodedata

import polars as pl
import regex

_WS = re.compile(r"\s+")
# Words in any script. Text is folded first (NFKC, then casefold: "Ｃafé" and "café" are one
# word, "Straße" is "strasse"). A word is a run of letters and numbers (Unicode classes L and N,
# never the underscore), each with its combining marks (M: an accent left uncombined, a Devanagari
# vowel sign), optionally joined by one apostrophe ("dog's"). Scripts written without spaces
# between words (Han, Hiragana, Katakana, Thai, Lao, Khmer, Myanmar) have no word boundary to
# find without a dictionary, so there each character (with its marks) is one token: "一只猫" is
# 一 只 猫, and word n-gram shingles become character n-grams there. Hangul is written with
# spaces and is split like Latin.
_NO_SPACE_SCRIPTS = r"\p{Han}\p{Hiragana}\p{Katakana}\p{Thai}\p{Lao}\p{Khmer}\p{Myanmar}"
_LETTER = rf"(?:(?![{_NO_SPACE_SCRIPTS}])[\p{{L}}\p{{N}}]\p{{M}}*)"
_WORD = regex.compile(rf"[{_NO_SPACE_SCRIPTS}]\p{{M}}*|{_LETTER}+(?:'{_LETTER}+)?")
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u02bc": "'"})


def normalise_ws(text: str) -> str:
    return _WS.sub(" ", text).strip()


def normalise_ws_expr(col: str) -> pl.Expr:
    return pl.col(col).str.replace_all(r"\s+", " ").str.strip_chars()


def stable_id(*parts: object, length: int = 16) -> str:
    """A short, stable content hash: the same parts always give the same id."""
    digest = hashlib.sha1("\x1f".join(str(p) for p in parts).encode("utf-8")).hexdigest()
    return digest[:length]


def stable_int(*parts: object) -> int:
    """A stable 31-bit integer (a sampling seed, a template pick) from the given parts."""
    return int(stable_id(*parts, length=8), 16) & 0x7FFFFFFF


def caption_sha256(text: str) -> str:
    """Hex SHA-256 of the exact caption text (UTF-8): the content key that pairs a caption with
    everything made from it. Computed here only, when Stage 1 writes the caption; instructions and
    embeddings copy it from the caption row they were made from, and the exports join on it."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def caption_sha256_series(texts: pl.Series) -> pl.Series:
    """`caption_sha256` of every text of a column (null stays null)."""
    return pl.Series("caption_sha256", [None if t is None else caption_sha256(t) for t in texts],
                     dtype=pl.String)


def fold_text(text: str) -> str:
    """NFKC-normalised and casefolded, typographic apostrophes made plain: the form words and
    duplicates are compared in."""
    return unicodedata.normalize("NFKC", text).casefold().translate(_APOSTROPHES)


def words(text: str) -> list[str]:
    """The folded words (tokens) of `text`, in any script (see `_WORD`)."""
    return _WORD.findall(fold_text(text))


# The same count in a polars expression (Rust regex, no Python per row): a space-separated run,
# or one character of a script written without spaces. Punctuation-only runs count, as in \S+.
_WORD_COUNT = rf"[{_NO_SPACE_SCRIPTS}]|[^\s{_NO_SPACE_SCRIPTS}]+"


def word_count_expr(col: str) -> pl.Expr:
    """Words of each text of `col` for length gates: "一只猫" is 3, "A red bus." is 3."""
    return pl.col(col).str.count_matches(_WORD_COUNT)


def fold(text: str) -> str:
    """`text` folded for exact-duplicate comparison: its words joined by single spaces (case,
    punctuation, spacing and Unicode compatibility forms ignored)."""
    return " ".join(words(text))


def excerpt(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


# "a" or "an" by the sound of the next word, from its spelling: a vowel letter means "an", with
# a few known exceptions. Kept small on purpose; a label it gets wrong can be fixed in the seed
# file's wording. Beginnings that sound like a consonant though spelt with a vowel ("a unicorn",
# "a European", "a one-way sign"), and silent-h words that sound like a vowel ("an hour").
_CONSONANT_SOUND = ("uni", "use", "usu", "uti", "ute", "ura", "uro", "uku", "eu", "ewe", "one",
                    "once", "ufo")
_VOWEL_SOUND = ("hour", "honest", "honour", "honor", "heir")
# An acronym is read letter by letter ("an SUV", "a UFO", "an A380", "an F-16"): these letters'
# names begin with a vowel sound. An acronym read as a word (NASA, IKEA) takes the vowel rule.
_VOWEL_LETTER_NAMES = frozenset("AEFHILMNORSX")
_FIRST_WORD = re.compile(r"[^\W_][\w'’.-]*")


def indefinite_article(phrase: str) -> str:
    """"a" or "an" for `phrase` (an English noun phrase, e.g. a class label), by its first word:
    a vowel letter (accents ignored) means "an", except the beginnings in `_CONSONANT_SOUND` and
    `_VOWEL_SOUND`; an acronym read letter by letter ("SUV", "A380", "F-16") goes by its first
    letter's name; a number by how it is read ("an 8", "an 11", "an 18")."""
    match = _FIRST_WORD.search(phrase)
    if not match:
        return "a"
    word = match[0]
    if word[0].isdecimal():
        number = re.match(r"\d+", word)[0]
        return "an" if number[0] == "8" or number in ("11", "18") else "a"
    if _is_acronym(word):
        return "an" if word[0] in _VOWEL_LETTER_NAMES else "a"
    lower = word.lower()
    if lower.startswith(_VOWEL_SOUND):
        return "an"
    if lower.startswith(_CONSONANT_SOUND):
        return "a"
    base = unicodedata.normalize("NFD", lower)[0]  # "é" -> "e"
    return "an" if base in "aeiou" else "a"


def _is_acronym(word: str) -> bool:
    """Whether `word` begins with capitals read letter by letter: a capital before a hyphen or
    a digit ("X-ray", "F-16", "A380"), or a run of capitals ending the word that is short (up to
    three) or has no vowel ("SUV", "BMW"); an acronym with vowels, like NASA, is read as a word."""
    head = re.match(r"[A-Z]+", word)
    if not head:
        return False
    capitals, rest = head[0], word[len(head[0]):]
    if rest[:1].isdigit() or rest[:1] == "-":
        return True
    return (len(capitals) >= 2 and not rest[:1].isalpha()
            and (len(capitals) <= 3 or not any(c in "AEIOU" for c in capitals)))
