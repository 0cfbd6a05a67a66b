"""Words and folding in any script (unicorn_assets/logic/text.py): Unicode letters and numbers,
NFKC + casefold, one token per character in scripts written without spaces."""

from __future__ import annotations

import polars as pl
import pytest

from unicorn_assets.logic.expansion import new_word_count
from unicorn_assets.logic.text import fold, indefinite_article, word_count_expr, words


@pytest.mark.parametrize("text, expected", [
    ("A dog's bone, 3 cats!", ["a", "dog's", "bone", "3", "cats"]),
    ("Un café près de l’Église.", ["un", "café", "près", "de", "l'église"]),
    ("cafe\u0301 au lait", ["café", "au", "lait"]),  # a combining accent, composed by NFKC
    ("ＳＴＲＡßＥ ２", ["strasse", "2"]),  # full-width forms and ß, folded
    ("snake_case", ["snake", "case"]),  # the underscore is no letter
    ("नमस्ते दुनिया", ["नमस्ते", "दुनिया"]),  # vowel signs and virama stay inside the word
    ("고양이 한 마리", ["고양이", "한", "마리"]),  # Hangul is written with spaces
    ("一只猫坐在窗台上。", ["一", "只", "猫", "坐", "在", "窗", "台", "上"]),
    ("东京塔 at night", ["东", "京", "塔", "at", "night"]),
])
def test_words_in_any_script(text, expected):
    assert words(text) == expected


def test_fold_ignores_case_punctuation_spacing_and_width_only():
    assert fold("Ｃafé,  NOIR!") == fold("café noir") == "café noir"
    assert fold("一只猫。") == "一 只 猫"
    assert fold("一只猫") != fold("两只狗")
    assert fold("éclair") != fold("eclair")  # accents are kept, not stripped


def test_a_chinese_caption_has_new_words_against_its_seed():
    seed = "一只猫坐在窗台上。"
    assert new_word_count("一只橘色的猫坐在阳光明媚的窗台上，望着外面的花园。", seed) == len("橘色的阳光明媚望着外面花园")
    assert new_word_count(seed, seed) == 0
    assert new_word_count("Un café près de l'église.", "Un café.") == 3  # près, de, l'église


@pytest.mark.parametrize("phrase, article", [
    ("Atlantic Puffin", "an"), ("hour", "an"), ("honest man", "an"), ("heron", "a"),
    ("unicorn", "a"), ("uniform", "a"), ("ugly duckling", "an"), ("European Robin", "a"),
    ("eagle", "an"), ("ewe", "a"), ("one-way sign", "a"), ("owl", "an"),
    ("MRI scanner", "an"), ("X-ray", "an"), ("UFO", "a"), ("IKEA chair", "an"),
    ("NASA rocket", "a"), ("BMW", "a"), ("11-year-old", "an"), ("18th-century clock", "an"),
    ("1000-piece puzzle", "a"), ("80s car", "an"), ("élan", "an"), ("", "a"), ("'Eagle'", "an"),
    ("²-sphere", "a"),
])
def test_indefinite_article(phrase, article):
    assert indefinite_article(phrase) == article


def test_word_count_expr_counts_words_of_spaceless_scripts_per_character():
    texts = pl.Series("t", ["一只黑白相间的猫", "A red bus, parked.", "café 猫", ""])
    counts = pl.DataFrame([texts]).select(word_count_expr("t"))["t"].to_list()
    assert counts == [8, 4, 2, 0]
