"""speechllm_hf: HuggingFace-compatible speech LLMs (speech encoder -> trainable projector -> causal LLM)."""

from transformers import AutoConfig, AutoModel, AutoProcessor

from . import (
    inference,  # noqa: F401  (registers the "speech-llm" pipeline task)
    models,
)
from .models.speechllm import *  # noqa: F403  (the model classes, listed once in models.speechllm.__all__)
from .models.speechllm import SpeechLlmConfig, SpeechLlmForConditionalGeneration, SpeechLlmProcessor
from .presets import PRESETS, from_preset

__version__ = "0.1.0.dev0"

# In-process registration, so that AutoConfig/AutoModel/AutoProcessor resolve `model_type="speechllm_hf"` without
# trust_remote_code; `register_for_auto_class` makes save_pretrained write `auto_map` and ship the code files.
AutoConfig.register(SpeechLlmConfig.model_type, SpeechLlmConfig, exist_ok=True)
AutoModel.register(SpeechLlmConfig, SpeechLlmForConditionalGeneration, exist_ok=True)
AutoProcessor.register(SpeechLlmConfig, SpeechLlmProcessor, exist_ok=True)
SpeechLlmConfig.register_for_auto_class()
SpeechLlmForConditionalGeneration.register_for_auto_class("AutoModel")
SpeechLlmProcessor.register_for_auto_class("AutoProcessor")

__all__ = [*models.speechllm.__all__, "from_preset", "PRESETS"]
