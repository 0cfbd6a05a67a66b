"""A deterministic, instant stand-in LLM for tests and overhead benchmarks. Its text means nothing."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from typing import Any

from pydantic import Field

from unicorn_resources.llm.base import ChatRequest, Completion, LLMResource, SamplingParams

_VOCAB = (
    "red blue green wooden metal glass striped round square small large bright dark soft shiny "
    "matte left right behind beside above below centre corner edge surface table wall window "
    "floor grass sky road water tree building shadow light sunlight lamp cloth paper stone"
).split()


class FakeLLM(LLMResource):
    """Returns seeded pseudo-descriptions (or schema-shaped JSON); no model is loaded."""

    words_per_completion: int = Field(40, ge=1, le=100000)

    @property
    def model_id(self) -> str:
        return "fake:deterministic"

    @property
    def supports_json_schema(self) -> bool:
        return True

    @property
    def is_trained_model(self) -> bool:
        return False

    def _generate(self, requests: Sequence[ChatRequest], params: SamplingParams) -> list[Completion]:
        out = []
        for request in requests:
            rng = random.Random(f"{request.seed}|{request.messages}")
            if request.json_schema is not None:
                text = json.dumps(_fake_json(request.json_schema, rng))
            else:
                seed_text = request.messages[-1][1].split('"')[1] if '"' in request.messages[-1][1] else ""
                body = " ".join(rng.choice(_VOCAB) for _ in range(self.words_per_completion))
                text = f"{seed_text} The scene shows {body}."
            n = min(len(text.split()), params.max_tokens)
            out.append(Completion(text=text, prompt_tokens=sum(len(c.split()) for _, c in request.messages),
                                  completion_tokens=n, finish_reason="stop"))
        return out


def _fake_json(schema: dict[str, Any], rng: random.Random) -> Any:
    kind = schema.get("type")
    if "enum" in schema:
        return rng.choice(schema["enum"])
    if kind == "object":
        return {k: _fake_json(v, rng) for k, v in schema.get("properties", {}).items()}
    if kind == "array":
        n = max(schema.get("minItems", 1), min(schema.get("maxItems", 3), 3))
        return [_fake_json(schema.get("items", {}), rng) for _ in range(n)]
    if kind == "integer":
        return rng.randint(schema.get("minimum", 0), schema.get("maximum", 9))
    if kind == "number":
        return rng.random()
    if kind == "boolean":
        return rng.random() < 0.5
    return " ".join(rng.choice(_VOCAB) for _ in range(6))
