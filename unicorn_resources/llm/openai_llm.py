"""Any OpenAI-compatible chat-completions server: a `vllm serve` fleet, SGLang, TGI, the llama.cpp
server, or a hosted API, through the official `openai` SDK."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import openai
from openai.types.chat import ChatCompletion
from pydantic import Field

from unicorn_resources.llm.base import LLMResource
from unicorn_resources.llm.types import ChatRequest, Completion, GenerationError, SamplingParams


class OpenAILLM(LLMResource):
    """Sends every request of a call concurrently, at most `max_in_flight` at a time in all, spread
    over `base_urls` (each worker keeps to one URL and takes the next request when it is free, so a
    faster server takes more). The SDK retries 408/409/429/5xx, timeouts and refused connections
    `max_retries` times with exponential backoff and jitter (0.5 s doubling to 8 s, or the server's
    Retry-After); any other 4xx fails at once. One failed request fails the whole call."""

    model: str  # the model name the server knows, e.g. "Qwen/Qwen2.5-72B-Instruct"
    base_urls: list[str] = Field(min_length=1)  # e.g. ["http://vllm-0:8000/v1", "http://vllm-1:8000/v1"]
    api_key: str | None = None  # give it as {env: NAME} (an EnvVar); servers without auth take any
    max_in_flight: int = Field(32, ge=1, le=65536)
    timeout_s: float = Field(300.0, gt=0, le=86400)  # per request (one attempt)
    max_retries: int = Field(5, ge=0, le=100)
    # How a JSON schema is sent: "json_schema" (OpenAI, vLLM, SGLang), "json_object" (the llama.cpp
    # server's {"type": "json_object", "schema": ...}), or "none" (server without structured output).
    structured_output: Literal["json_schema", "json_object", "none"] = "json_schema"
    # The server's name for the repetition penalty: vLLM and SGLang `repetition_penalty`, the
    # llama.cpp server `repeat_penalty`; null for a hosted API that has none.
    repeat_penalty_param: str | None = "repetition_penalty"

    @property
    def model_id(self) -> str:
        return f"openai:{self.model}"

    @property
    def supports_json_schema(self) -> bool:
        return self.structured_output != "none"

    def _generate(self, requests: Sequence[ChatRequest], params: SamplingParams
                  ) -> Iterator[list[Completion]]:
        """Runs the requests on an event loop of its own and, whenever it wakes, yields the
        completions finished since, up to the first request still running (request order)."""
        if not self.base_urls:
            raise ValueError("the openai llm needs at least one entry in base_urls")
        requests = list(requests)
        done: dict[int, Completion] = {}
        arrived = asyncio.Event()
        loop = asyncio.new_event_loop()
        run = loop.create_task(self._run_all(requests, params, done, arrived))
        try:
            given = 0
            while given < len(requests):
                while given not in done and not run.done():
                    loop.run_until_complete(_next_arrival(arrived, run))
                if given not in done:
                    run.result()  # the call failed: raises its GenerationError
                    raise GenerationError(f"request {given} got no answer", retryable=False)
                finished = []
                while given in done:
                    finished.append(done[given])
                    given += 1
                yield finished
            loop.run_until_complete(run)
        finally:  # also when the caller stops early: cancel what still runs, close the clients
            if not run.done():
                run.cancel()
                with contextlib.suppress(BaseException):
                    loop.run_until_complete(run)
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()

    def request_body(self, request: ChatRequest, params: SamplingParams) -> dict[str, Any]:
        """The keyword arguments of `chat.completions.create` for one request."""
        body: dict[str, Any] = {
            "model": self.model, "messages": request.message_dicts(),
            "temperature": params.temperature, "top_p": params.top_p,
            "max_tokens": params.max_tokens,
        }
        if request.seed is not None:
            body["seed"] = request.seed
        if self.repeat_penalty_param:
            body["extra_body"] = {self.repeat_penalty_param: params.repeat_penalty}
        if request.json_schema is not None:
            if self.structured_output == "json_schema":
                body["response_format"] = {"type": "json_schema", "json_schema": {
                    "name": "output", "schema": request.json_schema, "strict": True}}
            elif self.structured_output == "json_object":
                body["response_format"] = {"type": "json_object", "schema": request.json_schema}
        return body

    async def _run_all(self, requests: list[ChatRequest], params: SamplingParams,
                       done: dict[int, Completion], arrived: asyncio.Event) -> None:
        """Fills `done` (request index: completion), setting `arrived` after each."""
        pending = iter(enumerate(requests))
        clients = [openai.AsyncOpenAI(base_url=url, api_key=self.api_key or "none",
                                      timeout=self.timeout_s, max_retries=self.max_retries)
                   for url in self.base_urls]

        async def worker(client: openai.AsyncOpenAI) -> None:
            for index, request in pending:  # one shared iterator: each request is taken once
                done[index] = await self._complete(client, index, request, params)
                arrived.set()

        n_workers = min(self.max_in_flight, len(requests))
        try:
            async with asyncio.TaskGroup() as group:  # the first failure cancels the rest
                for w in range(n_workers):
                    group.create_task(worker(clients[w % len(clients)]))
        except* Exception as failures:  # noqa: BLE001 - any failure fails the whole call
            first = failures.exceptions[0]
            ours = isinstance(first, GenerationError)  # its message already says what failed
            kept = "; the response cache keeps them" if done else ""
            raise GenerationError(self._redact(
                f"{first if ours else repr(first)} ({len(done)} of {len(requests)} requests had "
                f"finished{kept})"), done,
                retryable=first.retryable if ours else True) from (None if ours else first)
        finally:
            for client in clients:
                await client.close()

    async def _complete(self, client: openai.AsyncOpenAI, index: int, request: ChatRequest,
                        params: SamplingParams) -> Completion:
        where = f"{client.base_url} request {index}"
        try:
            response = await client.chat.completions.create(**self.request_body(request, params))
        except openai.APIStatusError as err:
            retryable = err.status_code in (408, 409, 429) or err.status_code >= 500
            how = (f"after {self.max_retries} retries with backoff" if retryable
                   else "not retried: a client error, check model, api key and request")
            raise GenerationError(f"{where}: HTTP {err.status_code} ({how}): {err.message}",
                                  retryable=retryable) from None
        except openai.APITimeoutError:
            raise GenerationError(f"{where}: no answer within timeout_s={self.timeout_s} after "
                                  f"{self.max_retries} retries with backoff") from None
        except openai.APIConnectionError as err:
            raise GenerationError(f"{where}: server unreachable after {self.max_retries} retries "
                                  f"with backoff ({err.__cause__ or err})") from None
        except json.JSONDecodeError as err:
            raise GenerationError(f"{where}: the server answered malformed JSON ({err}); is this "
                                  "an OpenAI-compatible endpoint?", retryable=False) from None
        return self._completion(where, response)

    @staticmethod
    def _completion(where: str, response: Any) -> Completion:
        if not isinstance(response, ChatCompletion):
            raise GenerationError(f"{where}: the server did not answer a chat completion but "
                                  f"{str(response)[:200]!r}", retryable=False)
        if not response.choices or response.choices[0].message.content is None:
            raise GenerationError(f"{where}: the answer holds no message content",
                                  retryable=False)
        choice, usage = response.choices[0], response.usage
        return Completion(
            text=choice.message.content, prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=usage.completion_tokens if usage else 0,
            finish_reason=choice.finish_reason or "stop",
        )

    def _redact(self, text: str) -> str:
        return text.replace(self.api_key, "***") if self.api_key else text


async def _next_arrival(arrived: asyncio.Event, run: asyncio.Task) -> None:
    """Wait until the next completion arrives or `run` has finished."""
    arrived.clear()
    waiter = asyncio.ensure_future(arrived.wait())
    try:
        await asyncio.wait({waiter, run}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
