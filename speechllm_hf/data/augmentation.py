"""Training-time augmentation of the speech side, off by default: speed, additive noise, gain and SpecAugment-style
masking of log-mel input features.

The collators apply it to each row's waveform before feature extraction (`Augmenter.waveforms`) and to its features
after (`Augmenter.mask_features`); `SpeechLlmTrainer` leaves it out of evaluation and prediction. Every draw of a row
comes from a generator seeded with `(seed, epoch, row key)` only (`Augmenter.rng`), never from a global RNG or from the
rows drawn before it, so the same seed gives the same batches, dataloader workers change nothing, and a resumed run
draws what the uninterrupted one drew. The row key is the row's identity (`row_key`), not its index, because a
collator is handed rows, never their indices.

The epoch lives in shared memory (as `datasets.IterableDataset` keeps its own), so that dataloader workers, persistent
ones included, see it change; `AugmentationEpoch` sets it from the Trainer's state at each epoch's start.

Augmentation excludes the encoder-feature cache: the cache holds encoder outputs computed once from the clean audio,
while augmentation changes the encoder's input at every step.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
from transformers import TrainerCallback

from .audio import load_audio, unwrap_audio
from .feature_cache import audio_key

logger = logging.getLogger(__name__)

# The minimum spans transformers' encoder configs default to (`mask_time_min_masks`, `mask_feature_min_masks`).
MASK_TIME_MIN_MASKS = 2
MASK_FEATURE_MIN_MASKS = 0


@dataclass(frozen=True)
class AugmentationConfig:
    """What to augment, all off by default.

    Args:
        seed: seeds every draw, with the epoch and the row key.
        speeds: speed factors, one drawn uniformly per clip (e.g. `(0.9, 1.0, 1.1)`): the clip is resampled with soxr
            to `1 / factor` of its length, so tempo and pitch change together, as in Ko et al. (2015).
        gain_db: `(low, high)`: a gain drawn uniformly in dB scales the clip (after any noise is added).
        noise_dir: a folder of audio files (searched recursively); a random stretch of a random file is added at a
            signal-to-noise ratio drawn uniformly from `noise_snr_db`.
        noise_snr_db: `(low, high)` SNR in dB of the added noise.
        noise_prob: the probability that a clip gets noise.
        mask_time_prob, mask_time_length, mask_feature_prob, mask_feature_length: SpecAugment-style masking of log-mel
            input features, with the meaning transformers' encoder configs give these options (spans of
            `mask_*_length` frames or mel bins set to 0, about `mask_*_prob` of the axis; at least 2 time spans when
            time masking is on, as their `mask_time_min_masks`); 0 turns each off.
    """

    seed: int = 0
    speeds: tuple[float, ...] = ()
    gain_db: tuple[float, float] | None = None
    noise_dir: str | None = None
    noise_snr_db: tuple[float, float] = (5.0, 20.0)
    noise_prob: float = 1.0
    mask_time_prob: float = 0.0
    mask_time_length: int = 10
    mask_feature_prob: float = 0.0
    mask_feature_length: int = 10

    def __post_init__(self):
        if self.seed < 0:
            raise ValueError(f"The augmentation seed must be >= 0; got {self.seed}.")
        if any(not speed > 0 for speed in self.speeds):
            raise ValueError(f"Speed factors must be > 0 (e.g. 0.9 1.0 1.1); got {list(self.speeds)}.")
        for name in ("gain_db", "noise_snr_db"):
            value = getattr(self, name)
            if value is not None and (len(value) != 2 or value[0] > value[1]):
                raise ValueError(f"{name} is a range, two numbers LOW HIGH with LOW <= HIGH; got {list(value)}.")
        if not 0 <= self.noise_prob <= 1:
            raise ValueError(f"noise_prob must be in [0, 1]; got {self.noise_prob}.")
        for axis in ("time", "feature"):
            prob, length = getattr(self, f"mask_{axis}_prob"), getattr(self, f"mask_{axis}_length")
            if not 0 <= prob <= 1:
                raise ValueError(f"mask_{axis}_prob must be in [0, 1]; got {prob}.")
            if length < 1:
                raise ValueError(f"mask_{axis}_length must be >= 1; got {length}.")

    @property
    def masks_features(self) -> bool:
        return self.mask_time_prob > 0 or self.mask_feature_prob > 0

    @property
    def enabled(self) -> bool:
        changes_speed = any(speed != 1 for speed in self.speeds)
        return changes_speed or self.gain_db is not None or self.noise_dir is not None or self.masks_features

    @classmethod
    def from_args(cls, args) -> AugmentationConfig | None:
        """The augmentation `SpeechLlmTrainingArguments` ask for (its `augment_*` fields, seeded by `seed`), or None
        when they ask for none."""
        config = cls(
            seed=args.seed,
            speeds=tuple(args.augment_speeds or ()),
            gain_db=tuple(args.augment_gain_db) if args.augment_gain_db is not None else None,
            noise_dir=args.augment_noise_dir,
            noise_snr_db=tuple(args.augment_noise_snr_db),
            noise_prob=args.augment_noise_prob,
            mask_time_prob=args.augment_mask_time_prob,
            mask_time_length=args.augment_mask_time_length,
            mask_feature_prob=args.augment_mask_feature_prob,
            mask_feature_length=args.augment_mask_feature_length,
        )
        return config if config.enabled else None


def row_key(row: dict, audio_column: str = "audio") -> str:
    """A row's identity for its draws: its `id` column, else its audio file's path (stable across copies of the data,
    unlike the feature cache's key) or the content key of in-memory audio (`feature_cache.audio_key`), with its task.
    Rows sharing both draw alike within an epoch."""
    if row.get("id") is not None:
        return f"id:{row['id']}"
    source, _ = unwrap_audio(row[audio_column])
    audio = f"path:{source}" if isinstance(source, str) else audio_key(row[audio_column])
    return f"{row.get('task')}:{audio}"


def noise_files(folder: str) -> list[str]:
    """The audio files under `folder` that libsndfile reads, sorted (so that a draw picks the same file everywhere).

    Raises:
        ValueError: if the folder is missing or holds no audio file, or a file cannot be read or is empty (named).
    """
    import soundfile

    if not os.path.isdir(folder):
        raise ValueError(
            f"The noise folder {folder!r} does not exist (augment_noise_dir): give a folder of audio files."
        )
    extensions = {f".{name.lower()}" for name in soundfile.available_formats()} | {".oga", ".opus"}
    files, others = [], 0
    for root, _, names in os.walk(folder):
        for name in names:
            if os.path.splitext(name)[1].lower() in extensions:
                files.append(os.path.join(root, name))
            else:
                others += 1
    if not files:
        raise ValueError(
            f"The noise folder {folder!r} holds no audio file that soundfile reads (wav, flac, ogg, mp3, ...; "
            f"{others} other file(s)): add noise recordings or drop augment_noise_dir."
        )
    if others:
        logger.info("Noise folder %s: %d audio files; %d other files ignored.", folder, len(files), others)
    for path in files:
        try:
            frames = soundfile.info(path).frames
        except Exception as err:  # soundfile raises LibsndfileError, RuntimeError or OSError depending on the case
            raise ValueError(f"Cannot read the noise file {path}: {err}. Remove or replace it.") from err
        if frames == 0:
            raise ValueError(f"The noise file {path} holds no samples: remove it.")
    return sorted(files)


@functools.lru_cache(maxsize=32)
def _noise_clip(path: str, rate: int) -> np.ndarray:
    # Cached per process: the same few files are drawn again and again, and decoding + resampling dominates.
    return load_audio(path, target_rate=rate)


def mask_spans(rng: np.random.Generator, length: int, prob: float, span: int, min_spans: int) -> np.ndarray:
    """A (length,) boolean mask of random spans, counted as transformers' `_compute_mask_indices` counts them for one
    row (`prob * length / span` spans, rounded at random, at least `min_spans`, starts distinct), but drawn from
    `rng` rather than numpy's global RNG, and from the row's own length rather than the batch's."""
    mask = np.zeros(length, dtype=bool)
    starts = length - span + 1
    if prob == 0 or starts < 1:
        return mask
    count = min(max(int(prob * length / span + rng.random()), min_spans), starts)
    for start in rng.choice(starts, count, replace=False):
        mask[start : start + span] = True
    return mask


class Augmenter:
    """Applies an `AugmentationConfig` to one row at a time, with draws from `rng(key)`.

    Args:
        config: what to augment.
        sampling_rate: the rate of the waveforms it gets (the processor's); noise files are resampled to it.
        feature_size: the feature extractor's `feature_size`: masking needs log-mel features (more than 1 bin).

    Raises:
        ValueError: for feature masks with a waveform encoder, or a bad noise folder (see `noise_files`).
    """

    def __init__(self, config: AugmentationConfig, sampling_rate: int, feature_size: int):
        if config.masks_features and feature_size <= 1:
            raise ValueError(
                "augment_mask_time_prob / augment_mask_feature_prob mask log-mel input features (Whisper); this "
                "encoder reads the waveform (HuBERT, wav2vec2), and masks its own hidden states in train mode "
                "(its config's apply_spec_augment, mask_time_prob): use encoder_train_mode_augment for that."
            )
        self.config = config
        self.sampling_rate = sampling_rate
        self.noise_files = noise_files(config.noise_dir) if config.noise_dir is not None else []
        self._epoch = torch.zeros((), dtype=torch.long).share_memory_()

    @classmethod
    def from_args(cls, args, processor) -> Augmenter | None:
        """The augmenter `SpeechLlmTrainingArguments` ask for, set up for `processor`'s audio, or None (the default)
        when they ask for none."""
        config = AugmentationConfig.from_args(args)
        if config is None:
            return None
        return cls(config, processor.sampling_rate, processor.feature_extractor.feature_size)

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(epoch)

    def rng(self, key: str) -> np.random.Generator:
        """The generator of the row `key` (see `row_key`) in the current epoch."""
        words = np.frombuffer(hashlib.sha256(key.encode()).digest(), dtype=np.uint32)
        return np.random.default_rng([self.config.seed, self.epoch, *words.tolist()])

    def waveforms(self, clips: list[np.ndarray], rngs: list[np.random.Generator]) -> list[np.ndarray]:
        """`waveform` of each clip with its row's generator (a row with several clips passes its generator once per
        clip, in order)."""
        return [self.waveform(clip, rng) for clip, rng in zip(clips, rngs)]

    def mask_features(
        self, input_features: torch.Tensor, feature_attention_mask: torch.Tensor, rngs: list[np.random.Generator]
    ) -> torch.Tensor:
        """`features` of each clip of a processor batch: (clips, mel bins, frames) features with their (clips, frames)
        mask; unchanged without feature masks."""
        if not self.config.masks_features:
            return input_features
        lengths = feature_attention_mask.sum(-1).tolist()
        return torch.stack([self.features(f, n, rng) for f, n, rng in zip(input_features, lengths, rngs)])

    def waveform(self, waveform: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The clip sped up or slowed down, with noise added, then scaled, and clipped at full scale (+-1) as a real
        gain stage would; float32."""
        config, rate = self.config, self.sampling_rate
        if config.speeds:
            speed = float(rng.choice(config.speeds))
            if speed != 1:
                import soxr

                # Read as if recorded at rate * speed: back at `rate` it lasts 1 / speed as long.
                waveform = soxr.resample(waveform, rate * speed, rate)
        if self.noise_files and rng.random() < config.noise_prob:
            waveform = self.add_noise(waveform, rng)
        if config.gain_db is not None:
            waveform = waveform * 10 ** (rng.uniform(*config.gain_db) / 20)
        return np.clip(waveform, -1, 1).astype(np.float32)

    def add_noise(self, waveform: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """`waveform` plus a random stretch of a random noise file (repeated when shorter) at a random SNR. A silent
        clip has no level to set the noise against, and a silent stretch of noise no level to scale: either is
        returned as it is, the latter with a warning naming the file."""
        path = self.noise_files[rng.integers(len(self.noise_files))]
        noise = _noise_clip(path, self.sampling_rate)
        if len(noise) < len(waveform):
            noise = np.resize(noise, len(waveform))
        start = rng.integers(len(noise) - len(waveform) + 1)
        noise = noise[start : start + len(waveform)]
        snr = rng.uniform(*self.config.noise_snr_db)
        signal_power = float(np.mean(np.square(waveform, dtype=np.float64))) if len(waveform) else 0.0
        noise_power = float(np.mean(np.square(noise, dtype=np.float64))) if len(noise) else 0.0
        if signal_power == 0:
            return waveform
        if noise_power == 0:
            logger.warning("The noise file %s is silent where it was drawn: no noise added (trim its silence).", path)
            return waveform
        return waveform + noise * math.sqrt(signal_power / (noise_power * 10 ** (snr / 10)))

    def features(self, features: torch.Tensor, length: int, rng: np.random.Generator) -> torch.Tensor:
        """SpecAugment-style masks on one clip's (mel bins, frames) log-mel features, within its first `length`
        frames, set to 0 as `WhisperModel` masks its input features in training (`WhisperEncoder`, which the speech
        LLM runs, never does). Written here because transformers draws its masks from numpy's global RNG, batch by
        batch, which no per-row seed reaches."""
        config = self.config
        features = features.clone()
        time = mask_spans(rng, length, config.mask_time_prob, config.mask_time_length, MASK_TIME_MIN_MASKS)
        bins = mask_spans(
            rng, features.shape[0], config.mask_feature_prob, config.mask_feature_length, MASK_FEATURE_MIN_MASKS
        )
        features[:, : len(time)][:, torch.from_numpy(time)] = 0
        features[torch.from_numpy(bins)] = 0
        return features


class AugmentationEpoch(TrainerCallback):
    """Tells an `Augmenter` the epoch at each epoch's start (a resumed run's too, before its loader starts), so that a
    row draws anew each epoch."""

    def __init__(self, augmenter: Augmenter):
        self.augmenter = augmenter

    def on_epoch_begin(self, args, state, control, **kwargs):
        # state.epoch counts finished epochs plus the fraction of the current one (restored on resume).
        self.augmenter.set_epoch(math.floor(state.epoch or 0))


__all__ = ["AugmentationConfig", "Augmenter", "AugmentationEpoch", "row_key", "noise_files", "mask_spans"]
