"""CLIP-family encoders: texts and images in, L2-normalised float32 embeddings out."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from importlib.resources import files
from pathlib import Path
from typing import Any, Literal

import dagster as dg
import numpy as np
from pydantic import Field, PrivateAttr

from unicorn_resources.batching import OomBatcher

BUNDLED_MODEL_CONFIGS = str(files("unicorn_resources") / "model_configs")
UNTRAINED_CLIP_NOTE = ("untrained CLIP (random weights): embeddings and similarities are "
                       "meaningless, for tests and pipeline runs only")


class ClipResource(dg.ConfigurableResource, ABC):
    """A joint text/image encoder. Backends: open_clip."""

    @property
    @abstractmethod
    def model_id(self) -> str:
        """What to record as the encoder in lineage columns and manifests."""

    @property
    @abstractmethod
    def embedding_dim(self) -> int: ...

    @property
    @abstractmethod
    def image_size(self) -> int:
        """Side of the square vision input, in pixels (336 for ViT-L-14-336)."""

    @property
    @abstractmethod
    def is_pretrained(self) -> bool:
        """False for randomly initialised weights, whose embeddings mean nothing."""

    @property
    def runtime(self) -> dict[str, Any]:
        """Where and how the model runs (device, dtype, batch size), for metadata."""
        return {}

    @abstractmethod
    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        """float32 (len(texts), embedding_dim), each row of unit L2 norm."""

    def text_token_counts(self, texts: Sequence[str]) -> tuple[list[int], int] | None:
        """(tokens per text as the text encoder's tokenizer makes them before any cut, start and
        end tokens included; the encoder's context length): a text with more tokens than the
        context length is truncated. None when the backend cannot tell."""
        return None

    @abstractmethod
    def encode_images(self, images: Sequence[Any]) -> np.ndarray:
        """float32 (len(images), embedding_dim) from PIL images, each row of unit L2 norm."""


_registered_config_paths: set[str] = set()


def _register_configs(*paths: str | None) -> None:
    """Make open_clip know the model configs in these files or folders (once per process)."""
    import open_clip

    for path in paths:
        if path and path not in _registered_config_paths:
            if not Path(path).exists():
                raise FileNotFoundError(f"open_clip model config {path} does not exist; set "
                                        "clip.model_config_path to a model-config JSON or folder")
            open_clip.add_model_config(path)
            _registered_config_paths.add(path)


class OpenClipResource(ClipResource):
    """An open_clip model, loaded once per run. `pretrained=None` builds random weights from the
    model config and never downloads; a tag (`openai`) or a checkpoint file loads real weights."""

    model_name: str = "tiny-clip"  # an open_clip architecture, e.g. ViT-L-14-336
    pretrained: str | None = None  # a tag (openai), a checkpoint path, or None: random init
    model_config_path: str | None = None  # extra model-config JSON file or folder to register
    device: str = "auto"  # auto: cuda when present
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"  # auto: fp16 on cuda, fp32 on cpu
    batch_size: int = Field(256, ge=1, le=65536)
    init_seed: int = Field(0, ge=0)  # seed of the random weights when pretrained is None
    cache_dir: str | None = None  # where pretrained weights were fetched to beforehand

    _model: Any = PrivateAttr(default=None)
    _tokenizer: Any = PrivateAttr(default=None)
    _preprocess: Any = PrivateAttr(default=None)
    _device: str = PrivateAttr(default="cpu")
    _dtype: Any = PrivateAttr(default=None)
    _batcher: OomBatcher | None = PrivateAttr(default=None)

    def _config(self) -> dict[str, Any]:
        import open_clip

        _register_configs(BUNDLED_MODEL_CONFIGS, self.model_config_path)
        config = open_clip.get_model_config(self.model_name)
        if config is None:
            raise ValueError(f"open_clip has no model config {self.model_name!r}; use a built-in "
                             "name (e.g. ViT-L-14-336) or set model_config_path to a config JSON "
                             "named <model_name>.json")
        return config

    @property
    def model_id(self) -> str:
        weights = Path(self.pretrained).name if self.pretrained else f"untrained(seed={self.init_seed})"
        return f"open_clip:{self.model_name}:{weights}"

    @property
    def embedding_dim(self) -> int:
        return int(self._config()["embed_dim"])

    @property
    def image_size(self) -> int:
        size = self._config()["vision_cfg"].get("image_size", 224)
        return int(size[0] if isinstance(size, (list, tuple)) else size)

    @property
    def is_pretrained(self) -> bool:
        return self.pretrained is not None

    @property
    def runtime(self) -> dict[str, Any]:
        """Where and how the model runs (after loading): device, dtype, current batch size."""
        self._load()
        return {"device": self._device, "dtype": str(self._dtype).removeprefix("torch."),
                "batch_size": self._batcher.batch_size}

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        self._load(context.log.warning if context.log else None)

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        self._model = self._tokenizer = self._preprocess = self._batcher = None

    def _load(self, log=None) -> None:
        if self._model is not None:
            return
        import open_clip
        import torch

        self._config()  # registers configs, fails clearly on an unknown name
        device = self.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        precision = self.precision
        if precision == "auto":
            precision = "fp16" if device.startswith("cuda") else "fp32"
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.init_seed)
            model, _, preprocess = open_clip.create_model_and_transforms(
                self.model_name, pretrained=self.pretrained, precision=precision, device=device,
                cache_dir=self.cache_dir)
        self._model = model.eval()
        self._preprocess = preprocess
        self._tokenizer = open_clip.get_tokenizer(self.model_name)
        self._device = device
        self._dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
        self._batcher = OomBatcher(self.batch_size, log=log, what="CLIP")

    def _encode(self, items: Sequence[Any], to_tensor, encode) -> np.ndarray:
        import torch

        if len(items) == 0:
            return np.zeros((0, self.embedding_dim), dtype=np.float32)

        def run(batch: Sequence[Any]) -> np.ndarray:
            with torch.inference_mode():
                features = encode(to_tensor(batch).to(self._device)).float()
                return torch.nn.functional.normalize(features, dim=-1).cpu().numpy()

        return np.concatenate(self._batcher.map(run, items)).astype(np.float32, copy=False)

    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        self._load()
        return self._encode(list(texts), self._tokenizer, self._model.encode_text)

    def text_token_counts(self, texts: Sequence[str]) -> tuple[list[int], int]:
        self._load()
        tokenizer = self._tokenizer
        length = int(getattr(tokenizer, "context_length", None)
                     or self._config()["text_cfg"].get("context_length", 77))
        if hasattr(tokenizer, "encode") and hasattr(tokenizer, "sot_token_id"):  # CLIP's BPE
            return [len(tokenizer.encode(text)) + 2 for text in texts], length
        # open_clip's HFTokenizer: the Hugging Face tokenizer adds its own special tokens
        return [len(ids) for ids in tokenizer.tokenizer(list(texts))["input_ids"]], length

    def encode_images(self, images: Sequence[Any]) -> np.ndarray:
        import torch

        self._load()

        def to_tensor(batch: Sequence[Any]):
            return torch.stack([self._preprocess(im.convert("RGB")) for im in batch]).to(self._dtype)

        return self._encode(list(images), to_tensor, self._model.encode_image)
