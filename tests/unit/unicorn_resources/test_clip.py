"""The CLIP resource (a tiny, randomly initialised open_clip model) and OOM-halving batches."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.support import COCO_PAIRS
from unicorn_resources.batching import BatchTooLargeError, OomBatcher
from unicorn_resources.clip import BUNDLED_MODEL_CONFIGS, OpenClipResource

TEXTS = ["A woman stands in the dining area at the table.", "Two dogs play in the snow.",
         "A red bus parked beside a brick building.", "A plate of pasta with basil.",
         "A man rides a wave on a surfboard."]


def oom_above(limit: int, calls: list[int]):
    def fn(batch):
        calls.append(len(batch))
        if len(batch) > limit:
            raise torch.cuda.OutOfMemoryError(f"fake OOM on {len(batch)} items")
        return [x * 10 for x in batch]
    return fn


def test_oom_halves_the_batch_and_keeps_every_item_in_order():
    calls: list[int] = []
    logged: list[str] = []
    batcher = OomBatcher(16, log=logged.append)
    out = batcher.map(oom_above(3, calls), list(range(37)))
    assert [x for batch in out for x in batch] == [x * 10 for x in range(37)]
    assert calls[:4] == [16, 8, 4, 2]  # halved until it fits
    assert batcher.batch_size == 2  # and stays small for the rest of the run
    assert all(size <= 2 for size in calls[4:])
    assert len(logged) == 3 and "retrying with batch size 2" in logged[-1]


def test_oom_on_a_single_item_fails_clearly():
    with pytest.raises(BatchTooLargeError, match="single CLIP"):
        OomBatcher(4, what="CLIP").map(oom_above(0, []), [1, 2, 3])


def test_other_errors_are_not_swallowed():
    def broken(batch):
        raise ValueError("not an OOM")
    with pytest.raises(ValueError, match="not an OOM"):
        OomBatcher(4).map(broken, [1, 2])


def test_invalid_batch_size():
    with pytest.raises(ValueError):
        OomBatcher(0)


@pytest.fixture(scope="module")
def clip() -> OpenClipResource:
    return OpenClipResource(batch_size=2)


def test_tiny_clip_describes_itself_without_loading():
    res = OpenClipResource()
    assert (res.embedding_dim, res.image_size) == (64, 64)
    assert not res.is_pretrained and "untrained" in res.model_id
    assert res._model is None
    assert OpenClipResource(model_name="ViT-L-14-336", pretrained="openai").embedding_dim == 768
    assert OpenClipResource(model_name="ViT-L-14-336", pretrained="openai").is_pretrained


def test_text_embeddings_are_normalised_batched_and_deterministic(clip):
    emb = clip.encode_text(TEXTS)
    assert emb.shape == (len(TEXTS), 64) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    one_batch = OpenClipResource(batch_size=64).encode_text(TEXTS)  # same seed, other batching
    np.testing.assert_allclose(emb, one_batch, atol=1e-5)
    assert not np.allclose(emb[0], emb[1])  # different texts, different vectors
    other_seed = OpenClipResource(init_seed=1).encode_text(TEXTS)
    assert not np.allclose(emb, other_seed)
    assert clip.encode_text([]).shape == (0, 64)


def test_image_embeddings_of_real_images(clip):
    folder = COCO_PAIRS.parent
    paths = sorted({json.loads(line)["image"] for line in COCO_PAIRS.open()})[:3]
    images = [Image.open(folder / p) for p in paths]
    emb = clip.encode_images(images)
    assert emb.shape == (3, 64) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    grey = Image.new("L", (200, 120), 128)  # any mode and size: preprocess resizes and converts
    assert clip.encode_images([grey]).shape == (1, 64)


def test_resource_survives_oom(monkeypatch):
    res = OpenClipResource(batch_size=8)
    expected = res.encode_text(TEXTS)
    real = res._model.encode_text

    def flaky(tokens):
        if tokens.shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("fake")
        return real(tokens)

    monkeypatch.setattr(res._model, "encode_text", flaky)
    res._batcher.batch_size = 8
    np.testing.assert_allclose(res.encode_text(TEXTS), expected, atol=1e-5)
    assert res.runtime["batch_size"] == 2


def test_own_model_config_file(tmp_path: Path):
    config = json.loads((Path(BUNDLED_MODEL_CONFIGS) / "tiny-clip.json").read_text())
    config["embed_dim"] = 24
    path = tmp_path / "my-clip.json"
    path.write_text(json.dumps(config))
    res = OpenClipResource(model_name="my-clip", model_config_path=str(path))
    assert res.encode_text(TEXTS[:2]).shape == (2, 24)


def test_unknown_model_names_fail_clearly(tmp_path: Path):
    with pytest.raises(ValueError, match="no model config 'nope'"):
        _ = OpenClipResource(model_name="nope").embedding_dim
    with pytest.raises(FileNotFoundError, match="model_config_path"):
        _ = OpenClipResource(model_config_path=str(tmp_path / "missing.json")).embedding_dim


def _long_caption(change_at: int | None = None) -> str:
    scene = "a red bus parked beside a brick building while two dogs play in the snow near a woman"
    words = [*scene.split(" "), "at", "the", "table"] * 8  # 168 words, about 170 CLIP tokens
    if change_at is not None:
        words[change_at] = "surfboard"
    return " ".join(words)


def test_truncate_ignores_words_past_77_tokens_and_chunk_mean_reads_them():
    long, changed = _long_caption(), _long_caption(change_at=120)
    short = TEXTS[:2]
    truncate = OpenClipResource(long_text="truncate")
    chunked = OpenClipResource(long_text="chunk_mean", chunk_overlap=16, max_chunks=8)
    counts = truncate.count_tokens([long, *short])
    assert counts[0] > 120 + 2 and (counts[1:] < 77).all()
    assert truncate.max_text_tokens == 77 and chunked.max_text_tokens == 2 + 75 + 7 * 59
    a, b = truncate.encode_text([long, changed])
    np.testing.assert_allclose(a, b, atol=1e-6)  # word 120 never reached the encoder
    a, b = chunked.encode_text([long, changed])
    assert np.abs(a - b).max() > 1e-4
    np.testing.assert_allclose(np.linalg.norm(chunked.encode_text([long]), axis=1), 1, atol=1e-5)
    # a text that fits the context is one window: the same vector either way
    np.testing.assert_allclose(chunked.encode_text(short), truncate.encode_text(short), atol=1e-6)


def test_chunk_mean_is_the_normalised_mean_of_its_windows():
    chunked = OpenClipResource(long_text="chunk_mean", chunk_overlap=10, max_chunks=2)
    long = _long_caption()
    chunked._load()
    rows = chunked._chunk_rows(long)
    assert len(rows) == 2 and all(len(row) == 77 for row in rows)  # capped at max_chunks
    assert rows[0][-11:-1] == rows[1][1:11]  # neighbours share chunk_overlap tokens
    windows = [chunked._tokenizer.decode(row[1:-1]) for row in rows]
    parts = OpenClipResource(long_text="truncate").encode_text(windows)
    mean = parts.mean(axis=0)
    np.testing.assert_allclose(chunked.encode_text([long])[0], mean / np.linalg.norm(mean),
                               atol=1e-4)
    assert chunked.max_text_tokens == 2 + 75 + 65 < chunked.count_tokens([long])[0]


def test_chunk_overlap_must_leave_a_stride(tmp_path):
    config = json.loads((Path(BUNDLED_MODEL_CONFIGS) / "tiny-clip.json").read_text())
    config["text_cfg"]["context_length"] = 40
    (tmp_path / "short-clip.json").write_text(json.dumps(config))
    short = OpenClipResource(model_name="short-clip", model_config_path=str(tmp_path),
                             long_text="chunk_mean", chunk_overlap=38)
    with pytest.raises(ValueError, match=r"clip.chunk_overlap \(38\) must be below the 38"):
        short.encode_text([_long_caption()])


def test_token_counts_say_which_texts_the_encoder_cuts(clip):
    """A text counted over the context length loses its tail: changing words past the 77th token
    leaves its embedding as it was; a text within it reads whole."""
    long = "A photo depicts " + " ".join(["a red brick house with white window frames"] * 12)
    short = TEXTS[0]
    long_count, short_count = clip.count_tokens([long, short])
    context = clip.max_text_tokens
    assert context == 77
    assert long_count > context >= short_count
    # the count is the tokenizer's: start + words + end, as open_clip pads it into 77 positions
    assert short_count == int((clip._tokenizer([short]) != 0).sum())
    same, changed_tail = clip.encode_text([long, long + " and a blue door"])
    np.testing.assert_allclose(same, changed_tail, atol=1e-6)
    whole, changed = clip.encode_text([short, short + " and a blue door"])
    assert not np.allclose(whole, changed, atol=1e-4)
