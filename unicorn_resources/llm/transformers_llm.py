"""Hugging Face transformers: any local HF model directory or GGUF file, batched with left padding."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field, PrivateAttr

from unicorn_resources.llm.base import (
    ChatRequest,
    Completion,
    LLMResource,
    SamplingParams,
    default_gguf_path,
)


class TransformersLLM(LLMResource):
    """A causal LM run by transformers. A `.gguf` path is dequantised on load (needs `gguf`).
    Loaded on the run's first cache miss, once; a run the cache answers whole loads nothing."""

    model_path: str | None = None  # HF directory/id or .gguf file; None: the offline SmolLM2 GGUF
    device: str = "auto"  # "auto" picks cuda when present
    dtype: str = "auto"  # "auto": float16 on cuda, float32 on cpu
    batch_size: int = Field(8, ge=1, le=4096)
    n_threads: int | None = Field(None, ge=1, le=1024)

    _model: Any = PrivateAttr(default=None)
    _tokenizer: Any = PrivateAttr(default=None)
    _device: str = PrivateAttr(default="cpu")

    @property
    def resolved_path(self) -> str:
        return self.model_path or default_gguf_path()

    @property
    def model_id(self) -> str:
        path = self.resolved_path
        return f"transformers:{Path(path).name if path.endswith('.gguf') else path}"

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        self._model = self._tokenizer = None

    def _load(self) -> None:
        if self._model is not None:
            return
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if self.n_threads:
            torch.set_num_threads(self.n_threads)
        device = self.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = {"auto": torch.float16 if device.startswith("cuda") else torch.float32,
                 "float16": torch.float16, "bfloat16": torch.bfloat16,
                 "float32": torch.float32}[self.dtype]
        path = self.resolved_path
        kwargs: dict[str, Any] = {}
        if path.endswith(".gguf"):
            kwargs["gguf_file"] = Path(path).name
            path = str(Path(path).parent)
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs).to(device).eval()
        self._model, self._tokenizer, self._device = model, tokenizer, device

    def _generate(self, requests: Sequence[ChatRequest], params: SamplingParams
                  ) -> Iterator[list[Completion]]:
        """`batch_size` requests per model.generate call; each batch is yielded (and so cached)
        as soon as it is done."""
        import torch
        from transformers import set_seed

        self._load()
        tok, model = self._tokenizer, self._model
        for start in range(0, len(requests), self.batch_size):
            batch = requests[start : start + self.batch_size]
            prompts = [tok.apply_chat_template(r.message_dicts(), tokenize=False,
                                               add_generation_prompt=True) for r in batch]
            enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
            enc = enc.to(self._device)
            # One seed per batch: transformers samples a batch from one generator.
            if batch[0].seed is not None:
                set_seed(batch[0].seed)
            with torch.inference_mode():
                generated = model.generate(
                    **enc, do_sample=params.temperature > 0, temperature=params.temperature or None,
                    top_p=params.top_p, max_new_tokens=params.max_tokens,
                    repetition_penalty=params.repeat_penalty, pad_token_id=tok.pad_token_id,
                )
            new_tokens = generated[:, enc["input_ids"].shape[1]:]
            prompt_lengths = enc["attention_mask"].sum(dim=1).tolist()
            out: list[Completion] = []
            for row, prompt_len in zip(new_tokens.tolist(), prompt_lengths):
                stop_at = next((i for i, t in enumerate(row) if t == tok.eos_token_id), None)
                kept = row if stop_at is None else row[:stop_at]
                kept = [t for t in kept if t != tok.pad_token_id]
                out.append(Completion(
                    text=tok.decode(kept, skip_special_tokens=True).strip(),
                    prompt_tokens=int(prompt_len), completion_tokens=len(kept),
                    finish_reason="length" if stop_at is None else "stop",
                ))
            yield out
