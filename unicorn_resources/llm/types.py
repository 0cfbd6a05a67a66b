"""The values that cross the LLM interface: requests, sampling parameters, completions."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
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


class GenerationError(dg.Failure):
    """A generate call failed as a whole: no partition is written from a partial batch.

    `completed` maps request index (in the list the backend was given) to the completions that
    finished first; the response cache keeps them, so a retry does not pay for them again.
    `retryable=False` (a client error, a server that does not speak the API) makes Dagster fail the
    step at once instead of retrying it under the asset's RetryPolicy."""

    def __init__(self, message: str, completed: dict[int, Completion] | None = None,
                 retryable: bool = True):
        super().__init__(description=message, allow_retries=retryable)
        self.completed = completed or {}
        self.retryable = retryable
