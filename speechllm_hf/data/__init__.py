"""Batch-time data code: audio loading, manifests -> `datasets`, collators, length-grouped sampling (the offline tools
are in `speechllm_hf.preprocessing`)."""

from .audio import audio_duration, decode_audio, load_audio
from .collators import IGNORE_INDEX, SpeechLlmCollator
from .manifest import cast_audio_undecoded, load_manifest
from .sampler import LengthGroupedSampler, padding_fraction, to_batches

__all__ = [
    "SpeechLlmCollator",
    "IGNORE_INDEX",
    "load_audio",
    "decode_audio",
    "audio_duration",
    "load_manifest",
    "cast_audio_undecoded",
    "LengthGroupedSampler",
    "padding_fraction",
    "to_batches",
]
