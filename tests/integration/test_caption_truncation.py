"""Long captions and the text encoder's reach: caption_embeddings records how many tokens each
shard's captions have and the share cut at the encoder's limit, and its check truncated_share
fails when a 77-token encoder truncates them, and passes when it reads them in windows."""

from pathlib import Path

import dagster as dg
import pytest

from tests.support import failed_checks, make_resources, materialize_shard
from unicorn_assets.caption_seeds import read_caption_seeds
from unicorn_assets.expansion import expand_captions
from unicorn_assets.modality import caption_embeddings
from unicorn_resources.llm import FakeLLM

STAGE3 = [read_caption_seeds, expand_captions, caption_embeddings]


def run(tmp_path: Path, instance, seed_dir, words: int, long_text: str):
    llm = FakeLLM(words_per_completion=words, cache_path=str(tmp_path / f"cache-{words}.sqlite"))
    resources = make_resources(tmp_path / f"data-{long_text}-{words}", seed_dir, llm=llm,
                               clip={"long_text": long_text})
    result = materialize_shard(instance, resources, "shard-a", assets=STAGE3)
    (check,) = [e.asset_check_evaluation_data for e in result.all_events
                if e.event_type_value == "ASSET_CHECK_EVALUATION"
                and e.asset_check_evaluation_data.asset_check_key.name == "truncated_share"]
    record = instance.fetch_materializations(dg.AssetRecordsFilter(
        asset_key=dg.AssetKey("caption_embeddings"), asset_partitions=["shard-a"]), limit=1)
    return result, check, record.records[0].asset_materialization.metadata


@pytest.mark.parametrize("long_text, passes", [("truncate", False), ("chunk_mean", True)])
def test_long_captions_fail_the_check_under_truncate_and_pass_in_windows(
        tmp_path, instance, seed_dir, long_text, passes):
    result, check, meta = run(tmp_path, instance, seed_dir, words=110, long_text=long_text)
    assert result.success  # not blocking: the embeddings are written either way
    assert check.passed is passes
    assert ("caption_embeddings:truncated_share" in failed_checks(result)) is not passes
    share = meta["truncated_share"]
    assert isinstance(share, dg.FloatMetadataValue)
    assert isinstance(meta["text_tokens_max"], dg.IntMetadataValue)
    assert meta["text_tokens_p50"].value > 110  # every caption is over CLIP's 77 tokens
    assert meta["text_tokens_p95"].value >= meta["text_tokens_p50"].value
    if passes:
        assert share.value == 0.0 and meta["captions_truncated"].value == 0
        assert check.metadata["max_text_tokens"].value > meta["text_tokens_max"].value
    else:
        assert share.value == 1.0 and check.metadata["max_text_tokens"].value == 77
        assert "set clip.long_text: chunk_mean" in check.description


def test_short_captions_pass_under_truncate(tmp_path, instance, seed_dir):
    result, check, meta = run(tmp_path, instance, seed_dir, words=20, long_text="truncate")
    assert check.passed and not failed_checks(result)
    assert meta["truncated_share"].value == 0.0
    assert 20 < meta["text_tokens_max"].value <= 77
    # the embeddings' L2 norms as numbers: unit vectors from the encoder
    for name in ("norm_min", "norm_max", "norm_mean"):
        assert isinstance(meta[name], dg.FloatMetadataValue)
        assert meta[name].value == pytest.approx(1.0, abs=1e-3)
    assert meta["embeddings_n"].value == meta["dagster/row_count"].value
