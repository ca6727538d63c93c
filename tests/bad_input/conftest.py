"""What the bad-input tests share: the tiny models, manifest and report helpers, and the clip strategies of the
property tests.

The folder is a package (its `__init__.py`), so that this file loads as `bad_input.conftest` and leaves the name
`conftest`, which every test module imports its helpers from, to `tests/conftest.py`.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import numpy as np
import pytest
import soxr
from conftest import clip, tiny
from hypothesis import strategies as st
from transformers import pipeline

from speechllm_hf.inference import generate_responses

RATE = 16000
TOKENS = 2  # new tokens per generated row: only whether a row is answered matters here


@pytest.fixture(scope="module")
def hubert():
    return tiny("hubert", "qformer")


@pytest.fixture(scope="module")
def pipe(hubert):
    model, processor = hubert
    return pipeline("speech-llm", model=model, processor=processor, max_new_tokens=TOKENS)


def write_manifest(folder: Path, rows: list[dict]) -> Path:
    path = folder / "manifest.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def dropped(report: dict) -> dict[str, int]:
    return {reason: count for reason, count in report["dropped"].items() if count}


def array_row(samples, rate: int = RATE, text: str = "hello there") -> dict:
    return {"audio": {"array": samples, "sampling_rate": rate}, "text": text}


def errors_of(model, processor, requests) -> dict[int, str]:
    results = generate_responses(model, processor, requests, batch_size=2, max_new_tokens=TOKENS)
    assert all((r.error is None) == (r.response is not None) for r in results)
    return {index: r.error for index, r in enumerate(results) if r.error is not None}


# ---------------------------------------------------------------------------------------------------------------------
# Property tests (test_audio.py, test_manifests.py): any mix of lengths, rates, dtypes, channel layouts and texts
# either gives consistent model inputs or one of the documented ValueErrors.

DTYPES = {"float32": 1.0, "float64": 1.0, "int16": 32767, "int32": 2**31 - 1}


def clip_specs(min_samples: int = 0):
    """(samples at its own rate, rate, dtype, channels, channels first?, seed): from none (or `min_samples`) to 3 s."""
    return st.tuples(
        st.integers(min_value=min_samples, max_value=24000),
        st.sampled_from([8000, 16000, 22050, 44100, 48000]),
        st.sampled_from(sorted(DTYPES)),
        st.integers(min_value=1, max_value=3),
        st.booleans(),  # channels first (torchaudio) or last (soundfile)
        st.integers(min_value=0, max_value=2**16),
    )


WORDS = st.text(alphabet=string.ascii_lowercase + " .,?'", max_size=40)


def make_clip(samples: int, rate: int, dtype: str, channels: int, first: bool, seed: int) -> np.ndarray:
    """A clip as a user could hand it over: mono (1-D), or channels last or first."""
    mono = clip(samples / rate, seed=seed, rate=rate)[:samples]
    data = np.stack([mono * (1 - 0.2 * c) for c in range(channels)], axis=1)  # (samples, channels)
    data = np.round(data * DTYPES[dtype]).astype(dtype) if dtype.startswith("int") else data.astype(dtype)
    if channels == 1:
        return data[:, 0]
    return data.T if first else data


def feature_length(model, samples: int, rate: int) -> int:
    """Feature frames of a clip at the model's rate (soxr's length; Whisper: one mel frame per 160 samples)."""
    length = len(soxr.resample(np.zeros(samples, dtype=np.float32), rate, RATE))
    return length // 160 if model.config.is_whisper_like_encoder else length


def expected_error(model, processor, clips) -> str | None:
    """The documented error a batch of clips raises, if any, from the clips' lengths alone."""
    for samples, rate, _, channels, *_ in clips:
        if 0 < samples < channels:
            # A clip shorter than its channel count has no telling orientation: read as `channels` samples of one
            # channel (the shorter axis is taken as the channels), it is refused as too short, not as empty.
            return "empty|too short"
        resampled = len(soxr.resample(np.zeros(samples, dtype=np.float32), rate, RATE))
        if resampled == 0:
            return "empty"
        # Whisper's STFT needs over 200 samples (its reflection padding); every encoder needs one audio token.
        too_few = model.config.is_whisper_like_encoder and resampled <= 200
        if too_few or processor.num_audio_tokens(feature_length(model, samples, rate)) < 1:
            return "too short"
    return None
