"""The LLM2CLIP text encoder, on a tiny random model of the same architecture made here: a Llama
(LLM2Vec encoder) with its tokenizer, and a CLIP checkpoint holding only the text adapter."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from unicorn_resources.llm2clip import LLAMA3_PREFIX, LLAMA3_SUFFIX, Llm2ClipResource, _adapter

WORDS = ["a", "man", "woman", "dog", "cat", "red", "blue", "green", "table", "chair", "street",
         "car", "bus", "tree", "sky", "river", "boat", "house", "window", "door", "light", "small",
         "large", "old", "young", "sits", "stands", "runs", "near", "under", "over", "beside",
         "with", "the", "of", "in", "on", "and", "wooden", "metal", "bright", "dark"]
SPECIALS = ["<unk>", "<pad>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
            "<|eot_id|>"]
HIDDEN, OUT = 32, 24  # LLM2CLIP: 4096 -> 1280


def _tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([*SPECIALS, "user", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(  # a start token, as Llama 3's
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                   bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                   additional_special_tokens=SPECIALS[3:])
    fast.save_pretrained(folder)


def _adapter_state(prefix: str, blocks: int = 2) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)

    def rand(*shape):
        return torch.randn(*shape, generator=gen) * 0.2

    state = {}
    for i in range(blocks):
        state |= {f"{prefix}{i}.ln.weight": 1 + rand(HIDDEN), f"{prefix}{i}.ln.bias": rand(HIDDEN),
                  f"{prefix}{i}.fn.0.weight": rand(2 * HIDDEN, HIDDEN),
                  f"{prefix}{i}.fn.0.bias": rand(2 * HIDDEN),
                  f"{prefix}{i}.fn.3.weight": rand(HIDDEN, 2 * HIDDEN),
                  f"{prefix}{i}.fn.3.bias": rand(HIDDEN)}
    return state | {f"{prefix}{blocks}.weight": 1 + rand(HIDDEN), f"{prefix}{blocks}.bias": rand(HIDDEN),
                    f"{prefix}{blocks + 1}.weight": rand(OUT, HIDDEN),
                    f"{prefix}{blocks + 1}.bias": rand(OUT)}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[Path, Path]:
    from transformers import LlamaConfig, LlamaModel

    root = tmp_path_factory.mktemp("llm2clip")
    llm, clip = root / "llm", root / "clip"
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=HIDDEN, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, pad_token_id=1)
    LlamaModel(config).save_pretrained(llm)
    _tokenizer(llm)
    clip.mkdir()
    # the adapter among other weights (a vision tower's), as in the real checkpoint
    save_file({**_adapter_state("text_adaptor.adaptor."),
               "vision_model.embeddings.patch_embedding.weight": torch.zeros(4, 3, 2, 2)},
              clip / "model.safetensors")
    (clip / "config.json").write_text(json.dumps({"vision_config": {"image_size": 336}}))
    return llm, clip


@pytest.fixture(scope="module")
def encoder(checkpoint) -> Llm2ClipResource:
    llm, clip = checkpoint
    return Llm2ClipResource(llm_path=str(llm), clip_path=str(clip), batch_size=2)


def caption(n_words: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [WORDS[i] for i in rng.integers(0, len(WORDS), n_words)]


def test_width_unit_norms_and_determinism(encoder, checkpoint):
    texts = [" ".join(caption(n, seed=n)) for n in (5, 40, 12, 300, 7)]
    emb = encoder.encode_text(texts)
    assert emb.shape == (5, OUT) and emb.dtype == np.float32
    assert encoder.embedding_dim == OUT and encoder.image_size == 336
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(emb[0], emb[1])
    llm, clip = checkpoint  # a fresh load, other batch sizes: the same vectors
    again = Llm2ClipResource(llm_path=str(llm), clip_path=str(clip), batch_size=5)
    np.testing.assert_allclose(again.encode_text(texts), emb, atol=1e-5)
    np.testing.assert_allclose(again.encode_text(texts[3:4]), emb[3:4], atol=1e-5)


def test_a_long_text_is_read_past_clips_77_tokens(encoder):
    words = caption(400)
    changed = list(words)
    changed[300] = "elephant" if words[300] != "elephant" else "dog"  # elephant: <unk>
    changed[150] = "boat" if words[150] != "boat" else "car"
    counts = encoder.count_tokens([" ".join(words)])
    assert 400 < counts[0] <= encoder.max_text_tokens == 512  # read whole
    a, b = encoder.encode_text([" ".join(words), " ".join(changed)])
    assert np.abs(a - b).max() > 1e-4


def test_truncation_at_max_length_is_counted(encoder):
    words = caption(600, seed=3)
    tail = list(words)
    tail[580] = "river" if words[580] != "river" else "sky"
    counts = encoder.count_tokens([" ".join(words), " ".join(words[:50])])
    # start token + prefix (3) + words + suffix (1)
    assert counts.tolist() == [600 + 5, 50 + 5]
    assert counts[0] > encoder.max_text_tokens >= counts[1]
    a, b = encoder.encode_text([" ".join(words), " ".join(tail)])
    np.testing.assert_allclose(a, b, atol=1e-6)  # word 580 is past 512 tokens: cut


def test_pooling_covers_the_caption_not_the_prompt(checkpoint):
    llm, clip = checkpoint
    plain = Llm2ClipResource(llm_path=str(llm), clip_path=str(clip), prompt_prefix="",
                             prompt_suffix="")
    text = " ".join(caption(20))
    assert plain.count_tokens([text])[0] == 21
    wrapped = Llm2ClipResource(llm_path=str(llm), clip_path=str(clip))
    assert wrapped.prompt_prefix == LLAMA3_PREFIX and wrapped.prompt_suffix == LLAMA3_SUFFIX
    assert not np.allclose(plain.encode_text([text]), wrapped.encode_text([text]))


def test_attention_is_bidirectional(checkpoint):
    """A word changes the hidden state of the tokens before it (not so in a causal LLM), so
    the bidirectional and the causal encoder differ."""
    llm, clip = checkpoint
    text = " ".join(caption(30))
    bi = Llm2ClipResource(llm_path=str(llm), clip_path=str(clip)).encode_text([text])
    causal = Llm2ClipResource(llm_path=str(llm), clip_path=str(clip),
                              bidirectional=False).encode_text([text])
    assert np.abs(bi - causal).max() > 1e-4


def test_adapter_prefix_is_found_or_named(checkpoint, tmp_path):
    llm, _ = checkpoint
    two = tmp_path / "two"
    two.mkdir()
    save_file({**_adapter_state("a."), **_adapter_state("b.")}, two / "model.safetensors")
    res = Llm2ClipResource(llm_path=str(llm), clip_path=str(two))
    with pytest.raises(ValueError, match=r"clip.adapter_prefix: 2 candidate"):
        res.encode_text(["a dog"])
    chosen = Llm2ClipResource(llm_path=str(llm), clip_path=str(two), adapter_prefix="b.")
    assert chosen.encode_text(["a dog"]).shape == (1, OUT)


def test_adapter_rebuilds_the_shapes_of_its_weights():
    state = {k.removeprefix("p."): v for k, v in _adapter_state("p.", blocks=3).items()}
    module = _adapter(state)
    assert module(torch.zeros(2, HIDDEN)).shape == (2, OUT)
    assert len(module) == 5


def test_remote_code_only_behind_the_setting(checkpoint, tmp_path):
    llm, clip = checkpoint
    custom = tmp_path / "custom"
    custom.mkdir()
    config = json.loads((llm / "config.json").read_text())
    config |= {"model_type": "llama_encoder_custom",
               "auto_map": {"AutoConfig": "configuration.MyConfig",
                            "AutoModel": "modeling.MyEncoder"}}
    (custom / "config.json").write_text(json.dumps(config))
    (custom / "configuration.py").write_text("raise SystemExit('remote code ran')\n")
    res = Llm2ClipResource(llm_path=str(custom), clip_path=str(clip))
    with pytest.raises(ValueError, match="clip.trust_remote_code: true"):
        res.encode_text(["a dog"])


def test_a_hub_id_needs_a_pinned_revision(checkpoint):
    _, clip = checkpoint
    res = Llm2ClipResource(llm_path="microsoft/LLM2CLIP-Llama-3-8B-Instruct-CC-Finetuned",
                           clip_path=str(clip))
    with pytest.raises(ValueError, match="set clip.llm_revision"):
        res.encode_text(["a dog"])


def test_images_are_refused_with_the_alternative(encoder):
    with pytest.raises(NotImplementedError, match="clip.backend: open_clip"):
        encoder.encode_images([])
