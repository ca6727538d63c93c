"""Mixed speech-text sequences for next-word prediction ("audio_nwp", Zuefle & Niehues, arXiv 2412.15712).

A word-aligned transcript (see `speechllm_hf.preprocessing.alignment`) is split into alternating spans: text spans
of 4-10 words and speech spans of 2-5 words, starting with either kind at random; punctuation is removed. Each speech
span is its own clip, cut from the utterance at the span's times, and encoded separately.

Sequence layout for training (no chat template)::

    BOS + span_1 + span_2 + ... + span_n + end-of-turn

where a text span is its words (joined by spaces, with a leading space when it follows a speech span, as inside the
sentence) and a speech span is one audio placeholder, which the processor expands to the clip's audio tokens. The
next-token loss covers text positions only: labels are the input ids on text tokens and the end-of-turn, and ignored on
BOS, audio tokens and padding (`data.collators.mixed_labels`). `mixed_sequence_layout` builds the text for
`SpeechLlmProcessor`, whose audio list is then the speech spans' clips in order (`cut_audio`).
"""

from __future__ import annotations

import random
import unicodedata
from collections.abc import Sequence
from typing import Any

import numpy as np

# Chat end-of-turn tokens, in the order they are looked for; tokenizers with none end the sequence with EOS.
END_OF_TURN_TOKENS = ("<|eot_id|>", "<|im_end|>", "<end_of_turn>", "<|end|>")


def strip_punctuation(word: str) -> str:
    """Removes punctuation (Unicode category P*) from a word, keeping apostrophes between letters ("don't").

    Args:
        word: One word.

    Returns:
        The word without punctuation; empty for a word made of punctuation only.
    """
    kept = []
    for i, char in enumerate(word):
        inner_apostrophe = (
            char in "'\u2019" and 0 < i < len(word) - 1 and word[i - 1].isalpha() and word[i + 1].isalpha()
        )
        if inner_apostrophe or not unicodedata.category(char).startswith("P"):
            kept.append(char)
    return "".join(kept)


def _clean(words: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Words without punctuation; a word left empty gives its time to the previous word (leading ones to the next)."""
    cleaned: list[dict[str, Any]] = []
    pending_start: float | None = None
    for word in words:
        text = strip_punctuation(word["word"])
        if not text:
            if cleaned:
                cleaned[-1]["end"] = max(cleaned[-1]["end"], word["end"])
            elif pending_start is None:
                pending_start = word["start"]
            continue
        start = word["start"] if pending_start is None else pending_start
        cleaned.append({"word": text, "start": start, "end": word["end"]})
        pending_start = None
    return cleaned


def sample_spans(
    words: Sequence[dict[str, Any]],
    rng: random.Random,
    text_span: tuple[int, int] = (4, 10),
    speech_span: tuple[int, int] = (2, 5),
) -> list[dict[str, Any]]:
    """Splits a word-aligned transcript into alternating text and speech spans.

    The first span's kind is drawn at random; each span's length is drawn uniformly from its kind's range (inclusive),
    and the last span takes whatever is left (it may be shorter than its range's minimum).

    Args:
        words: `{"word", "start", "end"}` dicts in order (times in seconds), as `align_words` returns them.
        rng: The random source (seed it for reproducible spans).
        text_span: Min and max words of a text span.
        speech_span: Min and max words of a speech span.

    Returns:
        One `{"kind": "text" | "speech", "words": [str, ...], "start", "end"}` dict per span, covering every word
        once, in order. Punctuation is removed from the words (a punctuation-only word is dropped and its time given
        to the previous word); `start` and `end` (seconds) are where to cut a speech span's audio.

    Raises:
        ValueError: If a range is empty or starts below 1.
    """
    for name, (low, high) in (("text_span", text_span), ("speech_span", speech_span)):
        if not 1 <= low <= high:
            raise ValueError(f"{name} must be (min, max) with 1 <= min <= max; got {(low, high)}.")
    cleaned = _clean(words)
    ranges = {"text": text_span, "speech": speech_span}
    kind = rng.choice(["text", "speech"])
    spans, i = [], 0
    while i < len(cleaned):
        chunk = cleaned[i : i + rng.randint(*ranges[kind])]
        spans.append(
            {"kind": kind, "words": [w["word"] for w in chunk], "start": chunk[0]["start"], "end": chunk[-1]["end"]}
        )
        i += len(chunk)
        kind = "speech" if kind == "text" else "text"
    return spans


def cut_audio(waveform: np.ndarray, rate: int, start: float, end: float) -> np.ndarray:
    """The samples of `waveform` between `start` and `end` seconds (clipped to the clip).

    Args:
        waveform: (N,) samples.
        rate: Their sampling rate.
        start: Start time in seconds.
        end: End time in seconds.

    Returns:
        (M,) a view of the samples in `[round(start * rate), round(end * rate))`.
    """
    first = min(max(round(start * rate), 0), len(waveform))
    return waveform[first : min(max(round(end * rate), first), len(waveform))]


def end_of_turn_token(tokenizer: Any) -> str:
    """The chat end-of-turn token of a tokenizer (Llama-3's `<|eot_id|>`, ...), else its EOS token."""
    vocab = tokenizer.get_vocab()
    return next((token for token in END_OF_TURN_TOKENS if token in vocab), tokenizer.eos_token)


def mixed_sequence_layout(
    spans: Sequence[dict[str, Any]], tokenizer: Any, audio_token: str = "<audio>", end_of_turn: str | None = None
) -> tuple[str, list[bool]]:
    """The text of a mixed sequence: BOS + spans + end-of-turn, one audio placeholder per speech span, no template.

    Tokenise the result with `add_special_tokens=False` (BOS is already in it), e.g. through
    `SpeechLlmProcessor(text, audio=[clips of the speech spans, in order], add_special_tokens=False)`.

    Args:
        spans: `sample_spans` output.
        tokenizer: The LLM's tokenizer (for its BOS and end-of-turn tokens).
        audio_token: The audio placeholder.
        end_of_turn: The closing token; defaults to `end_of_turn_token(tokenizer)`.

    Returns:
        `(text, is_audio)`: the sequence text and, per span, whether it is a speech span.
    """
    parts = [tokenizer.bos_token or ""]
    for index, span in enumerate(spans):
        if span["kind"] == "speech":
            parts.append(audio_token)
        else:
            # Inside the sentence a text span after speech starts a new word: keep the space its tokens would have.
            parts.append((" " if index else "") + " ".join(span["words"]))
    parts.append(end_of_turn or end_of_turn_token(tokenizer))
    return "".join(parts), [span["kind"] == "speech" for span in spans]


__all__ = [
    "END_OF_TURN_TOKENS",
    "strip_punctuation",
    "sample_spans",
    "cut_audio",
    "end_of_turn_token",
    "mixed_sequence_layout",
]
