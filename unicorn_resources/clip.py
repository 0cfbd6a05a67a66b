"""CLIP-family encoders: texts and images in, L2-normalised float32 embeddings out."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from importlib.resources import files
from pathlib import Path
from typing import Any, Literal

import dagster as dg
import numpy as np
from pydantic import Field, PrivateAttr, field_validator

from unicorn_resources.batching import OomBatcher

BUNDLED_MODEL_CONFIGS = str(files("unicorn_resources") / "model_configs")
UNTRAINED_CLIP_NOTE = ("untrained CLIP (random weights): embeddings and similarities are "
                       "meaningless, for tests and pipeline runs only")


class ClipResource(dg.ConfigurableResource, ABC):
    """A joint text/image encoder. Backends: open_clip (this module), llm2clip (llm2clip.py)."""

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

    @property
    @abstractmethod
    def max_text_tokens(self) -> int:
        """The most tokens of one text (special tokens included) that reach its embedding; the
        tokens of a longer text after these are cut (truncated)."""

    @abstractmethod
    def count_tokens(self, texts: Sequence[str]) -> np.ndarray:
        """int64 (len(texts),): each text's length in the encoder's own tokens, special tokens
        included, before any truncation. A text is truncated when this is above max_text_tokens."""

    @abstractmethod
    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        """float32 (len(texts), embedding_dim), each row of unit L2 norm."""

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
    # A text longer than the model's context (77 tokens for CLIP): `truncate` cuts it (open_clip's
    # own behaviour); `chunk_mean` encodes overlapping windows of the context's size, each to a
    # unit vector, and takes the normalised mean of them, so every token up to max_chunks windows
    # reaches the embedding. A text that fits the context gives the same vector either way.
    long_text: Literal["truncate", "chunk_mean"] = "truncate"
    chunk_overlap: int = Field(16, ge=0, le=64)  # tokens two neighbouring windows share
    max_chunks: int = Field(8, ge=1, le=64)  # windows per text at most; tokens past them are cut

    @field_validator("pretrained", "cache_dir", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        """An empty value is no value: compose passes an unset `.env` entry as "" (it cannot
        leave a variable out), and "" would read as a weights tag."""
        return None if value == "" else value

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
    def context_length(self) -> int:
        """Tokens the text tower reads in one pass, start and end tokens included (77 for CLIP)."""
        return int(self._config()["text_cfg"].get("context_length", 77))

    def _window(self) -> tuple[int, int]:
        """(content tokens per window, stride between window starts) for long_text=chunk_mean."""
        width = self.context_length - 2  # the start and end tokens wrap each window
        if self.chunk_overlap >= width:
            raise ValueError(f"clip.chunk_overlap ({self.chunk_overlap}) must be below the "
                             f"{width} content tokens of {self.model_name}'s context; lower it")
        return width, width - self.chunk_overlap

    @property
    def max_text_tokens(self) -> int:
        if self.long_text == "truncate":
            return self.context_length
        width, stride = self._window()
        return 2 + width + (self.max_chunks - 1) * stride

    @property
    def runtime(self) -> dict[str, Any]:
        """Where and how the model runs (after loading): device, dtype, current batch size."""
        self._load()
        return {"device": self._device, "dtype": str(self._dtype).removeprefix("torch."),
                "batch_size": self._batcher.batch_size, "long_text": self.long_text,
                "max_text_tokens": self.max_text_tokens}

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
                inputs = to_tensor(batch)
                inputs = (tuple(t.to(self._device) for t in inputs) if isinstance(inputs, tuple)
                          else inputs.to(self._device))
                features = encode(inputs).float()
                return torch.nn.functional.normalize(features, dim=-1).cpu().numpy()

        return np.concatenate(self._batcher.map(run, items)).astype(np.float32, copy=False)

    def _bpe(self) -> Any:
        """The tokenizer, when it is open_clip's CLIP BPE tokenizer (encode, start/end ids)."""
        tok = self._tokenizer
        return tok if all(hasattr(tok, a) for a in ("encode", "sot_token_id", "eot_token_id")) \
            else None

    def count_tokens(self, texts: Sequence[str]) -> np.ndarray:
        self._load()
        if bpe := self._bpe():
            counts = [len(bpe.encode(text)) + 2 for text in texts]
        else:  # a Hugging Face tokenizer inside open_clip (e.g. SigLIP)
            counts = [len(self._tokenizer.tokenizer(text)["input_ids"]) for text in texts]
        return np.asarray(counts, dtype=np.int64).reshape(len(texts))

    def _chunk_rows(self, text: str) -> list[list[int]]:
        """The token rows (start, window, end) of one text: one row when it fits the context,
        else overlapping windows, the last one ending at the text's last token."""
        bpe = self._bpe()
        ids = bpe.encode(text)
        width, stride = self._window()
        if len(ids) <= width:
            starts = [0]
        else:
            starts = list(range(0, len(ids) - width, stride)) + [len(ids) - width]
            if len(starts) > self.max_chunks:  # cut: the first max_chunks windows
                starts = [k * stride for k in range(self.max_chunks)]
        return [[bpe.sot_token_id, *ids[s : s + width], bpe.eot_token_id] for s in starts]

    def _chunk_mean_tokens(self, batch: Sequence[str]):
        """(token tensor of every window of `batch`, index of the text each window belongs to)."""
        import torch

        rows, owner = [], []
        for i, text in enumerate(batch):
            for row in self._chunk_rows(text):
                rows.append(row)
                owner.append(i)
        tokens = torch.zeros(len(rows), self.context_length, dtype=torch.long)
        for r, row in enumerate(rows):
            tokens[r, : len(row)] = torch.tensor(row)
        return tokens, torch.tensor(owner)

    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        self._load()
        if self.long_text == "truncate":
            return self._encode(list(texts), self._tokenizer, self._model.encode_text)
        if self._bpe() is None:
            raise ValueError(f"clip.long_text: chunk_mean needs open_clip's CLIP tokenizer, and "
                             f"{self.model_name} has another; set clip.long_text: truncate")

        def chunk_mean(tokens_and_owner):
            tokens, owner = tokens_and_owner
            windows = torch.nn.functional.normalize(
                self._model.encode_text(tokens).float(), dim=-1)
            sums = torch.zeros(int(owner.max()) + 1, windows.shape[1], device=windows.device)
            sums.index_add_(0, owner, windows)
            return sums  # _encode normalises: the mean's direction

        return self._encode(list(texts), self._chunk_mean_tokens, chunk_mean)

    def encode_images(self, images: Sequence[Any]) -> np.ndarray:
        import torch

        self._load()

        def to_tensor(batch: Sequence[Any]):
            return torch.stack([self._preprocess(im.convert("RGB")) for im in batch]).to(self._dtype)

        return self._encode(list(images), to_tensor, self._model.encode_image)
