"""In-process llama-cpp-python: the CPU default."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from importlib.util import find_spec
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


def load_torch_openmp_first() -> None:
    """llama.cpp and torch both use OpenMP under the soname libgomp.so.1, and a process keeps the
    first one loaded. Where torch is installed it is loaded first, so that both run on the runtime
    torch ships and is tested with rather than torch on the system's."""
    if find_spec("torch") is not None:
        import torch  # noqa: F401


class LlamaCppLLM(LLMResource):
    """A GGUF model run by llama.cpp on the CPU. Loaded on the first cache miss of a run, once;
    a run the response cache answers whole loads nothing."""

    model_path: str | None = None  # None: the offline SmolLM2-135M-Instruct GGUF
    n_ctx: int = Field(2048, ge=256, le=131072)
    n_threads: int | None = Field(None, ge=1, le=1024)  # None: all cores
    n_batch: int = Field(512, ge=1, le=131072)
    # llama-cpp-python's chat format (e.g. "gemma") for a GGUF file without a chat template, which
    # would otherwise be prompted in the llama-2 format; None: the file's own template
    chat_format: str | None = Field(None, min_length=1, max_length=64)

    _llm: Any = PrivateAttr(default=None)

    @property
    def resolved_path(self) -> str:
        return self.model_path or default_gguf_path()

    @property
    def model_id(self) -> str:
        name = f"llama_cpp:{Path(self.resolved_path).name}"
        return f"{name}:{self.chat_format}" if self.chat_format else name

    @property
    def supports_json_schema(self) -> bool:
        return True

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        if self._llm is not None:
            self._llm.close()
            self._llm = None

    def _load(self) -> Any:
        if self._llm is None:
            load_torch_openmp_first()
            from llama_cpp import Llama

            self._llm = Llama(model_path=self.resolved_path, n_ctx=self.n_ctx,
                              n_threads=self.n_threads, n_batch=self.n_batch,
                              chat_format=self.chat_format, verbose=False)
        return self._llm

    def _generate(self, requests: Sequence[ChatRequest], params: SamplingParams
                  ) -> Iterator[Completion]:
        """One request at a time, each yielded (and so cached) as soon as it is done."""
        llm = self._load()
        for request in requests:
            kwargs: dict[str, Any] = {}
            if request.json_schema is not None:
                kwargs["response_format"] = {"type": "json_object", "schema": request.json_schema}
            # Start from an empty KV cache: reusing the previous prompt's prefix evaluates the
            # prompt in other batches, and on some CPU builds that changes the logits enough to
            # change a sampled text. A completion then depends on its request and seed alone.
            llm.reset()
            response = llm.create_chat_completion(
                messages=request.message_dicts(), temperature=params.temperature,
                top_p=params.top_p, max_tokens=params.max_tokens,
                repeat_penalty=params.repeat_penalty, seed=request.seed, **kwargs,
            )
            choice, usage = response["choices"][0], response["usage"]
            yield Completion(
                text=choice["message"]["content"] or "", prompt_tokens=usage["prompt_tokens"],
                completion_tokens=usage["completion_tokens"],
                finish_reason=choice.get("finish_reason") or "stop",
            )

