"""Exact and near duplicates in any script (unicorn_assets/logic/dedup.py)."""

from __future__ import annotations

import polars as pl

from unicorn_assets.logic import quality
from unicorn_assets.logic.dedup import (
    exact_duplicate_mask,
    exact_jaccard_pair_rate,
    near_duplicate_mask,
    shingles,
)

CAT = "一只橘色的猫坐在阳光明媚的窗台上，望着外面的花园。"
TRAIN = "一列红色的火车停在站台旁边，乘客们正在上车。"
CAFE = "Un café près de l'église, avec deux tables en terrasse et un vélo rouge."
CAFE_ASCII = "Un cafe pres de l'eglise, avec deux tables en terrasse et un velo rouge."


def test_unrelated_chinese_captions_are_not_exact_duplicates_and_identical_ones_are():
    same_words = "一只橘色的猫，坐在阳光明媚的窗台上! 望着外面的花园"
    mask = exact_duplicate_mask(pl.Series("caption", [CAT, TRAIN, CAT, same_words]))
    assert mask.to_list() == [False, False, True, True]  # the last differs in punctuation only


def test_accented_latin_words_are_kept_not_dropped():
    mask = exact_duplicate_mask(pl.Series([CAFE, CAFE_ASCII, CAFE.upper()]))
    assert mask.to_list() == [False, False, True]
    assert "café" in shingles(CAFE, 1) and "église" not in shingles(CAFE, 1)
    assert "l'église" in shingles(CAFE, 1)


def test_chinese_shingles_are_character_n_grams():
    assert shingles("一只猫坐着") == ["一 只 猫", "只 猫 坐", "猫 坐 着"]
    assert shingles("猫") == ["猫"]
    assert shingles("。！") == []


def test_unrelated_chinese_captions_are_not_near_duplicates_and_identical_ones_are():
    texts = [CAT, TRAIN, CAT, CAT.replace("橘色", "白色")]
    assert near_duplicate_mask(texts, threshold=0.85) == [False, False, True, False]
    assert near_duplicate_mask(texts, threshold=0.6) == [False, False, True, True]
    rate, examined = exact_jaccard_pair_rate(texts, 0.85)
    assert (rate, examined) == (1 / 4, 4)
    assert quality.near_duplicate_rate([CAT, TRAIN], 0.85, 0.0).passed
    assert not quality.near_duplicate_rate([CAT, TRAIN, CAT], 0.85, 0.0).passed
