"""Length-grouped sampling, so that a batch holds clips of similar duration and carries little padding.

This reuses transformers' `LengthGroupedSampler` / `get_length_grouped_indices` (random permutation -> megabatches
of `mega_batch_mult * batch_size` -> each megabatch sorted by length, longest batch first). It only adds what exact
resume needs: transformers' sampler draws from the generator it is given, or from torch's global RNG when given none
(as the Trainer builds it), so an epoch's order depends on every random draw made before it. Here each epoch uses a
fresh generator seeded from `(seed, epoch)`: the order is a pure function of them, identical on every process.

The Trainer calls `train_dataloader.set_epoch(epoch)` at the start of every epoch, resumed ones included, and
accelerate forwards it to the sampler's `set_epoch`. `SpeechLlmTrainer.get_train_dataloader` (a public hook) builds
its training loader with this sampler, the per-example durations as `lengths` and `batch_size` the global batch of
an optimizer step (per-device batch size * gradient_accumulation_steps * processes; transformers groups by the
per-device batch instead, which makes the order depend on the number of processes).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
from transformers.trainer_pt_utils import LengthGroupedSampler as _TransformersLengthGroupedSampler
from transformers.trainer_pt_utils import get_length_grouped_indices


class LengthGroupedSampler(_TransformersLengthGroupedSampler):
    """transformers' length-grouped sampler with a deterministic order per `(seed, epoch)`.

    Args:
        lengths: One length per example (durations in seconds, frames, tokens: any comparable number).
        batch_size: Examples per group; pass the global batch of an optimizer step (per-device batch size x
            gradient accumulation steps x processes).
        seed: Seed of the shuffling; the same on every process.
        mega_batch_mult: Batches per megabatch (sorted together); transformers' default when None: 50, or fewer so
            that there are at least 4 megabatches.
    """

    def __init__(
        self, lengths: Sequence[float], batch_size: int, seed: int = 0, mega_batch_mult: int | None = None
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1; got {batch_size}.")
        super().__init__(batch_size, lengths=[float(length) for length in lengths])
        self.seed = seed
        self.epoch = 0
        self.mega_batch_mult = mega_batch_mult

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch whose order the next iteration yields (the Trainer calls it through accelerate)."""
        self.epoch = epoch

    def __iter__(self):
        if not self.lengths:  # get_length_grouped_indices fails on an empty list
            return iter([])
        # SeedSequence mixes (seed, epoch) so that, unlike seed + epoch, seed 0 epoch 1 differs from seed 1 epoch 0.
        state = np.random.SeedSequence([self.seed, self.epoch]).generate_state(1, dtype=np.uint64)[0]
        generator = torch.Generator().manual_seed(int(state))
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, self.mega_batch_mult, generator))


def to_batches(indices: Sequence[int], batch_size: int) -> list[list[int]]:
    """Splits a sampler's index order into consecutive batches (the last one may be smaller)."""
    indices = list(indices)
    return [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]


def padding_fraction(lengths: Sequence[float], batches: Iterable[Sequence[int]]) -> float:
    """Share of padding in padded batches: padded frames / all frames, each batch padded to its longest example.

    Args:
        lengths: One length per example.
        batches: Each batch as a sequence of example indices.

    Returns:
        A fraction in [0, 1); 0.0 when there is nothing to pad.
    """
    total = padded = 0.0
    for batch in batches:
        batch_lengths = [lengths[i] for i in batch]
        if not batch_lengths:
            continue
        size = max(batch_lengths) * len(batch_lengths)
        total += size
        padded += size - sum(batch_lengths)
    return padded / total if total else 0.0


__all__ = ["LengthGroupedSampler", "to_batches", "padding_fraction"]
