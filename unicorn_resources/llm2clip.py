"""LLM2CLIP text encoder (the encoder of the Unicorn paper's Stage 3): 1280-d, up to 512 tokens.

How LLM2CLIP encodes a text, and how this module does it without remote code:
1. An LLM2Vec encoder reads it: a Llama fine-tuned as a bidirectional encoder (LLM2Vec). The
   caption is wrapped in the chat prompt of the LLM (`prompt_prefix`, `prompt_suffix`: LLM2Vec's
   Llama-3-Instruct wrapping by default), and the last hidden states of the caption's tokens and
   the suffix are mean-pooled (the prefix and start token are not, as LLM2Vec's skip_instruction).
   The LLM is loaded with transformers' own class for its `model_type` (AutoModel,
   trust_remote_code=False); bidirectional attention comes from an attention mask over every
   real token (no causal mask), which is what LLM2Vec's bidirectional Llama computes.
2. The CLIP checkpoint's text adapter maps the pooled vector to the joint space: residual
   blocks x + MLP(LayerNorm(x)), a LayerNorm, a linear projection (4096 -> 1280). Its weights
   are read by key from the checkpoint's safetensors (only those keys: the vision tower is never
   loaded), into a module whose shapes come from those weights.
3. The result is L2-normalised.

`trust_remote_code: true` is the only way any code from a checkpoint runs: the LLM is then built by
the checkpoint's own class (its `auto_map`). Text only: encode_images raises (see its message).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import dagster as dg
import numpy as np
from pydantic import Field, PrivateAttr

from unicorn_resources.batching import OomBatcher
from unicorn_resources.clip import ClipResource

# LLM2Vec's wrapping for Llama-3 Instruct models (llm2vec.LLM2Vec.prepare_for_tokenization), which
# LLM2CLIP's text side and Unicorn's reference code use: the public code's values.
LLAMA3_PREFIX = "<|start_header_id|>user<|end_header_id|>\n\n"
LLAMA3_SUFFIX = "<|eot_id|>"
_BLOCK_KEY = re.compile(r"^(.*?)(\d+)\.fn\.0\.weight$")


def _trust_error(what: str, path: str, err: Exception) -> ValueError:
    return ValueError(
        f"{what} {path!r} needs its own code to load ({err}); this runs code from the "
        "checkpoint: review it, then set clip.trust_remote_code: true, or convert the "
        "checkpoint to a model type transformers knows")


def _resolve(path: str, revision: str | None, setting: str, cache_dir: str | None) -> Path:
    """A local folder as is; a hub id at a pinned revision, from the local cache (or the hub when
    HF_HUB_OFFLINE is not set)."""
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    if local.is_absolute() or path.startswith("."):
        raise FileNotFoundError(f"clip.{setting} {path!r} is not a folder; set it to the "
                                "checkpoint's folder or to a hub id with a pinned revision")
    if not revision:
        raise ValueError(f"clip.{setting} {path!r} is a hub id without a pinned revision: set "
                         f"clip.{setting.removesuffix('_path')}_revision to a commit hash, so "
                         "every run reads the same weights")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(path, revision=revision, cache_dir=cache_dir,
                                  allow_patterns=["*.json", "*.safetensors", "*.model",
                                                  "*.txt", "*.py"]))


def _adapter(state: dict[str, Any]):
    """The text adapter as a torch module whose keys are those of `state` (prefix removed):
    `<i>.ln.*`, `<i>.fn.0.*`, `<i>.fn.3.*` for each residual block i < n, `<n>.*` the final
    LayerNorm, `<n+1>.*` the projection. Shapes come from the weights; loading is strict."""
    from torch import nn

    class Block(nn.Module):
        def __init__(self, dim: int, hidden: int):
            super().__init__()
            self.ln = nn.LayerNorm(dim)
            self.fn = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(0.0),
                                    nn.Linear(hidden, dim))

        def forward(self, x):
            return x + self.fn(self.ln(x))

    blocks = sorted({int(k.split(".")[0]) for k in state if k.split(".")[1:2] == ["fn"]})
    if blocks != list(range(len(blocks))):
        raise ValueError(f"the text adapter's residual blocks are numbered {blocks}, not 0..n-1")
    n = len(blocks)
    dim, out = state[f"{n + 1}.weight"].shape[1], state[f"{n + 1}.weight"].shape[0]
    layers = [Block(dim, state[f"{i}.fn.0.weight"].shape[0]) for i in range(n)]
    module = nn.Sequential(*layers, nn.LayerNorm(dim),
                           nn.Linear(dim, out, bias=f"{n + 1}.bias" in state))
    module.load_state_dict(state, strict=True)
    return module.eval()


class Llm2ClipResource(ClipResource):
    """LLM2CLIP's text side: an LLM2Vec LLM + the CLIP checkpoint's text adapter, loaded once per
    run. Each path is a local folder, or a hub id with its revision pinned."""

    llm_path: str  # the LLM2Vec LLM, e.g. microsoft/LLM2CLIP-Llama-3-8B-Instruct-CC-Finetuned
    llm_revision: str | None = None  # a commit hash; required when llm_path is a hub id
    clip_path: str  # the CLIP checkpoint holding the text adapter, e.g. microsoft/LLM2CLIP-Openai-L-14-336
    clip_revision: str | None = None  # a commit hash; required when clip_path is a hub id
    # Key prefix of the adapter's weights in clip_path's safetensors (up to the block number);
    # null: found from the keys (the one prefix followed by `0.fn.0.weight`)
    adapter_prefix: str | None = None
    trust_remote_code: bool = False  # run the checkpoint's own model code (review it first)
    bidirectional: bool = True  # LLM2Vec encoders attend both ways; false only for a causal LLM
    max_length: int = Field(512, ge=8, le=32768)  # tokens read per text (LLM2CLIP/LLM2Vec: 512)
    prompt_prefix: str = LLAMA3_PREFIX  # before the caption; not pooled
    prompt_suffix: str = LLAMA3_SUFFIX  # after the caption; pooled with it
    # L2-normalise the pooled LLM vector before the adapter (the LLM2CLIP training code does, on
    # its precomputed embeddings; its Hugging Face get_text_features path, which Unicorn's
    # reference code calls, is given LLM2Vec's raw mean)
    normalize_llm_embedding: bool = False
    device: str = "auto"  # auto: cuda when present
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"  # auto: bf16 on cuda, fp32 on cpu
    batch_size: int = Field(64, ge=1, le=65536)
    cache_dir: str | None = None  # the hub cache the weights were fetched to beforehand

    _llm: Any = PrivateAttr(default=None)
    _tokenizer: Any = PrivateAttr(default=None)
    _adapter: Any = PrivateAttr(default=None)
    _device: str = PrivateAttr(default="cpu")
    _dtype: Any = PrivateAttr(default=None)
    _batcher: OomBatcher | None = PrivateAttr(default=None)
    _parts: tuple[list[int], list[int], list[int]] | None = PrivateAttr(default=None)
    _clip_dir: Path | None = PrivateAttr(default=None)

    @property
    def model_id(self) -> str:
        def name(path: str, revision: str | None) -> str:
            return f"{Path(path).name}@{revision[:12]}" if revision else Path(path).name
        return (f"llm2clip:{name(self.llm_path, self.llm_revision)}"
                f"+{name(self.clip_path, self.clip_revision)}")

    def _clip_folder(self) -> Path:
        if self._clip_dir is None:
            self._clip_dir = _resolve(self.clip_path, self.clip_revision, "clip_path",
                                      self.cache_dir)
        return self._clip_dir

    def _adapter_state(self) -> dict[str, Any]:
        """The adapter's tensors (prefix removed), read by key: nothing else is loaded."""
        from safetensors import safe_open

        files = sorted(self._clip_folder().glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors in clip.clip_path {self.clip_path!r}; "
                                    "LLM2CLIP's adapter is read from safetensors only")
        keys = {}
        for file in files:
            with safe_open(str(file), framework="pt") as f:
                keys.update(dict.fromkeys(f.keys(), file))
        prefix = self.adapter_prefix
        if prefix is None:
            found = sorted({m.group(1) for k in keys if (m := _BLOCK_KEY.match(k))
                            and m.group(2) == "0"})
            if len(found) != 1:
                raise ValueError(f"clip.adapter_prefix: {len(found)} candidate text-adapter "
                                 f"prefixes in {self.clip_path!r} ({found[:5]}); set "
                                 "clip.adapter_prefix to the one before `0.fn.0.weight`")
            prefix = found[0]
        wanted = {k: file for k, file in keys.items() if k.startswith(prefix)}
        if not wanted:
            raise ValueError(f"clip.adapter_prefix {prefix!r}: no such keys in "
                             f"{self.clip_path!r}; set it to the prefix before `0.fn.0.weight`")
        state = {}
        for file in set(wanted.values()):
            with safe_open(str(file), framework="pt") as f:
                state.update({k[len(prefix):]: f.get_tensor(k) for k, fl in wanted.items()
                              if fl == file})
        return state

    @property
    def embedding_dim(self) -> int:
        if self._adapter is not None:
            return int(self._adapter[-1].out_features)
        return int(self._load_adapter_only()[-1].out_features)

    def _load_adapter_only(self):
        if self._adapter is None:
            self._adapter = _adapter(self._adapter_state())
        return self._adapter

    @property
    def image_size(self) -> int:
        config = self._clip_folder() / "config.json"
        vision = json.loads(config.read_text()).get("vision_config", {}) if config.exists() else {}
        return int(vision.get("image_size", 336))

    @property
    def is_pretrained(self) -> bool:
        return True

    @property
    def max_text_tokens(self) -> int:
        return self.max_length

    @property
    def runtime(self) -> dict[str, Any]:
        self._load()
        return {"device": self._device, "dtype": str(self._dtype).removeprefix("torch."),
                "batch_size": self._batcher.batch_size, "max_text_tokens": self.max_length}

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        self._load(context.log.warning if context.log else None)

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        self._llm = self._tokenizer = self._adapter = self._batcher = None

    def _load(self, log=None) -> None:
        if self._llm is not None:
            return
        import torch
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        device = self.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        precision = self.precision
        if precision == "auto":
            precision = "bf16" if device.startswith("cuda") else "fp32"
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
        folder = _resolve(self.llm_path, self.llm_revision, "llm_path", self.cache_dir)
        trust = self.trust_remote_code
        try:
            config = AutoConfig.from_pretrained(folder, trust_remote_code=trust)
        except ValueError as err:
            if not trust and "trust_remote_code" in str(err):
                raise _trust_error("the LLM", self.llm_path, err) from err
            raise
        try:
            llm = AutoModel.from_pretrained(folder, config=config, dtype=dtype,
                                            trust_remote_code=trust)
        except ValueError as err:
            if not trust and "trust_remote_code" in str(err):
                raise _trust_error("the LLM", self.llm_path, err) from err
            raise
        if self.bidirectional and not trust:
            for module in llm.modules():  # the mask built in _run is the only mask
                if hasattr(module, "is_causal"):
                    module.is_causal = False
        adapter = self._load_adapter_only()
        width = adapter[-1].in_features
        if llm.config.hidden_size != width:
            raise ValueError(f"the LLM's hidden size ({llm.config.hidden_size}) is not the text "
                             f"adapter's input width ({width}): clip.llm_path and clip.clip_path "
                             "are not a pair; use the LLM that clip_path's adapter was trained on")
        self._tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust)
        self._llm = llm.to(device).eval()
        self._adapter = adapter.to(device=device, dtype=torch.float32)
        self._device, self._dtype = device, dtype
        self._batcher = OomBatcher(self.batch_size, log=log, what="LLM2CLIP")
        ids = self._tokenizer("", add_special_tokens=True)["input_ids"]
        self._parts = (list(ids), self._ids(self.prompt_prefix), self._ids(self.prompt_suffix))
        budget = self.max_length - len(self._parts[0]) - len(self._parts[1]) - len(self._parts[2])
        if budget < 1:
            raise ValueError(f"clip.max_length ({self.max_length}) leaves no room for the caption "
                             "after the prompt's own tokens; raise it or shorten the prompt")

    def _ids(self, text: str) -> list[int]:
        return list(self._tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def count_tokens(self, texts: Sequence[str]) -> np.ndarray:
        self._load()
        fixed = sum(len(part) for part in self._parts)
        return np.asarray([fixed + len(self._ids(text)) for text in texts],
                          dtype=np.int64).reshape(len(texts))

    def _row(self, text: str) -> tuple[list[int], int]:
        """(token ids of one text, number of trailing ids to pool), cut to max_length: the
        caption is cut, the prompt around it is kept."""
        start, prefix, suffix = self._parts
        caption = self._ids(text)[: self.max_length - len(start) - len(prefix) - len(suffix)]
        return [*start, *prefix, *caption, *suffix], len(caption) + len(suffix)

    def _run(self, batch: Sequence[str]) -> np.ndarray:
        import torch

        rows = [self._row(text) for text in batch]
        length = max(len(ids) for ids, _ in rows)
        ids = torch.full((len(rows), length), self._pad_id(), dtype=torch.long)
        real = torch.zeros(len(rows), length, dtype=torch.bool)
        pooled = torch.zeros(len(rows), length, dtype=torch.bool)
        for i, (row, pool) in enumerate(rows):  # left padding, as LLM2Vec
            ids[i, length - len(row):] = torch.tensor(row)
            real[i, length - len(row):] = True
            pooled[i, length - pool:] = True
        positions = (real.cumsum(dim=1) - 1).clamp(min=0)
        ids, real, pooled, positions = (t.to(self._device) for t in (ids, real, pooled, positions))
        with torch.inference_mode():
            if self.bidirectional and not self.trust_remote_code:
                # every real token sees every real token; padding is seen by none
                mask = torch.zeros(len(rows), 1, length, length, dtype=self._dtype,
                                   device=self._device)
                mask.masked_fill_(~real[:, None, None, :], torch.finfo(self._dtype).min)
            else:
                mask = real.long()
            hidden = self._llm(input_ids=ids, attention_mask=mask,
                               position_ids=positions).last_hidden_state.float()
            weights = pooled.float().unsqueeze(-1)
            mean = (hidden * weights).sum(dim=1) / weights.sum(dim=1)
            if self.normalize_llm_embedding:
                mean = torch.nn.functional.normalize(mean, dim=-1)
            out = torch.nn.functional.normalize(self._adapter(mean), dim=-1)
        return out.cpu().numpy()

    def _pad_id(self) -> int:
        tok = self._tokenizer
        for candidate in (tok.pad_token_id, tok.eos_token_id, 0):
            if candidate is not None:
                return int(candidate)
        return 0

    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        self._load()
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.embedding_dim), dtype=np.float32)
        # longest first, as LLM2Vec: batches of similar lengths pad little
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        out = np.concatenate(self._batcher.map(self._run, [texts[i] for i in order]))
        result = np.empty_like(out, dtype=np.float32)
        result[order] = out
        return result

    def encode_images(self, images: Sequence[Any]) -> np.ndarray:
        raise NotImplementedError(
            "clip.backend: llm2clip encodes text only (caption_embeddings); image embeddings "
            "(SynthVLM CLIPScore, reference_images) need an encoder with a vision tower: run "
            "those with clip.backend: open_clip, and take the image mean with the same "
            "encoder as the text mean")
