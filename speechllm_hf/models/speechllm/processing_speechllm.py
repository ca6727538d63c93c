"""SpeechLlmProcessor: audio clips + texts with audio placeholders -> model inputs.

This file ships to the Hub with `trust_remote_code`: it imports only torch, numpy (a transformers requirement),
transformers and the standard library; soxr and soundfile are imported only when resampling or reading a file.
"""

from __future__ import annotations

import copy
import inspect
import json
import os
from collections.abc import Sequence

import numpy as np
from transformers import BatchFeature, ProcessorMixin
from transformers.utils import cached_file, logging

from .audio_speechllm import prepare_waveform
from .compat_speechllm import (
    PROCESSOR_NAMES_SUB_PROCESSOR_CLASSES,
    keep_special_tokens_kwarg,
    make_tokenizer_config_portable,
    save_feature_extractor_for_4x,
)
from .configuration_speechllm import audio_token_count, window_settings

logger = logging.get_logger(__name__)

# The files whose `auto_map` could name code for the tokenizer or the feature extractor, and the Auto classes that
# would run it. A folder this library writes maps only AutoProcessor to its own processor (4.57 writes that entry into
# every sub-config) and the model classes in config.json.
SUB_PROCESSOR_FILES = ("tokenizer_config.json", "preprocessor_config.json", "processor_config.json", "config.json")
SUB_PROCESSOR_AUTO_CLASSES = ("AutoTokenizer", "AutoFeatureExtractor")
OWN_PROCESSOR_REFERENCE = "processing_speechllm.SpeechLlmProcessor"


def foreign_code_references(auto_map, file_name: str) -> list[str]:
    """The `auto_map` entries of `file_name` that would run code other than this processor's: any entry of a
    sub-config (legacy list form included) except AutoProcessor -> this processor, and the tokenizer and feature
    extractor entries of config.json."""
    if isinstance(auto_map, (list, tuple)):  # transformers' legacy form of a tokenizer's auto_map
        auto_map = {"AutoTokenizer": auto_map}
    found = []
    for auto_class, reference in (auto_map or {}).items():
        if file_name == "config.json" and auto_class not in SUB_PROCESSOR_AUTO_CLASSES:
            continue
        references = reference if isinstance(reference, (list, tuple)) else [reference]
        for name in filter(None, references):  # a repo id may prefix the module: "owner/repo--module.Class"
            if auto_class != "AutoProcessor" or name.rsplit("--", 1)[-1] != OWN_PROCESSOR_REFERENCE:
                found.append(f"{file_name}: {auto_class} -> {name}")
    return found


def refuse_foreign_code(pretrained_model_name_or_path, hub_kwargs: dict) -> None:
    """Raise when a processor folder maps its tokenizer or feature extractor to code of its own.

    `trust_remote_code=True` is given to run this processor's file; transformers would pass it on to the tokenizer
    and the feature extractor, and so also run any module their configs name. This library never writes such an
    entry (the backbones' tokenizers and feature extractors are standard classes, loaded without remote code), so one
    means the folder was changed after it was saved.
    """
    options = {key: hub_kwargs[key] for key in ("cache_dir", "revision", "token", "local_files_only", "subfolder")}
    found = []
    for file_name in SUB_PROCESSOR_FILES:
        path = cached_file(
            pretrained_model_name_or_path,
            file_name,
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
            **options,
        )
        if path is None:
            continue
        with open(path, encoding="utf-8") as file:
            saved = json.load(file)
        entries = [saved] + [value for value in saved.values() if isinstance(value, dict)]  # 5.x nests sub-configs
        for entry in entries:
            found += foreign_code_references(entry.get("auto_map"), file_name)
    if found:
        raise ValueError(
            f"{pretrained_model_name_or_path} maps its tokenizer or feature extractor to code of its own "
            f"({'; '.join(found)}). speechllm_hf never writes such entries and does not run that code, whatever "
            "trust_remote_code says: remove them if the folder is yours, or load that tokenizer yourself with "
            "AutoTokenizer.from_pretrained(..., trust_remote_code=True) after reading its code."
        )


# Pad tokens to reuse when a tokenizer has none (Llama's have none), in order of preference: a dedicated pad token
# (Llama-3.1's), then `<pad>`; else the unknown token (Llama-2's `<unk>`, what BLSP padded with), else EOS.
PAD_TOKEN_CANDIDATES = ("<|finetune_right_pad_id|>", "<pad>")

# Longest clip the processor takes by default: 10 minutes make about 7,000 audio tokens at the presets' 10-12 a second,
# which still fit, with prompt and answer, in the 8,192 positions of the smallest preset LLM (SmolLM2). The encoder's
# memory no longer grows with the clip (it runs in fixed windows); the LLM's sequence, its key/value cache and the
# features do, so a 3-hour recording passed by accident is refused instead of exhausting memory.
DEFAULT_MAX_AUDIO_SECONDS = 600.0


def add_special_token(tokenizer, token: str) -> None:
    """Add `token` to `tokenizer` as an extra special token (kept whole, skipped when decoding with
    `skip_special_tokens`), leaving the tokenizer's other special tokens as they are; nothing when it already knows
    the token.

    """
    if token in tokenizer.get_vocab():
        return
    keep_others = {keep_special_tokens_kwarg(tokenizer): False}
    tokenizer.add_special_tokens({"additional_special_tokens": [token]}, **keep_others)


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
    padded to 30 s), then zero-padded to the longest clip with a `feature_attention_mask`. Clips longer than the
    encoder's window (30 s) are fine: the model encodes them window by window.

    Args:
        feature_extractor (`FeatureExtractionMixin`): a `Wav2Vec2FeatureExtractor` (HuBERT, wav2vec2) or
            `WhisperFeatureExtractor`.
        tokenizer (`PreTrainedTokenizerBase`): the LLM's tokenizer, holding `audio_token` as a special token.
        chat_template (`str`, *optional*): Jinja chat template; defaults to the tokenizer's.
        audio_token (`str`, *optional*, defaults to `"<audio>"`): the audio placeholder.
        audio_length_spec (`dict`): `SpeechLlmConfig.audio_length_spec`: how feature length maps to audio tokens.
        system_prompt (`str`, *optional*): system message that `apply_chat_template` inserts when a conversation
            has none.
        max_audio_seconds (`float`, *optional*, defaults to 600): longest clip accepted, a guard against passing a
            long recording by accident (see `DEFAULT_MAX_AUDIO_SECONDS`); None accepts any length.
    """

    attributes = ["feature_extractor", "tokenizer"]
    if PROCESSOR_NAMES_SUB_PROCESSOR_CLASSES:
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
        max_audio_seconds: float | None = DEFAULT_MAX_AUDIO_SECONDS,
        **kwargs,
    ):
        if audio_length_spec is None:
            raise ValueError("SpeechLlmProcessor needs audio_length_spec (SpeechLlmConfig.audio_length_spec).")
        self.audio_token = audio_token
        self.audio_length_spec = audio_length_spec
        self.system_prompt = system_prompt
        self.max_audio_seconds = max_audio_seconds
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

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args, **kwargs):
        """`ProcessorMixin.from_pretrained`, loading the tokenizer and the feature extractor without remote code.

        `trust_remote_code` (which ran this file) is not passed on to them, and a folder whose configs map them to
        code of their own is refused with the entries named (`refuse_foreign_code`).
        """
        bound = inspect.signature(ProcessorMixin.from_pretrained).bind(pretrained_model_name_or_path, *args, **kwargs)
        bound.apply_defaults()
        hub_kwargs = {"subfolder": None, **bound.arguments, **bound.arguments.pop("kwargs")}
        refuse_foreign_code(pretrained_model_name_or_path, hub_kwargs)
        kwargs["trust_remote_code"] = False
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

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

    def load_waveform(self, audio, sampling_rate: int | None = None) -> np.ndarray:
        """One clip (samples, a file path or an audio dict) as mono float32 samples at the feature extractor's rate."""
        return prepare_waveform(audio, sampling_rate, self.sampling_rate)

    @property
    def _hop(self) -> int:
        """Samples per feature frame: the spectrogram's hop, or 1 for extractors whose features are the samples."""
        return getattr(self.feature_extractor, "hop_length", None) or 1

    def _window_samples(self) -> int:
        """Samples in one encoder window."""
        return window_settings(self.audio_length_spec)[0] * self._hop

    def _long_clip_frames(self, num_samples: int, window_frames: int) -> int:
        """Feature frames of a clip longer than one window: its full windows', then its tail's (the hop divides the
        window, so they add up to the whole clip's)."""
        full_windows = (num_samples - 1) // self._window_samples()  # the last window, full or not, is the tail
        return window_frames * full_windows + (num_samples - full_windows * self._window_samples()) // self._hop

    def feature_length(self, waveform: np.ndarray, index: int = 0) -> int:
        """The feature frames this clip gives, with the `ValueError` processing it would raise (too long for
        `max_audio_seconds`, too short for one audio token or for the feature extractor), from at most one window's
        features: a longer clip's frames follow from them, and it gives audio tokens in any case."""
        if len(waveform) <= self._window_samples():
            return self._extract(waveform, index).shape[-1]
        self._check_duration(waveform, index)
        first = self._extract_window(waveform[: self._window_samples()], index)
        return self._long_clip_frames(len(waveform), first.shape[-1])

    def _check_duration(self, waveform: np.ndarray, index: int) -> None:
        seconds = len(waveform) / self.sampling_rate
        if self.max_audio_seconds is not None and seconds > self.max_audio_seconds:
            raise ValueError(
                f"Audio clip {index} lasts {seconds:.2f} s, longer than max_audio_seconds={self.max_audio_seconds:g}, "
                "a guard against passing a long recording by accident: the audio tokens, the LLM's sequence and its "
                "memory grow with the clip. Raise the limit (`processor.max_audio_seconds = SECONDS`, "
                "`speechllm-hf generate --max_audio_seconds SECONDS`) or split the recording."
            )

    def _extract(self, waveform: np.ndarray, index: int) -> np.ndarray:
        """Features of one clip at its real length, time on the last axis."""
        self._check_duration(waveform, index)
        # Extractors copy the whole clip several times: Whisper's works in float64, about 35 MB per minute of audio
        # for the frames and as much for their spectrum; wav2vec2's pads, masks and normalises in float32 copies.
        # Clips longer than the encoder's window are extracted window by window, as the model encodes them (and as
        # the encoders' training clips were: each window gets its own log-mel range or its own mean and variance),
        # so that the extractor's memory stays that of one window. The windows are written into one array of the
        # clip's frames (the hop divides the window), never held twice.
        window = self._window_samples()
        if len(waveform) <= window:
            features = self._extract_window(waveform, index)
        else:
            full_windows = (len(waveform) - 1) // window  # the last window, full or not, is the tail
            first = self._extract_window(waveform[:window], index)
            step = first.shape[-1]
            features = np.empty((*first.shape[:-1], self._long_clip_frames(len(waveform), step)), dtype=first.dtype)
            features[..., :step] = first
            for number in range(1, full_windows):
                piece = waveform[number * window : (number + 1) * window]
                features[..., number * step : (number + 1) * step] = self._extract_window(piece, index)
            features[..., full_windows * step :] = self._extract_tail(waveform[full_windows * window :], index)
        if self.num_audio_tokens(features.shape[-1]) < 1:
            raise ValueError(
                f"Audio clip {index} is too short ({len(waveform)} samples at {self.sampling_rate} Hz) "
                "for the encoder to produce one audio token."
            )
        return features

    def _extract_window(self, waveform: np.ndarray, index: int) -> np.ndarray:
        """Features of one clip, or one window of a long clip, at its real length."""
        # Extracting clip by clip keeps each clip's features independent of the batch (Whisper's STFT edges and
        # wav2vec2's per-clip normalisation would otherwise see the padding). `truncation=False`: Whisper's extractor
        # would otherwise cut clips at 30 s without a word; the model encodes longer clips in windows.
        try:
            extracted = self.feature_extractor(
                waveform, sampling_rate=self.sampling_rate, padding="longest", truncation=False, return_tensors="np"
            )
        except RuntimeError as err:  # e.g. Whisper's STFT on a clip shorter than its reflection padding
            raise ValueError(
                f"Audio clip {index} is too short ({len(waveform)} samples) for the feature extractor: {err}"
            ) from err
        return extracted[self.feature_extractor.model_input_names[0]][0]

    def _extract_tail(self, waveform: np.ndarray, index: int) -> np.ndarray:
        """The last window of a long clip, which may be shorter than a spectrogram's FFT: zero-padded to it, then cut
        back to the frames its own samples make (the hop divides the window, so the frames add up to the clip's)."""
        frames = len(waveform) // self._hop
        padded = np.pad(waveform, (0, max(0, getattr(self.feature_extractor, "n_fft", 0) - len(waveform))))
        return self._extract_window(padded, index)[..., :frames]

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
        # The mask is int32, as transformers' audio feature extractors return theirs: per sample (wav2vec2-style
        # features), an int64 mask of a 10-minute clip would take twice the memory of the clip.
        if len(features) == 1:  # nothing to pad: no copy of a long clip's features
            data["input_features"] = features[0][None].astype(np.float32, copy=False)
            data["feature_attention_mask"] = np.ones((1, lengths[0]), dtype=np.int32)
        elif features:
            padded = np.zeros((len(features), *features[0].shape[:-1], max(lengths)), dtype=np.float32)
            mask = np.zeros((len(features), max(lengths)), dtype=np.int32)
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
        save_feature_extractor_for_4x(self, save_directory)
        return result

    def batch_decode(self, *args, **kwargs) -> list[str]:
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs) -> str:
        return self.tokenizer.decode(*args, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "input_features", "feature_attention_mask"]


def _is_clip_list(audio) -> bool:
    """A list of clips, as opposed to one clip given as a plain list of samples."""
    if isinstance(audio, (list, tuple)):
        return len(audio) == 0 or not isinstance(audio[0], (int, float, np.number))
    return False


__all__ = [
    "DEFAULT_MAX_AUDIO_SECONDS",
    "SpeechLlmProcessor",
    "add_special_token",
    "ensure_pad_token",
]
