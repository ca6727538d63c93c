"""Reference points for a trained speech LLM: the encoder's own Whisper model transcribing the same clips, and the
continuation-writing gap (how well the LLM predicts its own continuation from speech, against from the transcript)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from ..data.audio import load_audio
from ..data.collators import IGNORE_INDEX


@torch.no_grad()
def whisper_transcripts(name_or_path: str, rows: Sequence[dict], batch_size: int = 16, **hub_kwargs) -> list[str]:
    """Greedy English transcripts of `rows` (dicts with `audio`) by a whole Whisper checkpoint, as `openai/whisper-*`
    is used on its own: 30 s padded log-mel input, language "en", task "transcribe", no timestamps."""
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    processor = WhisperProcessor.from_pretrained(name_or_path, **hub_kwargs)
    model = WhisperForConditionalGeneration.from_pretrained(name_or_path, **hub_kwargs).eval()
    transcripts = []
    for start in tqdm(range(0, len(rows), batch_size), desc="whisper baseline"):
        audio = [load_audio(row["audio"]) for row in rows[start : start + batch_size]]
        features = processor.feature_extractor(audio, sampling_rate=16000, return_tensors="pt").input_features
        tokens = model.generate(features, language="en", task="transcribe", do_sample=False, num_beams=1)
        transcripts += [text.strip() for text in processor.batch_decode(tokens, skip_special_tokens=True)]
    return transcripts


@torch.no_grad()
def continuation_cross_entropy(model, collator, rows: Sequence[dict], batch_size: int = 16) -> dict[str, float]:
    """Per-token cross-entropy of each row's continuation given the speech (`speech`) and given the transcript
    (`transcript`, the text-only teacher prompt of `ContinuationCollator(with_teacher=True)`), over the same tokens.

    The transcript figure bounds what the projector can reach; an untrained projector gives the other end of the gap.
    """
    model.eval()
    sums = {"speech": 0.0, "transcript": 0.0}
    count = 0
    for start in range(0, len(rows), batch_size):
        batch = collator(list(rows[start : start + batch_size]))
        for side, prefix in (("speech", ""), ("transcript", "teacher_")):
            labels = batch[f"{prefix}labels"]
            inputs = {"input_ids": batch[f"{prefix}input_ids"], "attention_mask": batch[f"{prefix}attention_mask"]}
            if side == "speech":
                inputs.update({k: v for k, v in batch.items() if k not in inputs and not k.startswith("teacher_")})
                inputs.pop("labels")
            logits = model(**inputs).logits[:, :-1].float()
            targets = labels[:, 1:]
            sums[side] += torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
            ).item()
        count += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    return {side: total / count for side, total in sums.items()}


__all__ = ["whisper_transcripts", "continuation_cross_entropy"]
