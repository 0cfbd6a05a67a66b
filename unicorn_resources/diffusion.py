"""Text-to-image rendering for the SynthVLM branch: SDXL over diffusers, optionally with its refiner.

The refiner runs as SDXL's "ensemble of experts": the base denoises the first `high_noise_frac` of
the schedule (`denoising_end=f`) and hands its latents to the refiner, which starts where the base
stopped (`denoising_start=f`). Every image has its own torch.Generator, so an image depends only on
its prompt and seed, never on its batch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import dagster as dg
from PIL import Image
from pydantic import Field, PrivateAttr

from unicorn_resources.batching import OomBatcher

UNTRAINED_NOTE = "untrained: randomly initialised tiny SDXL, its images are noise-like textures " \
                 "(for tests and the offline demo only)"


class DiffusionResource(dg.ConfigurableResource, ABC):
    """A text-to-image model. `SdxlResource` is the diffusers backend (real or tiny random)."""

    @property
    @abstractmethod
    def model_id(self) -> str:
        """What to record as the renderer in lineage columns."""

    @property
    @abstractmethod
    def is_pretrained(self) -> bool:
        """False for randomly initialised stand-ins."""

    @property
    @abstractmethod
    def image_size(self) -> int:
        """Side of the square images `render` returns, in pixels."""

    @abstractmethod
    def settings(self) -> dict[str, Any]:
        """The rendering settings to record with every image (steps, guidance, ...)."""

    @abstractmethod
    def render(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[Image.Image]:
        """One RGB image per prompt, in order; the same (prompt, seed) gives the same image."""

    def prompt_token_counts(self, prompts: Sequence[str]) -> dict[str, tuple[list[int], int]]:
        """Per text encoder, (tokens per prompt as its tokenizer makes them before any cut, start
        and end tokens included; the encoder's maximum length): a prompt with more tokens is
        truncated. Empty when the backend cannot tell."""
        return {}


class SdxlResource(DiffusionResource):
    """SDXL base (+ refiner) from the Hugging Face hub or local folders, loaded once per run.

    `tiny_random: true` builds a tiny randomly initialised SDXL from diffusers configs instead: no
    download, seconds on a CPU, images without meaning (see `build_tiny_sdxl`).
    """

    base_model_id: str = "stabilityai/stable-diffusion-xl-base-1.0"
    refiner_model_id: str = "stabilityai/stable-diffusion-xl-refiner-1.0"
    use_refiner: bool = True
    vae_model_id: str | None = None  # e.g. madebyollin/sdxl-vae-fp16-fix for fp16 without NaNs
    variant: str | None = None  # "fp16" loads the hub's half-precision weight files
    local_files_only: bool = False  # true on nodes that must not reach the hub
    steps: int = Field(60, ge=1, le=1000)
    high_noise_frac: float = Field(0.8, gt=0, le=1)  # share of the steps the base runs before the refiner takes over
    guidance_scale: float = Field(5.0, ge=0, le=100)
    resolution: int = Field(1024, ge=64, le=4096, multiple_of=8)  # SDXL: a multiple of 8
    negative_prompt: str = ""
    batch_size: int = Field(4, ge=1, le=1024)
    device: str = "auto"  # "auto": cuda when present
    dtype: str = "auto"  # "auto": float16 on cuda, float32 on cpu
    tiny_random: bool = False
    tiny_seed: int = Field(0, ge=0)  # weight initialisation seed of the tiny random pipeline

    _base: Any = PrivateAttr(default=None)
    _refiner: Any = PrivateAttr(default=None)
    _batcher: Any = PrivateAttr(default=None)

    @property
    def model_id(self) -> str:
        if self.tiny_random:
            return f"untrained-tiny-sdxl(seed={self.tiny_seed}{',refiner' if self.use_refiner else ''})"
        return self.base_model_id + (f"+{self.refiner_model_id}" if self.use_refiner else "")

    @property
    def is_pretrained(self) -> bool:
        return not self.tiny_random

    @property
    def image_size(self) -> int:
        return self.resolution

    def settings(self) -> dict[str, Any]:
        return {"steps": self.steps, "guidance_scale": self.guidance_scale,
                "resolution": self.resolution, "negative_prompt": self.negative_prompt,
                "refiner": self.use_refiner,
                "high_noise_frac": self.high_noise_frac if self.use_refiner else None}

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        self._load(context.log.info if context.log else None)

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        self._base = self._refiner = self._batcher = None

    def _torch_settings(self) -> tuple[str, Any]:
        import torch

        device = self.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dtypes = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
        if self.dtype == "auto":
            return device, torch.float16 if device.startswith("cuda") else torch.float32
        if self.dtype not in dtypes:
            raise ValueError(f"diffusion.dtype {self.dtype!r} is unknown; use auto or one of "
                             f"{sorted(dtypes)}")
        return device, dtypes[self.dtype]

    def _load(self, log: Any = None) -> None:
        if self._base is not None:
            return
        if not 0 < self.high_noise_frac < 1:
            raise ValueError(f"diffusion.high_noise_frac must be between 0 and 1, got "
                             f"{self.high_noise_frac}")
        device, dtype = self._torch_settings()
        if self.tiny_random:
            base, refiner = build_tiny_sdxl(self.use_refiner, self.tiny_seed, dtype)
        else:
            base, refiner = self._from_pretrained(dtype)
        for pipe in (base, refiner):
            if pipe is not None:
                pipe.to(device)
                pipe.set_progress_bar_config(disable=True)
        self._base, self._refiner = base, refiner
        self._batcher = OomBatcher(self.batch_size, log=log, what="image")

    def _from_pretrained(self, dtype: Any) -> tuple[Any, Any]:
        from diffusers import (
            AutoencoderKL,
            StableDiffusionXLImg2ImgPipeline,
            StableDiffusionXLPipeline,
        )

        common: dict[str, Any] = {"torch_dtype": dtype, "use_safetensors": True,
                                  "local_files_only": self.local_files_only}
        if self.variant:
            common["variant"] = self.variant
        extra: dict[str, Any] = {}
        if self.vae_model_id:
            extra["vae"] = AutoencoderKL.from_pretrained(
                self.vae_model_id, torch_dtype=dtype, local_files_only=self.local_files_only)
        base = StableDiffusionXLPipeline.from_pretrained(self.base_model_id, **common, **extra)
        if not self.use_refiner:
            return base, None
        # The refiner shares the base's second text encoder and VAE, as in the SDXL model card.
        refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(
            self.refiner_model_id, text_encoder_2=base.text_encoder_2, vae=base.vae, **common)
        return base, refiner

    def prompt_token_counts(self, prompts: Sequence[str]) -> dict[str, tuple[list[int], int]]:
        """SDXL's two CLIP tokenizers (`tokenizer`: CLIP ViT-L, `tokenizer_2`: OpenCLIP bigG), each
        read up to its model_max_length (77) by the pipeline."""
        self._load()
        out = {}
        for name in ("tokenizer", "tokenizer_2"):
            tokenizer = getattr(self._base, name, None)
            if tokenizer is not None:
                ids = tokenizer(list(prompts), truncation=False, verbose=False)["input_ids"]
                out[name] = ([len(i) for i in ids], int(tokenizer.model_max_length))
        return out

    def render(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[Image.Image]:
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        self._load()
        batches = self._batcher.map(self._render_batch, list(zip(prompts, seeds)))
        return [image for batch in batches for image in batch]

    def _render_batch(self, items: Sequence[tuple[str, int]]) -> list[Image.Image]:
        import torch

        prompts = [prompt for prompt, _ in items]
        # CPU generators: the starting noise is the same on every device.
        generators = [torch.Generator("cpu").manual_seed(int(seed)) for _, seed in items]
        negative = [self.negative_prompt] * len(items) if self.negative_prompt else None
        common = {"prompt": prompts, "negative_prompt": negative, "generator": generators,
                  "num_inference_steps": self.steps, "guidance_scale": self.guidance_scale}
        size = {"height": self.resolution, "width": self.resolution}
        with torch.inference_mode():
            if self._refiner is None:
                return list(self._base(**common, **size).images)
            latents = self._base(**common, **size, denoising_end=self.high_noise_frac,
                                 output_type="latent").images
            return list(self._refiner(**common, image=latents,
                                      denoising_start=self.high_noise_frac).images)


def tiny_clip_tokenizer() -> Any:
    """A CLIP tokenizer over the 256 byte-level symbols and no merges: every character is a token.
    Built in memory, so nothing is downloaded."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    for suffix in ("", "</w>"):
        for char in alphabet:
            vocab[char + suffix] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    tokenizer.model_max_length = 77
    return tokenizer


def build_tiny_sdxl(with_refiner: bool, seed: int = 0, dtype: Any = None) -> tuple[Any, Any]:
    """(base, refiner or None): SDXL pipelines with the real architecture (UNet with text_time
    conditioning, two CLIP text encoders, the second with projection, KL VAE) at toy sizes and
    random weights. The refiner is conditioned like SDXL's: second encoder only, aesthetic score."""
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLImg2ImgPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = tiny_clip_tokenizer()
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_attention_heads=4,
        num_hidden_layers=2, projection_dim=32, max_position_embeddings=77, hidden_act="gelu",
        bos_token_id=0, eos_token_id=1, pad_token_id=1)
    time_embed_dim = 8

    def unet(time_ids: int, cross_attention_dim: int) -> UNet2DConditionModel:
        # The added condition is the pooled second-encoder text embedding plus `time_ids`
        # Fourier-embedded size/crop (and, for the refiner, aesthetic-score) numbers.
        return UNet2DConditionModel(
            sample_size=32, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(32, 64), norm_num_groups=8,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4), transformer_layers_per_block=(1, 1),
            use_linear_projection=True, cross_attention_dim=cross_attention_dim,
            addition_embed_type="text_time", addition_time_embed_dim=time_embed_dim,
            projection_class_embeddings_input_dim=time_ids * time_embed_dim
            + text_config.projection_dim)

    scheduler_config = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                        "steps_offset": 1, "timestep_spacing": "leading"}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(text_config)
        text_encoder_2 = CLIPTextModelWithProjection(text_config)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16),
            down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
            norm_num_groups=8, sample_size=128)  # latents at 1/4 of the image side
        base = StableDiffusionXLPipeline(
            vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
            tokenizer_2=tokenizer, unet=unet(6, 2 * text_config.hidden_size),
            scheduler=EulerDiscreteScheduler(**scheduler_config))
        refiner = None
        if with_refiner:
            refiner = StableDiffusionXLImg2ImgPipeline(
                vae=vae, text_encoder=None, text_encoder_2=text_encoder_2, tokenizer=None,
                tokenizer_2=tokenizer, unet=unet(5, text_config.hidden_size),
                scheduler=EulerDiscreteScheduler(**scheduler_config),
                requires_aesthetics_score=True)
    if dtype is not None and dtype != torch.float32:
        for module in (text_encoder, text_encoder_2, vae, base.unet, *([refiner.unet] if refiner else [])):
            module.to(dtype)
    return base, refiner
