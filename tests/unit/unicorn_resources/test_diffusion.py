"""The SDXL resource on a tiny randomly initialised pipeline built from diffusers configs."""

from __future__ import annotations

import dagster as dg
import numpy as np
import pytest
import torch

from unicorn_resources.diffusion import SdxlResource, build_tiny_sdxl, tiny_clip_tokenizer

PROMPTS = ["A red brick house behind a wooden fence.", "A black dog on green grass.",
           "Two boats on a calm lake at sunset."]


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


@pytest.fixture(scope="module")
def sdxl() -> SdxlResource:
    resource = SdxlResource(tiny_random=True, resolution=64, steps=4, batch_size=3)
    resource._load()
    return resource


def test_describes_itself_as_untrained():
    resource = SdxlResource(tiny_random=True)
    assert not resource.is_pretrained and "untrained" in resource.model_id
    real = SdxlResource()
    assert real.is_pretrained and real.image_size == 1024 and real.steps == 60
    assert real.model_id == ("stabilityai/stable-diffusion-xl-base-1.0"
                             "+stabilityai/stable-diffusion-xl-refiner-1.0")
    assert real.settings()["high_noise_frac"] == 0.8


def test_renders_small_images_deterministically(sdxl):
    first = sdxl.render(PROMPTS, [11, 12, 13])
    assert [im.size for im in first] == [(64, 64)] * 3 and all(im.mode == "RGB" for im in first)
    second = sdxl.render(PROMPTS, [11, 12, 13])
    for a, b in zip(first, second):
        assert np.array_equal(pixels(a), pixels(b))
    other_seed = sdxl.render(PROMPTS[:1], [99])[0]
    assert np.abs(pixels(other_seed) - pixels(first[0])).mean() > 5
    assert pixels(first[0]).std() > 5  # not a blank image


def test_an_image_does_not_depend_on_its_batch(sdxl):
    together = sdxl.render(PROMPTS, [11, 12, 13])
    alone = SdxlResource(tiny_random=True, resolution=64, steps=4, batch_size=1).render(
        PROMPTS[1:2], [12])[0]
    # batched float arithmetic may round a pixel differently, never more than that
    assert np.abs(pixels(together[1]) - pixels(alone)).max() <= 2


def _count_unet_calls(resource: SdxlResource) -> dict[str, int]:
    calls = {"base": 0, "refiner": 0}
    for name, pipe in (("base", resource._base), ("refiner", resource._refiner)):
        if pipe is not None:
            pipe.unet.register_forward_hook(
                lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    return calls


def test_refiner_starts_where_the_base_stops():
    """Ensemble of experts: with 10 steps and f = 0.8 the base runs the first 8 (denoising_end)
    and the refiner the last 2 (denoising_start); passing denoising_end to the refiner, as the
    public SynthVLM code does, would run it from its img2img strength instead."""
    resource = SdxlResource(tiny_random=True, resolution=64, steps=10, high_noise_frac=0.8)
    resource._load()
    calls = _count_unet_calls(resource)
    received = {}
    original = resource._refiner.__class__.__call__

    def spy(pipe, *args, **kwargs):
        received.update(kwargs)
        return original(pipe, *args, **kwargs)

    resource._refiner.__class__.__call__ = spy
    try:
        resource.render(PROMPTS[:1], [5])
    finally:
        resource._refiner.__class__.__call__ = original
    assert calls == {"base": 8, "refiner": 2}
    assert received["denoising_start"] == 0.8 and "denoising_end" not in received
    assert tuple(received["image"].shape) == (1, 4, 16, 16)  # the base's latents, not pixels


def test_without_refiner_the_base_runs_every_step():
    resource = SdxlResource(tiny_random=True, resolution=64, steps=5, use_refiner=False)
    resource._load()
    calls = _count_unet_calls(resource)
    assert resource._refiner is None
    assert resource.render(PROMPTS[:2], [1, 2])[0].size == (64, 64)
    assert calls == {"base": 5, "refiner": 0}


def test_negative_prompt_changes_the_image(sdxl):
    with_negative = SdxlResource(tiny_random=True, resolution=64, steps=4,
                                 negative_prompt="blurry, low quality")
    plain = sdxl.render(PROMPTS[:1], [3])[0]
    assert not np.array_equal(pixels(with_negative.render(PROMPTS[:1], [3])[0]), pixels(plain))


def test_cuda_out_of_memory_halves_the_batch(monkeypatch):
    resource = SdxlResource(tiny_random=True, resolution=64, steps=2, batch_size=4)
    resource._load()
    sizes = []
    render_batch = SdxlResource._render_batch

    def limited(self, items):
        sizes.append(len(items))
        if len(items) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return render_batch(self, items)

    monkeypatch.setattr(SdxlResource, "_render_batch", limited)
    images = resource.render(PROMPTS + PROMPTS[:1], [1, 2, 3, 4])
    assert len(images) == 4 and sizes == [4, 2, 2]
    assert resource._batcher.batch_size == 2


def test_bad_settings_fail_clearly():
    with pytest.raises(ValueError, match="high_noise_frac"):
        SdxlResource(tiny_random=True, high_noise_frac=1.0)._load()
    with pytest.raises(ValueError, match="dtype"):
        SdxlResource(tiny_random=True, dtype="float8")._load()
    with pytest.raises(ValueError, match="2 prompts but 1 seeds"):
        SdxlResource(tiny_random=True, resolution=64).render(PROMPTS[:2], [1])


def test_tiny_components_have_the_sdxl_architecture():
    base, refiner = build_tiny_sdxl(with_refiner=True)
    assert base.unet.config.addition_embed_type == "text_time"
    assert type(base.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert refiner.text_encoder is None and refiner.config.requires_aesthetics_score
    tokenizer = tiny_clip_tokenizer()
    ids = tokenizer(["a red car " * 40], padding="max_length", max_length=77, truncation=True)
    assert len(ids.input_ids[0]) == 77 and ids.input_ids[0][0] == tokenizer.bos_token_id
    same_seed, _ = build_tiny_sdxl(with_refiner=False, seed=0)
    assert torch.equal(same_seed.unet.conv_in.weight, base.unet.conv_in.weight)


def test_profiles_build_the_renderer_and_switch_the_branch(tmp_path, monkeypatch):
    from dagster_project.definitions import build_definitions
    from dagster_project.profiles import (
        ProfileError,
        build_diffusion,
        build_resources,
        load_profile,
        synthvlm_enabled,
    )

    local = load_profile("local")
    diffusion = build_resources(local)["diffusion"]
    assert isinstance(diffusion, SdxlResource) and diffusion.tiny_random
    assert diffusion.resolution > 64  # above the tiny CLIP's input, so SSIM measures something
    with pytest.raises(ProfileError, match="diffusion.backend"):
        build_diffusion({"backend": "dalle"})
    assert not synthvlm_enabled({}) and synthvlm_enabled({"synthvlm": {"enabled": True}})
    profile = tmp_path / "off.yaml"
    profile.write_text(f"storage: {{base_uri: {tmp_path / 'data'}}}\nllm: {{backend: fake}}\n")
    monkeypatch.setenv("UNICORN_PROFILE_FILE", str(profile))
    jobs = {job.name for job in build_definitions().resolve_all_job_defs()}
    assert "unicorn_shard_job" in jobs and not {"synthvlm_job", "synthvlm_corpus_job"} & jobs
    profile.write_text(profile.read_text() + "synthvlm: {enabled: true}\n")
    defs = build_definitions()
    assert {"synthvlm_job", "synthvlm_corpus_job"} <= {j.name for j in defs.resolve_all_job_defs()}
    assert defs.resolve_assets_def("synthetic_images").group_names_by_key[
        dg.AssetKey("synthetic_images")] == "synthvlm"


def test_prompt_token_counts_say_which_prompts_sdxl_cuts(sdxl):
    """SDXL's two tokenizers read 77 tokens: a prompt counted over that renders the same image
    whatever follows its 77th token; within it, every word changes the picture."""
    long = "A red brick house behind a wooden fence, " * 3  # the tiny tokenizer: a token per char
    short = PROMPTS[1]
    counts = sdxl.prompt_token_counts([long, short])
    assert set(counts) == {"tokenizer", "tokenizer_2"}
    for (long_count, short_count), limit in counts.values():
        assert limit == 77 and long_count > limit >= short_count
        assert short_count == len(tiny_clip_tokenizer()(short)["input_ids"])
    cut, cut_tail = sdxl.render([long, long + "and a blue door."], [5, 5])
    assert np.array_equal(pixels(cut), pixels(cut_tail))
    whole, changed = sdxl.render([short, short + " A blue door."], [5, 5])
    assert not np.array_equal(pixels(whole), pixels(changed))
