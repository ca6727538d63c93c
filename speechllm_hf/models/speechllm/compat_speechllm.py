"""Every difference between transformers 4.57 and 5.x that the model folder deals with, in one place.

This file ships to the Hub with `trust_remote_code`: it imports only torch, transformers and the standard library.
"""

from __future__ import annotations

import inspect
import json
import os

from transformers import processing_utils
from transformers.models.whisper.modeling_whisper import WhisperEncoderLayer

# The key/value cache's keyword: `past_key_values` on 4.x, `cache` on newer 5.x. The model passes `**kwargs` through
# to the LLM unnamed, so that either version's name reaches it.
CACHE_KWARGS = ("past_key_values", "cache")

# The dtype keyword of `from_pretrained`: `torch_dtype` on 4.x (5.x still reads it, deprecated), `dtype` on both.
DTYPE_KWARGS = ("dtype", "torch_dtype")

# 4.x Whisper encoder layers take a positional `layer_head_mask`; 5.x removed it.
WHISPER_LAYER_EXTRA_ARGS = (
    {"layer_head_mask": None} if "layer_head_mask" in inspect.signature(WhisperEncoderLayer.forward).parameters else {}
)

# The key mapping that loads a Whisper checkpoint's encoder into `SpeechLlmWhisperEncoder`, whichever its layout:
# `model.encoder.*` (WhisperForConditionalGeneration) or `encoder.*` (WhisperModel). 4.57 decides from the original
# keys whether to strip the `model.` prefix of a task checkpoint, and skips any mapped key that then lacks it; 5.x
# strips it after mapping. Mapping `model.encoder.` to `model.` (and `encoder.` to nothing) suits both.
WHISPER_ENCODER_KEY_MAPPING = {r"^model\.encoder\.": "model.", r"^encoder\.": ""}

# 4.x processors name their sub-processors' classes (`feature_extractor_class = "AutoFeatureExtractor"`); 5.x loads
# them through the Auto class of their modality and warns that those attributes are deprecated.
PROCESSOR_NAMES_SUB_PROCESSOR_CLASSES = not hasattr(processing_utils, "MODALITY_TO_AUTOPROCESSOR_MAPPING")

# Options of a `from_pretrained` call that 5.x records in tokenizer_config.json: they describe how the files were
# loaded on the machine that saved them (a local folder, offline), not the tokenizer.
_TOKENIZER_LOAD_OPTIONS = (
    "local_files_only",
    "is_local",
    "cache_dir",
    "force_download",
    "proxies",
    "token",
    "revision",
    "subfolder",
    "trust_remote_code",
    "gguf_file",
    "_commit_hash",
)


def cache_of(kwargs: dict):
    """The LLM's key/value cache among forward `kwargs`, under either version's name (None when absent)."""
    return next((kwargs[name] for name in CACHE_KWARGS if kwargs.get(name) is not None), None)


def cached_length(kwargs: dict) -> int:
    """Tokens already in the LLM's key/value cache among forward `kwargs`; 0 in a prefill step."""
    cache = cache_of(kwargs)
    return 0 if cache is None else cache.get_seq_length()


def requested_dtype(kwargs: dict):
    """The dtype a `from_pretrained` call asks for, under either version's keyword (None: the default)."""
    return next((kwargs[name] for name in DTYPE_KWARGS if kwargs.get(name) is not None), None)


def dtype_from_auto_config(kwargs: dict, config) -> dict:
    """`{"dtype": ...}` when the caller's dtype reached the config instead of `kwargs`: transformers 5.10 moves the
    `dtype` given to `AutoModel.from_pretrained` into the config it loads. A projector-only save records no dtype
    (null), so a dtype found on the config is the caller's."""
    if requested_dtype(kwargs) is None and getattr(config, "dtype", None) is not None:
        return {"dtype": config.dtype}
    return {}


def keep_special_tokens_kwarg(tokenizer) -> str:
    """The `add_special_tokens` keyword that keeps a tokenizer's other extra special tokens:
    `replace_additional_special_tokens` on 4.x, `replace_extra_special_tokens` on 5.x (which still reads the
    `additional_special_tokens` key)."""
    parameters = inspect.signature(tokenizer.add_special_tokens).parameters
    return (
        "replace_extra_special_tokens"
        if "replace_extra_special_tokens" in parameters
        else ("replace_additional_special_tokens")
    )


def make_tokenizer_config_portable(path: str) -> None:
    """Rewrite what 5.x writes into tokenizer_config.json in the form 4.x reads (5.x reads both): the generic fast
    tokenizer class under its 4.x name and extra special tokens as `additional_special_tokens`; the loading options
    it records (`_TOKENIZER_LOAD_OPTIONS`) are dropped."""
    if not os.path.exists(path):
        return
    with open(path) as file:
        config = json.load(file)
    for option in _TOKENIZER_LOAD_OPTIONS:
        config.pop(option, None)
    if isinstance(config.get("extra_special_tokens"), list):
        config["additional_special_tokens"] = config.pop("extra_special_tokens")
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(path, "w") as file:
        json.dump(config, file, indent=2, ensure_ascii=False)


def save_feature_extractor_for_4x(processor, save_directory: str | os.PathLike) -> None:
    """5.x nests the feature extractor in processor_config.json; 4.x reads preprocessor_config.json: write it too."""
    if not os.path.exists(os.path.join(save_directory, "preprocessor_config.json")):
        processor.feature_extractor.save_pretrained(save_directory)


__all__ = [
    "CACHE_KWARGS",
    "DTYPE_KWARGS",
    "PROCESSOR_NAMES_SUB_PROCESSOR_CLASSES",
    "WHISPER_ENCODER_KEY_MAPPING",
    "WHISPER_LAYER_EXTRA_ARGS",
    "cache_of",
    "cached_length",
    "dtype_from_auto_config",
    "keep_special_tokens_kwarg",
    "make_tokenizer_config_portable",
    "requested_dtype",
    "save_feature_extractor_for_4x",
]
