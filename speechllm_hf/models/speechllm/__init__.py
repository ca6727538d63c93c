"""The Hub-shipped model folder: config, model and processor (see docs/concepts.md)."""

from .configuration_speechllm import SpeechLlmConfig
from .modeling_speechllm import SpeechLlmForConditionalGeneration, SpeechLlmPreTrainedModel
from .modules_speechllm import (
    SpeechLlmCnnProjector,
    SpeechLlmMlpProjector,
    SpeechLlmQFormerProjector,
    SpeechLlmWhisperEncoder,
)
from .processing_speechllm import SpeechLlmProcessor

__all__ = [
    "SpeechLlmConfig",
    "SpeechLlmForConditionalGeneration",
    "SpeechLlmPreTrainedModel",
    "SpeechLlmProcessor",
    "SpeechLlmQFormerProjector",
    "SpeechLlmCnnProjector",
    "SpeechLlmMlpProjector",
    "SpeechLlmWhisperEncoder",
]
