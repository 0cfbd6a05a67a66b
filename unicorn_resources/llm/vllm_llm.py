"""The in-process vLLM engine, for GPU nodes. vLLM is the optional `gpu` extra (it pins its own
CUDA torch), so it is imported only when the engine starts."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from types import ModuleType
from typing import Any

import dagster as dg
from pydantic import Field, PrivateAttr

from unicorn_resources.llm.base import LLMResource
from unicorn_resources.llm.types import ChatRequest, Completion, SamplingParams


def import_vllm() -> ModuleType:
    try:
        import vllm
    except ImportError as err:
        raise ImportError(
            "the vllm LLM backend needs vLLM, which is not installed: install the GPU extra with "
            "`pip install '.[gpu]'` on a CUDA machine, or pick another llm.backend "
            f"(llama_cpp, transformers, openai) in the profile ({err})") from err
    return vllm


class VllmLLM(LLMResource):
    """`vllm.LLM`, created at the run's first cache miss (once; a run the response cache answers
    whole starts no engine) and shut down after the run. A call sends
    its prompts to the engine in `chat` batches of up to `sub_batch_size`, so continuous batching
    does the work, and each batch's completions are in the response cache as soon as it is done;
    each request carries its own seed and, for Stage 2, its JSON schema (structured outputs)."""

    model: str  # an HF id or a local path; a .gguf file needs `tokenizer` too
    tokenizer: str | None = None
    tensor_parallel_size: int = Field(1, ge=1, le=64)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    max_model_len: int | None = Field(None, ge=256, le=2**21)  # None: the model's own context length
    dtype: str = "auto"  # auto | bfloat16 | float16 | float32
    engine_args: dict[str, Any] = {}  # any further vllm.LLM argument (quantization, enforce_eager…)
    # Requests per `chat` call. Larger keeps the GPU busier at the end of each batch; smaller
    # loses less finished work to a crash (the cache keeps every finished batch).
    sub_batch_size: int = Field(default=512, ge=1)

    _engine: Any = PrivateAttr(default=None)

    @property
    def model_id(self) -> str:
        return f"vllm:{self.model}"

    @property
    def supports_json_schema(self) -> bool:
        return True

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        engine, self._engine = self._engine, None
        if engine is None:
            return
        engine.llm_engine.engine_core.shutdown()  # the engine core runs in its own process
        del engine
        from vllm.distributed import cleanup_dist_env_and_memory

        cleanup_dist_env_and_memory()

    def engine_kwargs(self) -> dict[str, Any]:
        kwargs = {"model": self.model, "tensor_parallel_size": self.tensor_parallel_size,
                  "gpu_memory_utilization": self.gpu_memory_utilization, "dtype": self.dtype,
                  **self.engine_args}
        if self.tokenizer:
            kwargs["tokenizer"] = self.tokenizer
        if self.max_model_len:
            kwargs["max_model_len"] = self.max_model_len
        return kwargs

    def _load(self) -> Any:
        if self._engine is None:
            self._engine = import_vllm().LLM(**self.engine_kwargs())
        return self._engine

    def sampling_params(self, request: ChatRequest, params: SamplingParams) -> Any:
        """The vllm.SamplingParams of one request."""
        vllm = import_vllm()
        kwargs: dict[str, Any] = {
            "temperature": params.temperature, "top_p": params.top_p,
            "max_tokens": params.max_tokens, "repetition_penalty": params.repeat_penalty,
            "seed": request.seed,
        }
        if request.json_schema is not None:
            from vllm.sampling_params import StructuredOutputsParams

            kwargs["structured_outputs"] = StructuredOutputsParams(json=request.json_schema)
        return vllm.SamplingParams(**kwargs)

    def _generate(self, requests: Sequence[ChatRequest], params: SamplingParams
                  ) -> Iterator[list[Completion]]:
        engine = self._load()
        for start in range(0, len(requests), self.sub_batch_size):
            batch = requests[start : start + self.sub_batch_size]
            outputs = engine.chat([r.message_dicts() for r in batch],
                                  sampling_params=[self.sampling_params(r, params) for r in batch],
                                  use_tqdm=False)
            completions = []
            for output in outputs:
                best = output.outputs[0]
                completions.append(Completion(
                    text=best.text, prompt_tokens=len(output.prompt_token_ids or []),
                    completion_tokens=len(best.token_ids),
                    finish_reason=best.finish_reason or "stop",
                ))
            yield completions
