"""Offline data tools, run once before training and never at batch time: manifest validation with a report
(`prepare`), CTC word alignment (`alignment`), the text LLM's continuation writing (`continuation`) and the espeak-ng
synthetic corpora (`synthetic`, `openvocab`, `wordnet_sentences`). Batch-time data code is in `speechllm_hf.data`."""

from .prepare import REASONS, load_prepared, prepare_dataset

__all__ = ["REASONS", "load_prepared", "prepare_dataset"]
