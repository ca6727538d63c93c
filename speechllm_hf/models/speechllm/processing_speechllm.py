"""SpeechLlmProcessor: audio clips + texts with audio placeholders -> model inputs.

This file ships to the Hub with `trust_remote_code`: it imports only torch, numpy (a transformers requirement),
transformers and the standard library; soxr and soundfile are imported only when resampling or reading a file.
"""

from __future__ import annotations

import copy
import inspect
import io
import json
import os
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from transformers import BatchFeature, ProcessorMixin
from transformers.utils import logging

from .configuration_speechllm import audio_token_count

logger = logging.get_logger(__name__)

# Pad tokens to reuse when a tokenizer has none (Llama's have none), in order of preference: a dedicated pad token
# (Llama-3.1's), then `<pad>`; else the unknown token (Llama-2's `<unk>`, what BLSP padded with), else EOS.
PAD_TOKEN_CANDIDATES = ("<|finetune_right_pad_id|>", "<pad>")


def load_audio_file(path: str | os.PathLike | io.BytesIO) -> tuple[np.ndarray, int]:
    """Decode an audio file (wav, flac, ogg, ...) with soundfile: ((samples, channels) or (samples,), rate)."""
    try:
        import soundfile
    except ImportError as err:
        raise ImportError("Reading audio files needs soundfile: `pip install soundfile`.") from err
    if isinstance(path, (str, os.PathLike)) and not os.path.exists(path):
        raise ValueError(f"Audio file {str(path)!r} does not exist.")
    try:
        samples, sampling_rate = soundfile.read(path, always_2d=False)
    except Exception as err:  # soundfile raises LibsndfileError, RuntimeError or OSError depending on the case
        raise ValueError(f"Cannot decode audio file {path!r}: {err}") from err
    return samples, sampling_rate


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
    PCM scale and are refused.
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
    return samples.astype(np.float32)


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
    if not np.isfinite(waveform).all():
        raise ValueError(f"{name} holds NaN or infinite samples; clean or drop it.")
    if waveform.size and np.abs(waveform).max() > 1.0:
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


def add_special_token(tokenizer, token: str) -> None:
    """Add `token` to `tokenizer` as an extra special token (kept whole, skipped when decoding with
    `skip_special_tokens`), leaving the tokenizer's other special tokens as they are; nothing when it already knows
    the token.

    The keyword that keeps the existing extra special tokens is `replace_additional_special_tokens` on transformers
    4.x and `replace_extra_special_tokens` on 5.x (which still reads the `additional_special_tokens` key).
    """
    if token in tokenizer.get_vocab():
        return
    renamed = "replace_extra_special_tokens" in inspect.signature(tokenizer.add_special_tokens).parameters
    keep = "replace_extra_special_tokens" if renamed else "replace_additional_special_tokens"
    tokenizer.add_special_tokens({"additional_special_tokens": [token]}, **{keep: False})


def ensure_pad_token(tokenizer):
    """Give `tokenizer` a pad token when it has none (Llama's tokenizers have none; both original code bases set
    one): the first of `PAD_TOKEN_CANDIDATES` in its vocabulary, else its unknown token, else EOS. Padding is masked
    and labelled -100, so which token pads does not change results. Returns the tokenizer."""
    if tokenizer.pad_token is None:
        vocab = tokenizer.get_vocab()
        pad = next((token for token in PAD_TOKEN_CANDIDATES if token in vocab), None)
        pad = pad or tokenizer.unk_token or tokenizer.eos_token
        if pad is None:
            raise ValueError(
                "The tokenizer has no pad, unknown or EOS token to pad batches with: set one of its tokens as "
                "`tokenizer.pad_token`."
            )
        logger.info("The tokenizer has no pad token; using %r.", pad)
        tokenizer.pad_token = pad
    return tokenizer


class SpeechLlmProcessor(ProcessorMixin):
    r"""
    Turns texts with audio placeholders and audio clips into `SpeechLlmForConditionalGeneration` inputs.

    Each placeholder (`audio_token`) in the text is expanded to exactly the number of audio tokens the model emits
    for its clip, so `input_ids` have their final length. Audio is extracted clip by clip at its real length (never
    padded to 30 s), then zero-padded to the longest clip with a `feature_attention_mask`.

    Args:
        feature_extractor (`FeatureExtractionMixin`): a `Wav2Vec2FeatureExtractor` (HuBERT, wav2vec2) or
            `WhisperFeatureExtractor`.
        tokenizer (`PreTrainedTokenizerBase`): the LLM's tokenizer, holding `audio_token` as a special token.
        chat_template (`str`, *optional*): Jinja chat template; defaults to the tokenizer's.
        audio_token (`str`, *optional*, defaults to `"<audio>"`): the audio placeholder.
        audio_length_spec (`dict`): `SpeechLlmConfig.audio_length_spec`: how feature length maps to audio tokens.
        system_prompt (`str`, *optional*): system message that `apply_chat_template` inserts when a conversation
            has none.
    """

    attributes = ["feature_extractor", "tokenizer"]
    feature_extractor_class = "AutoFeatureExtractor"
    tokenizer_class = "AutoTokenizer"

    def __init__(
        self,
        feature_extractor=None,
        tokenizer=None,
        chat_template: str | None = None,
        audio_token: str = "<audio>",
        audio_length_spec: dict | None = None,
        system_prompt: str | None = None,
        **kwargs,
    ):
        if audio_length_spec is None:
            raise ValueError("SpeechLlmProcessor needs audio_length_spec (SpeechLlmConfig.audio_length_spec).")
        self.audio_token = audio_token
        self.audio_length_spec = audio_length_spec
        self.system_prompt = system_prompt
        audio_token_id = tokenizer.convert_tokens_to_ids(audio_token)
        if audio_token_id is None or audio_token_id == tokenizer.unk_token_id:
            raise ValueError(
                f"The tokenizer does not know the audio token {audio_token!r}: add it with "
                f"`add_special_token(tokenizer, {audio_token!r})` of processing_speechllm (any transformers version)."
            )
        self.audio_token_id = audio_token_id
        ensure_pad_token(tokenizer)  # batches (and the training collator) pad
        if chat_template is None:
            chat_template = getattr(tokenizer, "chat_template", None)
        super().__init__(feature_extractor, tokenizer, chat_template=chat_template, **kwargs)

    @property
    def sampling_rate(self) -> int:
        return self.feature_extractor.sampling_rate

    def num_audio_tokens(self, feature_length: int) -> int:
        """Audio tokens the model emits for a clip of `feature_length` feature frames (or samples)."""
        return audio_token_count(feature_length, self.audio_length_spec)

    def expand_audio_placeholders(self, texts: list[str], feature_lengths: Sequence[int]) -> list[str]:
        """Repeat each placeholder as often as the model emits audio tokens for its clip (clips in text order)."""
        token_counts = iter([self.num_audio_tokens(int(length)) for length in feature_lengths])
        expanded = []
        for text in texts:
            first, *rest = text.split(self.audio_token)
            expanded.append(first + "".join(self.audio_token * next(token_counts) + piece for piece in rest))
        return expanded

    def _check_audio_tokens(self, input_ids, texts: list[str], feature_lengths: Sequence[int]) -> None:
        """Each text must keep every audio token its clips need: truncation may have cut some."""
        token_counts = iter([self.num_audio_tokens(int(length)) for length in feature_lengths])
        for index, (text, ids) in enumerate(zip(texts, input_ids)):
            expected = sum(next(token_counts) for _ in range(text.count(self.audio_token)))
            found = int((np.asarray(ids) == self.audio_token_id).sum())
            if found != expected:
                raise ValueError(
                    f"Text {index} holds {found} audio tokens after tokenization but its audio needs {expected}: the "
                    "tokenizer cut them (truncation / max_length). Raise max_length, shorten the text or the audio, "
                    "or leave truncation off."
                )

    def _extract(self, waveform: np.ndarray, index: int) -> np.ndarray:
        """Features of one clip at its real length, time on the last axis."""
        # Extracting clip by clip keeps each clip's features independent of the batch (Whisper's STFT edges and
        # wav2vec2's per-clip normalisation would otherwise see the padding). `truncation=False`: Whisper's extractor
        # would otherwise cut clips at 30 s without a word; too-long clips are refused below instead.
        try:
            extracted = self.feature_extractor(
                waveform, sampling_rate=self.sampling_rate, padding="longest", truncation=False, return_tensors="np"
            )
        except RuntimeError as err:  # e.g. Whisper's STFT on a clip shorter than its reflection padding
            raise ValueError(
                f"Audio clip {index} is too short ({len(waveform)} samples) for the feature extractor: {err}"
            ) from err
        features = extracted[self.feature_extractor.model_input_names[0]][0]
        max_length = self.audio_length_spec.get("max_feature_length")
        if max_length is not None and features.shape[-1] > max_length:
            seconds = len(waveform) / self.sampling_rate
            hop = seconds / features.shape[-1]  # seconds per feature frame (Whisper: 10 ms)
            raise ValueError(
                f"Audio clip {index} lasts {seconds:.2f} s, longer than the encoder accepts ({max_length} feature "
                f"frames, {max_length * hop:.0f} s); split it into shorter clips (`speechllm-hf prepare` drops them "
                "as too_long)."
            )
        if self.num_audio_tokens(features.shape[-1]) < 1:
            raise ValueError(
                f"Audio clip {index} is too short ({len(waveform)} samples at {self.sampling_rate} Hz) "
                "for the encoder to produce one audio token."
            )
        return features

    def __call__(
        self,
        text: str | list[str] | None = None,
        audio=None,
        sampling_rate: int | Sequence[int] | None = None,
        padding: bool | str = True,
        return_tensors: str | None = "pt",
        **tokenizer_kwargs,
    ) -> BatchFeature:
        """Prepare a batch.

        Args:
            text: one text or a list; each audio placeholder in it takes the next clip of `audio`, in order.
            audio: one clip or a list of clips (arrays, tensors, `datasets` Audio dicts, file paths or bytes).
            sampling_rate: the rate of the clips given as arrays: one int for all or one per clip.
            padding, return_tensors, **tokenizer_kwargs: passed to the tokenizer (e.g. `padding_side="left"`).

        Returns:
            `BatchFeature` with `input_ids`, `attention_mask` and, with audio, `input_features` (num_clips, ..., T)
            and `feature_attention_mask` (num_clips, T).
        """
        if text is None:
            raise ValueError("SpeechLlmProcessor needs text: put the audio placeholder where the audio goes.")
        texts = [text] if isinstance(text, str) else list(text)
        if not texts:
            raise ValueError("SpeechLlmProcessor got an empty list of texts: give at least one.")
        clips = [] if audio is None else audio if _is_clip_list(audio) else [audio]
        placeholders = [t.count(self.audio_token) for t in texts]
        if sum(placeholders) != len(clips):
            raise ValueError(
                f"The text holds {sum(placeholders)} audio placeholders ({self.audio_token!r}) but {len(clips)} "
                "audio clips were given: put exactly one placeholder per clip."
            )
        rates = list(sampling_rate) if isinstance(sampling_rate, (list, tuple)) else [sampling_rate] * len(clips)
        if len(rates) != len(clips):
            raise ValueError(f"Got {len(rates)} sampling rates for {len(clips)} audio clips.")
        features = [
            self._extract(prepare_waveform(clip, rate, self.sampling_rate, index), index)
            for index, (clip, rate) in enumerate(zip(clips, rates))
        ]
        lengths = [f.shape[-1] for f in features]
        expanded = self.expand_audio_placeholders(texts, lengths)
        tokenizer_kwargs.setdefault("return_token_type_ids", False)  # the model takes none (4.x tokenizers add them)
        data = dict(self.tokenizer(expanded, padding=padding, return_tensors=return_tensors, **tokenizer_kwargs))
        self._check_audio_tokens(data["input_ids"], texts, lengths)
        if features:
            padded = np.zeros((len(features), *features[0].shape[:-1], max(lengths)), dtype=np.float32)
            mask = np.zeros((len(features), max(lengths)), dtype=np.int64)
            for i, f in enumerate(features):
                padded[i, ..., : f.shape[-1]] = f
                mask[i, : f.shape[-1]] = 1
            data["input_features"], data["feature_attention_mask"] = padded, mask
        return BatchFeature(data=data, tensor_type=return_tensors)

    def apply_chat_template(
        self,
        conversation: list[dict] | list[list[dict]],
        chat_template: str | None = None,
        add_generation_prompt: bool = False,
        tokenize: bool = False,
        **kwargs,
    ):
        """Render conversations whose message contents may hold `{"type": "audio", ...}` items.

        Audio items become the audio placeholder; text items are concatenated. With `tokenize=True`, the audio of
        the items (`"audio"` or `"array"`: samples with `"sampling_rate"`, or `"path"`) is processed too and a
        `BatchFeature` is returned. When a conversation has no system message and `system_prompt` is set, it is
        inserted.
        """
        batched = bool(conversation) and isinstance(conversation[0], (list, tuple))
        conversations = conversation if batched else [conversation]
        texts, clips, rates = [], [], []
        for messages in conversations:
            rendered = []
            if self.system_prompt and not any(m["role"] == "system" for m in messages):
                rendered.append({"role": "system", "content": self.system_prompt})
            for message in messages:
                content = message["content"]
                if not isinstance(content, str):
                    parts = []
                    for item in content:
                        if item["type"] == "audio":
                            parts.append(self.audio_token)
                            clips.append(
                                next((item[k] for k in ("audio", "array", "path") if item.get(k) is not None), None)
                            )
                            rates.append(item.get("sampling_rate"))
                        else:
                            parts.append(item["text"])
                    content = "".join(parts)
                rendered.append({**copy.copy(message), "content": content})
            texts.append(
                self.tokenizer.apply_chat_template(
                    rendered,
                    chat_template=chat_template or self.chat_template,
                    add_generation_prompt=add_generation_prompt,
                    tokenize=False,
                )
            )
        if not tokenize:
            return texts if batched else texts[0]
        empty = [index for index, clip in enumerate(clips) if clip is None]
        if empty:
            raise ValueError(
                f"Audio content items {empty} (counted in order over the conversations) hold no audio: give the "
                "samples as 'audio' (or 'array') with 'sampling_rate', or a file as 'path'."
            )
        kwargs.setdefault("add_special_tokens", False)  # the template already wrote BOS where it belongs
        return self(text=texts, audio=clips or None, sampling_rate=rates, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs):
        result = super().save_pretrained(save_directory, *args, **kwargs)
        make_tokenizer_config_portable(os.path.join(save_directory, "tokenizer_config.json"))
        if not os.path.exists(os.path.join(save_directory, "preprocessor_config.json")):
            # transformers 5.x nests the feature extractor in processor_config.json; 4.x reads this file.
            self.feature_extractor.save_pretrained(save_directory)
        return result

    def batch_decode(self, *args, **kwargs) -> list[str]:
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs) -> str:
        return self.tokenizer.decode(*args, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "input_features", "feature_attention_mask"]


# Options of a `from_pretrained` call that transformers 5.x records in tokenizer_config.json: they describe how the
# files were loaded on the machine that saved them (a local folder, offline), not the tokenizer.
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


def make_tokenizer_config_portable(path: str) -> None:
    """Rewrite what transformers 5.x writes into tokenizer_config.json in the form 4.x reads (5.x reads both):
    the generic fast tokenizer class under its 4.x name and extra special tokens as `additional_special_tokens`;
    the loading options it records (`_TOKENIZER_LOAD_OPTIONS`) are dropped."""
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


def _is_clip_list(audio) -> bool:
    """A list of clips, as opposed to one clip given as a plain list of samples."""
    if isinstance(audio, (list, tuple)):
        return len(audio) == 0 or not isinstance(audio[0], (int, float, np.number))
    return False


__all__ = [
    "SpeechLlmProcessor",
    "add_special_token",
    "check_sampling_rate",
    "ensure_pad_token",
    "load_audio_file",
    "make_tokenizer_config_portable",
    "prepare_waveform",
    "resample",
    "to_mono_float32",
]
