"""Prompt text that the offline continuation writing (`speechllm_hf.preprocessing.continuation`) and the batch-time
continuation collator must agree on, so that the KL teacher reads what the text LLM was asked."""

from __future__ import annotations


def continuation_request(instruction: str, transcript: str) -> str:
    """What the text LLM is asked, in every prompt style: the instruction, a space, the transcript (as BLSP wrote it).

    The KL teacher of `ContinuationTrainer` reads the same request, so that it sees the text the continuation was
    written from.
    """
    return f"{instruction} {transcript}"


__all__ = ["continuation_request"]
