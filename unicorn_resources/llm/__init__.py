from unicorn_resources.llm.base import (
    ChatRequest,
    Completion,
    LLMResource,
    SamplingParams,
    default_gguf_path,
)
from unicorn_resources.llm.fake import FakeLLM
from unicorn_resources.llm.llama_cpp import LlamaCppLLM
from unicorn_resources.llm.transformers_llm import TransformersLLM

__all__ = [
    "ChatRequest",
    "Completion",
    "FakeLLM",
    "LLMResource",
    "LlamaCppLLM",
    "SamplingParams",
    "TransformersLLM",
    "default_gguf_path",
]
