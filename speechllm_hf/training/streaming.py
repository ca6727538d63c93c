"""What training on a stream (`datasets.IterableDataset`, e.g. `load_manifest(..., streaming=True)`) cannot do.

A stream has no length and no random access. The Trainer needs `max_steps` to know when to stop, and the options that
read the whole training set first (length grouping by the `duration` column, the encoder-feature cache, a seeded
subset) need map-style data; each is refused by name before anything is read, instead of failing inside the Trainer.
"""

from __future__ import annotations

import datasets


def check_stream(args, train_dataset) -> None:
    """Refuses the training arguments a streamed `train_dataset` cannot honour; nothing for map-style data.

    Raises:
        ValueError: naming the option: `max_steps` unset, `group_by_duration`, `feature_cache_dir` or `data_subset`.
    """
    if not isinstance(train_dataset, datasets.IterableDataset):
        return
    stream = "train_dataset is a stream (datasets.IterableDataset, e.g. --streaming)"
    if args.max_steps <= 0:
        raise ValueError(
            f"{stream}: it has no length, so training cannot count epochs: set max_steps (--max_steps N), the "
            "number of optimizer steps to train for."
        )
    if args.group_by_duration:
        raise ValueError(
            f"{stream}: group_by_duration sorts the whole training set by its duration column, which a stream does "
            "not have before it is read: pass group_by_duration=False (--group_by_duration False), or load the data "
            "map-style (without --streaming) to keep length grouping."
        )
    if args.feature_cache_dir is not None:
        raise ValueError(
            f"{stream}: feature_cache_dir encodes every clip of the training set once, before training, which needs "
            "map-style data: drop feature_cache_dir, or load the data without --streaming."
        )
    if args.data_subset is not None:
        raise ValueError(
            f"{stream}: data_subset draws a random subset of the rows, which needs their number: drop data_subset "
            "(max_steps bounds what a stream trains on), or load the data without --streaming."
        )


__all__ = ["check_stream"]
