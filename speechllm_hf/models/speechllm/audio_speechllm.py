"""Audio for the processor and the pipeline: reading a file, mono float32 samples, resampling.

This file ships to the Hub with `trust_remote_code`: it imports only torch, numpy (a transformers requirement) and
the standard library; soxr and soundfile are imported only when resampling or reading a file.
"""

from __future__ import annotations

import errno
import io
import os
import stat
import warnings
from collections.abc import Sequence

import numpy as np
import torch


def load_audio_file(path: str | os.PathLike | io.BytesIO) -> tuple[np.ndarray, int]:
    """Decode an audio file (wav, flac, ogg, ...) with soundfile: ((samples, channels) or (samples,), rate)."""
    try:
        import soundfile
    except ImportError as err:
        raise ImportError("Reading audio files needs soundfile: `pip install soundfile`.") from err
    if isinstance(path, (str, os.PathLike)):
        check_audio_file(path)
    try:
        samples, sampling_rate = soundfile.read(path, always_2d=False)
    except Exception as err:  # soundfile raises LibsndfileError, RuntimeError or OSError depending on the case
        raise ValueError(f"Cannot decode audio file {path!r}: {err}") from err
    return samples, sampling_rate


def check_audio_file(path: str | os.PathLike) -> None:
    """Raises a `ValueError` that says why `path` cannot be read as an audio file: an empty path, a missing file, a
    broken or looping symbolic link, a directory, something other than a regular file (reading a pipe or a device
    would block or never end) or a file this user may not read."""
    name = os.fspath(path)
    if not name:
        raise ValueError("The audio path is empty: give the clip's file path.")
    try:
        mode = os.stat(name).st_mode
        if stat.S_ISREG(mode):
            open(name, "rb").close()  # permissions: the stat of a file this user may not read succeeds
    except FileNotFoundError:
        if os.path.islink(name):
            target = os.readlink(name)
            raise ValueError(
                f"Audio file {name!r} is a broken symbolic link to {target!r}, which does not exist."
            ) from None
        raise ValueError(f"Audio file {name!r} does not exist.") from None
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise ValueError(f"Audio file {name!r} is a symbolic link loop: it never reaches a file.") from None
        hint = " Make it readable by this user (`chmod a+r`)." if isinstance(err, PermissionError) else ""
        raise ValueError(f"Audio file {name!r} cannot be read: {err.strerror}.{hint}") from None
    if stat.S_ISDIR(mode):
        raise ValueError(f"Audio path {name!r} is a directory, not an audio file.")
    if not stat.S_ISREG(mode):
        raise ValueError(f"Audio path {name!r} is not a regular file (a pipe, socket or device): give an audio file.")


def resample(waveform: np.ndarray, orig_rate: int, target_rate: int) -> np.ndarray:
    """Resample a mono float32 waveform with soxr (high quality, fast)."""
    if orig_rate == target_rate:
        return waveform
    try:
        import soxr
    except ImportError as err:
        raise ImportError(
            f"Audio at {orig_rate} Hz must be resampled to {target_rate} Hz, which needs soxr: `pip install soxr`."
        ) from err
    return soxr.resample(waveform, orig_rate, target_rate).astype(np.float32)


def to_mono_float32(samples: np.ndarray | torch.Tensor | Sequence[float]) -> np.ndarray:
    """Samples as float32 mono: integer PCM is scaled to [-1, 1], float samples are kept as they are, channels are
    averaged.

    A 2-D array is read as (samples, channels) or (channels, samples): the shorter axis is taken as the channels.
    8-, 16- and 32-bit integers are PCM of that width; 64-bit integers (what a Python list of ints becomes) have no
    PCM scale and are refused. Float32 mono samples are returned as they are, not copied.
    """
    if isinstance(samples, torch.Tensor):
        samples = samples.detach().cpu()
        # numpy has no bfloat16; every float tensor ends as float32 anyway.
        samples = (samples.float() if samples.is_floating_point() else samples).numpy()
    samples = np.asarray(samples)
    if samples.dtype.kind in "iu" and samples.dtype.itemsize > 4:
        raise ValueError(
            f"Audio samples of dtype {samples.dtype} have no PCM scale (a Python list of ints becomes int64): give "
            "integer PCM as int16 or int32 (e.g. `np.asarray(samples, dtype=np.int16)`), or floats in [-1, 1]."
        )
    if samples.dtype.kind in "iu":
        info = np.iinfo(samples.dtype)
        # Scale so that full-scale PCM maps to [-1, 1); unsigned PCM (8-bit wav) is offset by its midpoint.
        offset = (info.max + 1) / 2 if samples.dtype.kind == "u" else 0.0
        samples = (samples.astype(np.float64) - offset) / max(abs(info.min), info.max + 1 - offset)
    elif samples.dtype.kind != "f":
        raise ValueError(f"Audio samples must be numbers; got dtype {samples.dtype}.")
    if samples.ndim == 2 and samples.size == 0:  # e.g. (0, 2): no samples, whichever axis holds the channels
        return np.zeros(0, dtype=np.float32)
    if samples.ndim == 2:
        channel_axis = 0 if samples.shape[0] < samples.shape[1] else 1
        samples = samples.mean(axis=channel_axis)
    elif samples.ndim != 1:
        raise ValueError(f"Audio must be 1-D (samples) or 2-D (samples x channels); got shape {samples.shape}.")
    # No copy of a clip that already is float32 mono (an hour of it is 230 MB); nothing downstream writes to it.
    return samples.astype(np.float32, copy=False)


def check_sampling_rate(sampling_rate, name: str = "Audio clip", target_rate: int | None = None) -> int:
    """The rate of a clip given as samples, as an int; a `ValueError` naming the clip (`name`) when it is missing
    or not a positive number."""
    if sampling_rate is None:
        target = f"the {target_rate} Hz the feature extractor expects" if target_rate else "the model's rate"
        raise ValueError(
            f"{name} has no sampling rate: pass `sampling_rate=` (an int, or one per clip) so that it can be "
            f"resampled to {target}."
        )
    try:
        rate = int(sampling_rate)
    except (TypeError, ValueError):
        rate = 0
    if rate <= 0:
        raise ValueError(f"{name} has sampling rate {sampling_rate!r}: give its rate in Hz, a positive number.")
    return rate


def prepare_waveform(audio, sampling_rate: int | None, target_rate: int, index: int | None = None) -> np.ndarray:
    """Any accepted clip -> a validated float32 mono waveform at `target_rate`.

    Accepts an array/tensor/list of samples with `sampling_rate`, a `datasets` Audio dict
    (`{"array", "sampling_rate"}` or `{"path"}` / `{"bytes"}`), transformers' speech-recognition pipeline dict
    (`{"raw", "sampling_rate"}`), a file path, or raw encoded bytes.
    Raises `ValueError` naming the clip (`index`, when given) for a missing or non-positive sampling rate, an empty
    clip or NaN/inf samples. Float samples above full scale (1.0) are kept, with a warning: they are most often integer
    PCM converted to float without scaling, which log-mel features do not normalise away.
    """
    name = "Audio clip" if index is None else f"Audio clip {index}"
    if isinstance(audio, dict):
        if audio.get("stride") is not None:
            raise ValueError(
                f"{name}: 'stride' (chunked long-form decoding in transformers' speech-recognition pipeline) is not "
                "supported; split long audio into clips the encoder accepts."
            )
        # transformers' ASR pipeline's key, then `datasets`' (a key present with None counts as absent, as there)
        samples = audio.get("raw") if audio.get("raw") is not None else audio.get("array")
        if samples is not None:
            audio, sampling_rate = samples, audio.get("sampling_rate", sampling_rate)
        elif audio.get("bytes") is not None:
            audio = audio["bytes"]
        elif audio.get("path") is not None:
            audio = audio["path"]
        else:
            raise ValueError(f"{name}: a dict needs 'array' (or 'raw') + 'sampling_rate', 'bytes' or 'path'.")
    if isinstance(audio, (bytes, bytearray, memoryview)):  # encoded file data, never samples
        audio, sampling_rate = load_audio_file(io.BytesIO(bytes(audio)))
    elif isinstance(audio, (str, os.PathLike)):
        audio, sampling_rate = load_audio_file(audio)
    rate = check_sampling_rate(sampling_rate, name, target_rate)
    waveform = to_mono_float32(audio)
    # The extremes answer both checks without a temporary the size of the clip: min and max propagate NaN.
    low, high = (float(waveform.min()), float(waveform.max())) if waveform.size else (0.0, 0.0)
    if not (np.isfinite(low) and np.isfinite(high)):
        raise ValueError(f"{name} holds NaN or infinite samples; clean or drop it.")
    if max(high, -low) > 1.0:
        # A `warnings` warning with a fixed text, shown once per call site: a training loop would otherwise repeat it
        # every batch.
        warnings.warn(
            "Audio holds float samples above full scale (1.0). Float samples are read as they are, so integer PCM "
            "converted to float must be scaled first (divide int16 values by 32768), or passed as integers.",
            UserWarning,
            stacklevel=2,
        )
    waveform = resample(waveform, rate, target_rate)
    if waveform.size == 0:  # checked after resampling: a few samples at 48 kHz can become none at 16 kHz
        raise ValueError(f"{name} is empty (0 samples at {target_rate} Hz).")
    return waveform


__all__ = [
    "check_audio_file",
    "check_sampling_rate",
    "load_audio_file",
    "prepare_waveform",
    "resample",
    "to_mono_float32",
]
