"""Data pipeline: audio loading, manifests -> `datasets`, offline validation with a report, length-grouped sampling."""

from .audio import audio_duration, decode_audio, load_audio
from .collator import IGNORE_INDEX, SpeechLlmCollator
from .manifest import cast_audio_undecoded, load_manifest
from .prepare import REASONS, load_prepared, prepare_dataset
from .sampler import LengthGroupedSampler, padding_fraction, to_batches

__all__ = [
    "SpeechLlmCollator",
    "IGNORE_INDEX",
    "load_audio",
    "decode_audio",
    "audio_duration",
    "load_manifest",
    "cast_audio_undecoded",
    "REASONS",
    "prepare_dataset",
    "load_prepared",
    "LengthGroupedSampler",
    "padding_fraction",
    "to_batches",
]
