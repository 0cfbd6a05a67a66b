from unicorn_resources.llm.base import (
    ChatRequest,
    Completion,
    GenerationError,
    LLMResource,
    SamplingParams,
    default_gguf_path,
)
from unicorn_resources.llm.cache import ResponseCache, request_key
from unicorn_resources.llm.fake import FakeLLM
from unicorn_resources.llm.llama_cpp import LlamaCppLLM
from unicorn_resources.llm.openai_llm import OpenAILLM
from unicorn_resources.llm.transformers_llm import TransformersLLM
from unicorn_resources.llm.vllm_llm import VllmLLM

__all__ = [
    "ChatRequest",
    "Completion",
    "FakeLLM",
    "GenerationError",
    "LLMResource",
    "LlamaCppLLM",
    "OpenAILLM",
    "ResponseCache",
    "SamplingParams",
    "TransformersLLM",
    "VllmLLM",
    "default_gguf_path",
    "request_key",
]
