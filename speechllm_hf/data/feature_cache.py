"""Encoder-feature cache: with a frozen encoder and no augmentation, encode every clip once and train from disk.

The cache is a `datasets` Arrow file in `cache_dir` (memory-mapped when read), row-aligned with the training set,
with columns `audio_key` (which clip), `feature_length` (its feature frames/samples, for placeholder expansion) and
`encoder_states` (T', C). `cache_dir/cache_key.json` records the encoder (id and resolved revision, or for a local
folder or random encoder a hash of its weights as loaded; config and feature-extractor fingerprints): a cache built
for another encoder, or for other clips, is refused rather than silently used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os

import datasets
import numpy as np
import torch
from datasets.arrow_writer import ArrowWriter
from tqdm.auto import tqdm

from .audio import load_audio, unwrap_audio

logger = logging.getLogger(__name__)

KEY_FILE = "cache_key.json"
ARROW_FILE = "encoder_states.arrow"
# Rows read at a time when keying a dataset's clips: the audio column (arrays or encoded bytes) is never held whole.
_KEY_BATCH = 256


def _fingerprint(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def encoder_weights_hash(encoder: torch.nn.Module) -> str:
    """SHA-256 over the encoder's tensors (names, dtypes, shapes and bytes) as loaded."""
    digest = hashlib.sha256()
    for name, tensor in sorted(encoder.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def encoder_cache_key(model, processor) -> dict:
    """What the cached features depend on: the encoder's weights, its config, and the feature extractor.

    A Hub id is pinned by its resolved commit. A local folder (or a random encoder) has no revision, and its files can
    change in place, so the weights themselves are hashed as loaded.
    """
    config = model.config
    pinned = bool(config.encoder_name_or_path and config.encoder_revision)
    return {
        "encoder_name_or_path": config.encoder_name_or_path,
        "encoder_revision": config.encoder_revision,
        "encoder_config": _fingerprint(config.encoder_config.to_dict()),
        "encoder_weights": None if pinned else encoder_weights_hash(model.encoder),
        "feature_extractor": _fingerprint(processor.feature_extractor.to_dict()),
    }


def audio_key(audio) -> str:
    """Identity of a clip: path + size + modification time for files, a content hash for in-memory audio.

    The clip is the one `load_audio` decodes (see `unwrap_audio`): the bytes of a parquet `{"bytes", "path"}` dict,
    never its `path`, which names the original file. An array's key covers its sampling rate, dtype and shape too.
    """
    source, rate = unwrap_audio(audio)
    if isinstance(source, str):
        stat = os.stat(source)
        return f"{os.path.abspath(source)}:{stat.st_size}:{stat.st_mtime_ns}"
    digest = hashlib.sha256()
    if isinstance(source, bytes):
        digest.update(source)
    else:
        array = np.ascontiguousarray(np.asarray(source))
        digest.update(f"{rate}:{array.dtype.str}:{array.shape}:".encode())
        digest.update(array.tobytes())
    return "sha256:" + digest.hexdigest()


def _audio_keys(dataset: datasets.Dataset, audio_column: str) -> list[str]:
    return [
        audio_key(audio)
        for batch in dataset.select_columns([audio_column]).iter(batch_size=_KEY_BATCH)
        for audio in batch[audio_column]
    ]


def build_feature_cache(
    model,
    processor,
    dataset: datasets.Dataset,
    cache_dir: str | os.PathLike,
    *,
    audio_column: str = "audio",
    batch_size: int = 8,
    dtype: str = "float32",
) -> datasets.Dataset:
    """Encode every row's audio once and save the encoder outputs to `cache_dir`.

    Args:
        model: a `SpeechLlmForConditionalGeneration` with a frozen encoder and no encoder augmentation.
        processor: its processor.
        dataset: the (prepared) training rows.
        cache_dir: where the cache dataset and its key are written.
        audio_column: the audio column.
        batch_size: clips per encoder call.
        dtype: "float32" (bit-identical training) or "float16" (half the disk, ~1e-3 relative error).

    Returns:
        The cache dataset (row-aligned with `dataset`).
    """
    if any(p.requires_grad for p in model.encoder.parameters()):
        raise ValueError("An encoder-feature cache needs a frozen encoder.")
    rate = processor.sampling_rate
    model_was_training = model.training
    model.eval()

    def rows():
        for start in tqdm(range(0, len(dataset), batch_size), desc="encoding audio for the feature cache"):
            batch = dataset[start : start + batch_size][audio_column]
            clips = [load_audio(audio, target_rate=rate) for audio in batch]
            inputs = processor([processor.audio_token] * len(clips), audio=clips, sampling_rate=rate)
            hidden, lengths = model.encode_audio(inputs["input_features"], inputs["feature_attention_mask"])
            feature_lengths = inputs["feature_attention_mask"].sum(-1)
            for audio, states, length, feature_length in zip(batch, hidden, lengths, feature_lengths):
                yield {
                    "audio_key": audio_key(audio),
                    "feature_length": int(feature_length),
                    "encoder_states": states[: int(length)].to(getattr(torch, dtype)).cpu().numpy(),
                }

    features = datasets.Features(
        {
            "audio_key": datasets.Value("string"),
            "feature_length": datasets.Value("int64"),
            "encoder_states": datasets.Array2D(shape=(None, model.config.encoder_hidden_size), dtype=dtype),
        }
    )
    os.makedirs(cache_dir, exist_ok=True)
    # Streamed to an Arrow file row by row, so that a large corpus never has to fit in memory.
    arrow_path = os.path.join(cache_dir, ARROW_FILE)
    with torch.no_grad(), ArrowWriter(features=features, path=arrow_path) as writer:
        for row in rows():
            writer.write(row)
        writer.finalize()
    model.train(model_was_training)
    cache = datasets.Dataset.from_file(arrow_path)
    with open(os.path.join(cache_dir, KEY_FILE), "w") as file:
        json.dump(encoder_cache_key(model, processor), file, indent=2)
    logger.info("Cached encoder features of %d clips in %s.", len(cache), cache_dir)
    return cache


def attach_feature_cache(
    dataset: datasets.Dataset, cache_dir: str | os.PathLike, model, processor, *, audio_column: str = "audio"
) -> datasets.Dataset:
    """`dataset` with the cached `feature_length` and `encoder_states` columns added.

    `encoder_states` reads as numpy arrays straight from the memory-mapped Arrow file: as nested Python lists (the
    default format) converting a batch back to a tensor would cost more than the encoder it replaces.

    Raises:
        ValueError: when the cache was built for another encoder or feature extractor, or for other clips.
    """
    with open(os.path.join(cache_dir, KEY_FILE)) as file:
        stored = json.load(file)
    expected = encoder_cache_key(model, processor)
    if stored != expected:
        differing = sorted(k for k in expected if stored.get(k) != expected[k])
        raise ValueError(
            f"The feature cache in {cache_dir} was built for another encoder ({', '.join(differing)} differ: "
            f"cache {[stored.get(k) for k in differing]} vs model {[expected[k] for k in differing]}). "
            "Rebuild it (delete the folder) or point to the right one."
        )
    cache = datasets.Dataset.from_file(os.path.join(cache_dir, ARROW_FILE))
    if len(cache) != len(dataset) or _audio_keys(dataset, audio_column) != cache["audio_key"]:
        raise ValueError(
            f"The feature cache in {cache_dir} holds other clips than this dataset ({len(cache)} cached rows, "
            f"{len(dataset)} rows, or files changed since). Rebuild it."
        )
    attached = datasets.concatenate_datasets([dataset, cache.remove_columns("audio_key")], axis=1)
    return attached.with_format("numpy", columns=["encoder_states"], output_all_columns=True)


def with_feature_cache(
    dataset: datasets.Dataset, cache_dir: str | os.PathLike, model, processor, *, audio_column: str = "audio"
) -> datasets.Dataset:
    """`dataset` with its cached encoder features (`attach_feature_cache`), the cache being built first in `cache_dir`
    when it holds none (`build_feature_cache`).

    With several processes, call it under `TrainingArguments.main_process_first(local=False)`, as
    `SpeechLlmTrainer` does: the main process builds the cache while the others wait, and they then read it.
    """
    if not os.path.exists(os.path.join(cache_dir, KEY_FILE)):
        build_feature_cache(model, processor, dataset, cache_dir, audio_column=audio_column)
    return attach_feature_cache(dataset, cache_dir, model, processor, audio_column=audio_column)


__all__ = [
    "with_feature_cache",
    "build_feature_cache",
    "attach_feature_cache",
    "encoder_cache_key",
    "encoder_weights_hash",
    "audio_key",
]
