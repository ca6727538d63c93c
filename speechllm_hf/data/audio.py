"""Audio loading for the data pipeline: any clip reference -> float32 mono waveform, and cheap durations.

Decoding, downmixing and resampling are the processor's (`speechllm_hf.models.speechllm.processing_speechllm`):
this module only routes the kinds of input a manifest or a `datasets.Dataset` can hold to those helpers. `datasets`
never decodes audio here (its `Audio` feature needs torchcodec + FFmpeg from datasets 4 on): soundfile does.
"""

from __future__ import annotations

import io
import numbers
import os
from typing import Any

import numpy as np

from speechllm_hf.models.speechllm.audio_speechllm import (
    check_audio_file,
    check_sampling_rate,
    load_audio_file,
    prepare_waveform,
    to_mono_float32,
)

AudioSource = Any  # str | os.PathLike | bytes | np.ndarray | torch.Tensor | list[float] | dict (datasets Audio)


def _normalise(source: AudioSource) -> AudioSource:
    """Path-likes become str and byte buffers become bytes, the forms `prepare_waveform` dispatches on; no clip at
    all (a row's null audio) or a number is a `ValueError` saying so, rather than an array without a sampling rate."""
    if source is None:
        raise ValueError("No audio: the clip is null (a row without audio?); give a file path, bytes or samples.")
    if isinstance(source, numbers.Number):  # e.g. a duration or an id in the audio column
        raise ValueError(
            f"A clip is a file path, encoded bytes, samples or an audio dict; got the {type(source).__name__} "
            f"{source!r}: is the audio column the right one (--audio_column)?"
        )
    if isinstance(source, os.PathLike):
        return os.fspath(source)
    if isinstance(source, (bytearray, memoryview)):
        return bytes(source)
    if isinstance(source, dict):
        return {
            key: _normalise(value) if key in ("path", "bytes") and value is not None else value
            for key, value in source.items()
        }
    return source


def unwrap_audio(source: AudioSource, sampling_rate: int | None = None) -> tuple[AudioSource, int | None]:
    """The one reference a clip source carries, preferring in-memory data, and its sampling rate when known.

    A parquet `{"bytes", "path"}` dict often holds the clip's bytes with its original file name as `path`, a file that
    does not exist here: the bytes are the clip. Decoding, durations and the feature cache's clip keys all go
    through this function, so they agree on which data a row's audio is.

    Args:
        source: Any input `load_audio` accepts.
        sampling_rate: The rate of `source` when it is an array without one.

    Returns:
        `(reference, rate)`: a path string, encoded bytes or an array of samples; and the rate of an array (None for
        paths and bytes, whose headers carry it).

    Raises:
        ValueError: If an audio dict holds none of 'array', 'bytes' and 'path'.
    """
    source = _normalise(source)
    if not isinstance(source, dict):
        return source, sampling_rate
    if source.get("array") is not None:
        return source["array"], source.get("sampling_rate", sampling_rate)
    if source.get("bytes") is not None:
        return source["bytes"], None
    if source.get("path") is not None:
        return source["path"], None
    raise ValueError("An audio dict needs 'array' + 'sampling_rate', 'bytes' or 'path'.")


def load_audio(source: AudioSource, sampling_rate: int | None = None, target_rate: int = 16000) -> np.ndarray:
    """Loads one clip as a float32 mono waveform at `target_rate`.

    Args:
        source: A file path (wav, flac, ogg, ... anything libsndfile reads), raw encoded bytes, an array, tensor or
            list of samples (1-D, or 2-D samples x channels), or a `datasets` Audio dict (`{"array",
            "sampling_rate"}` or `{"bytes", "path"}`).
        sampling_rate: The rate of `source` when it is an array without one.
        target_rate: The rate of the returned waveform.

    Returns:
        A 1-D float32 array in [-1, 1] at `target_rate`.

    Raises:
        ValueError: If the clip cannot be decoded, has no (or a non-positive) sampling rate, is empty or holds
            NaN/inf samples.
    """
    return prepare_waveform(_normalise(source), sampling_rate, target_rate)


def decode_audio(source: AudioSource, sampling_rate: int | None = None) -> tuple[np.ndarray, int]:
    """Decodes one clip at its own rate, without validating it (validation wants to classify what is wrong).

    Args:
        source: Any input `load_audio` accepts.
        sampling_rate: The rate of `source` when it is an array without one.

    Returns:
        `(waveform, rate)`: a 1-D float32 mono array (possibly empty or non-finite) and its sampling rate.

    Raises:
        ValueError: If the clip cannot be decoded or an array has no (or a non-positive) sampling rate.
    """
    source, sampling_rate = unwrap_audio(source, sampling_rate)
    if isinstance(source, (bytes, str)):
        source, sampling_rate = load_audio_file(io.BytesIO(source) if isinstance(source, bytes) else source)
        return to_mono_float32(source), int(sampling_rate)
    return to_mono_float32(source), check_sampling_rate(sampling_rate, "An audio array")


def audio_duration(source: AudioSource, sampling_rate: int | None = None) -> float:
    """Duration of one clip in seconds, reading only the header when it is a file or encoded bytes.

    Args:
        source: Any input `load_audio` accepts.
        sampling_rate: The rate of `source` when it is an array without one.

    Returns:
        The duration in seconds at the clip's own rate.

    Raises:
        ValueError: If the header cannot be read or an array has no (or a non-positive) sampling rate.
    """
    source, sampling_rate = unwrap_audio(source, sampling_rate)
    if isinstance(source, (bytes, str)):
        import soundfile

        if isinstance(source, str):
            check_audio_file(source)
        try:
            info = soundfile.info(io.BytesIO(source) if isinstance(source, bytes) else source)
        except Exception as err:  # soundfile raises LibsndfileError, RuntimeError or OSError depending on the case
            name = "<bytes>" if isinstance(source, bytes) else repr(source)
            raise ValueError(f"Cannot read the audio header of {name}: {err}") from err
        return info.frames / info.samplerate
    sampling_rate = check_sampling_rate(sampling_rate, "An audio array")
    shape = np.shape(source)
    # 2-D arrays are (samples, channels) or (channels, samples): the longer axis is time, as in to_mono_float32.
    return (max(shape) if len(shape) == 2 else shape[0] if shape else 0) / sampling_rate


def wav_shortfall(source: AudioSource) -> tuple[int, int] | None:
    """`(declared, present)`: the bytes of samples a WAV file's header declares and those the file holds, when it
    holds fewer (a copy or download cut short); None for any other file, or a complete one.

    libsndfile reads such a file without a word, as the part that is there, so its duration looks like a clip's; only
    the header's data chunk size tells. Other formats are not checked: a cut FLAC fails to decode, while Ogg and MP3
    headers declare no length.

    Args:
        source: Any input `load_audio` accepts; only paths and encoded bytes are read (their first chunk headers).
    """
    source, _ = unwrap_audio(source)
    if not isinstance(source, (bytes, str)):
        return None
    with io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb") as file:
        header = file.read(12)
        if len(header) < 12 or header[:4] != b"RIFF" or header[8:] != b"WAVE":
            return None
        size = file.seek(0, io.SEEK_END)
        position = 12
        while position + 8 <= size:  # RIFF chunks: 4-byte id, 4-byte little-endian length, data padded to even
            file.seek(position)
            chunk = file.read(8)
            length = int.from_bytes(chunk[4:], "little")
            if chunk[:4] == b"data":
                present = size - position - 8
                # 0xFFFFFFFF: a length left unknown by a streaming writer, not a claim.
                return (length, present) if length != 0xFFFFFFFF and present < length else None
            position += 8 + length + length % 2
    return None


def audio_ref(audio: Any) -> str:
    """How a dropped (or failed) row's audio is named in a report file: its path, or what in-memory data it was."""
    if isinstance(audio, (str, os.PathLike)):
        return os.fspath(audio)
    if isinstance(audio, dict):
        if audio.get("path"):
            return str(audio["path"])
        return "<bytes>" if audio.get("bytes") is not None and audio.get("array") is None else "<array>"
    return "<bytes>" if isinstance(audio, (bytes, bytearray, memoryview)) else "<array>"


__all__ = ["AudioSource", "load_audio", "decode_audio", "audio_duration", "unwrap_audio", "audio_ref", "wav_shortfall"]
