"""MixedSpeechTextCollator: word-aligned rows -> mixed speech-text next-word batches ("audio_nwp").

Each row's transcript (with word times, from `speechllm-hf align`) is split into alternating text and speech spans
(`sample_spans`); every speech span becomes its own clip, cut from the utterance and encoded separately. The batch
holds `BOS + spans + end-of-turn` with labels on the text positions only (`mixed_labels`), plus the bare transcript
tokens (`text_input_ids`) for the contrastive variant that compares a mixed sequence with its text.
"""

from __future__ import annotations

import random

import torch

from .audio import load_audio
from .collator import pad_token_lists
from .mixed import cut_audio, mixed_labels, mixed_sequence_layout, sample_spans


class MixedSpeechTextCollator:
    """Collate word-aligned rows (`words`: `[{"word", "start", "end"}]`) into mixed speech-text batches.

    Args:
        processor: the model's `SpeechLlmProcessor`.
        audio_column, text_column: the row's audio and transcript columns.
        seed: spans are drawn from a generator seeded with `(seed, row id or audio path)`, so a row gets the same
            spans in every epoch and on resume, whatever the batch order.
        text_span, speech_span: (min, max) words per span (the paper's 4-10 and 2-5).
    """

    def __init__(
        self,
        processor,
        audio_column: str = "audio",
        text_column: str = "text",
        seed: int = 0,
        text_span: tuple[int, int] = (4, 10),
        speech_span: tuple[int, int] = (2, 5),
    ):
        self.processor = processor
        self.audio_column = audio_column
        self.text_column = text_column
        self.seed = seed
        self.text_span = text_span
        self.speech_span = speech_span

    def spans(self, row: dict) -> list[dict]:
        if not row.get("words"):
            raise ValueError("Mixed speech-text training needs word times: run `speechllm-hf align` on the data.")
        key = row.get("id") or str(
            row[self.audio_column].get("path") if isinstance(row[self.audio_column], dict) else row[self.audio_column]
        )
        return sample_spans(row["words"], random.Random(f"{self.seed}:{key}"), self.text_span, self.speech_span)

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        processor, tokenizer = self.processor, self.processor.tokenizer
        rate = processor.sampling_rate
        texts, clips = [], []
        for row in rows:
            spans = self.spans(row)
            text, _ = mixed_sequence_layout(spans, tokenizer, processor.audio_token)
            waveform = load_audio(row[self.audio_column], target_rate=rate)
            clips += [cut_audio(waveform, rate, s["start"], s["end"]) for s in spans if s["kind"] == "speech"]
            texts.append(text)
        batch = dict(processor(texts, audio=clips or None, sampling_rate=rate, add_special_tokens=False))
        batch["labels"] = mixed_labels(batch["input_ids"], batch["attention_mask"], processor.audio_token_id)
        tokens = tokenizer([row[self.text_column] for row in rows], add_special_tokens=False)["input_ids"]
        batch["text_input_ids"], batch["text_attention_mask"] = pad_token_lists(tokens, tokenizer.pad_token_id)
        return batch


__all__ = ["MixedSpeechTextCollator"]
