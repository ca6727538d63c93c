"""Inference: batched generation, streaming, and the "speech-llm" transformers pipeline (registered on import)."""

from .generate import (
    DEFAULT_GENERATE_KWARGS,
    GenerationRequest,
    GenerationResult,
    build_generation_config,
    build_prompt,
    generate_responses,
    iter_generate,
    stream_generate,
)
from .pipeline import SpeechLlmPipeline

__all__ = [
    "DEFAULT_GENERATE_KWARGS",
    "GenerationRequest",
    "GenerationResult",
    "SpeechLlmPipeline",
    "build_generation_config",
    "build_prompt",
    "generate_responses",
    "iter_generate",
    "stream_generate",
]
