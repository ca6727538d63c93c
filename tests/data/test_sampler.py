"""Length-grouped sampling: a permutation per epoch, deterministic per (seed, epoch), little padding."""

from __future__ import annotations

import importlib.util

import pytest
from accelerate.data_loader import DataLoaderShard
from conftest import BENCHMARKS

from speechllm_hf.data import LengthGroupedSampler, padding_fraction, to_batches

_spec = importlib.util.spec_from_file_location("padding_benchmark", BENCHMARKS / "padding.py")
padding_benchmark = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(padding_benchmark)


@pytest.fixture(scope="module")
def durations() -> list[float]:
    return padding_benchmark.librispeech_like_durations(5000, seed=0).tolist()


def test_each_index_once_per_epoch(durations: list[float]) -> None:
    sampler = LengthGroupedSampler(durations, batch_size=16, seed=3)
    assert len(sampler) == len(durations)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        assert sorted(sampler) == list(range(len(durations)))
    assert sorted(LengthGroupedSampler([2.0, 1.0, 3.0], batch_size=8)) == [0, 1, 2]  # fewer examples than a batch
    assert list(LengthGroupedSampler([], batch_size=4)) == []


def test_order_is_a_function_of_seed_and_epoch(durations: list[float]) -> None:
    first, second = LengthGroupedSampler(durations, 16, seed=7), LengthGroupedSampler(durations, 16, seed=7)
    epoch0 = list(first)
    assert list(first) == epoch0  # iterating again does not advance any random state
    first.set_epoch(1)
    epoch1 = list(first)
    assert epoch1 != epoch0
    # A fresh sampler (a resumed run) jumps straight to epoch 1 and gets the same order.
    second.set_epoch(1)
    assert list(second) == epoch1
    assert list(LengthGroupedSampler(durations, 16, seed=8)) != epoch0
    # seed 0 / epoch 1 and seed 1 / epoch 0 must not collide (as seed + epoch would).
    shifted = LengthGroupedSampler(durations, 16, seed=0)
    shifted.set_epoch(1)
    assert list(shifted) != list(LengthGroupedSampler(durations, 16, seed=1))


def test_accelerate_forwards_set_epoch(durations: list[float]) -> None:
    # The Trainer calls `train_dataloader.set_epoch(epoch)` on accelerate's loader, which must reach the sampler.
    sampler = LengthGroupedSampler(durations[:64], batch_size=8, seed=0)
    loader = DataLoaderShard(list(range(64)), sampler=sampler, batch_size=8)
    loader.set_epoch(4)
    assert sampler.epoch == 4
    reference = LengthGroupedSampler(durations[:64], batch_size=8, seed=0)
    reference.set_epoch(4)
    assert [i for batch in loader for i in batch.tolist()] == list(reference)


def test_padding_fraction_counts_padded_frames() -> None:
    lengths = [1.0, 2.0, 3.0, 4.0]
    # Batch [1, 2] pads 1 of 4 frames; batch [3, 4] pads 1 of 8.
    assert padding_fraction(lengths, [[0, 1], [2, 3]]) == pytest.approx(2 / 12)
    assert padding_fraction(lengths, [[0], [1], [2], [3]]) == 0.0
    assert padding_fraction(lengths, []) == 0.0
    assert to_batches(range(5), 2) == [[0, 1], [2, 3], [4]]


def test_grouping_removes_most_padding(durations: list[float]) -> None:
    figures = padding_benchmark.measure(padding_benchmark.librispeech_like_durations(20000, seed=0), batch_size=16)
    assert figures["ratio"] <= padding_benchmark.GOAL == 0.05  # the grouped batches' padding fraction
    assert figures["random"] > 0.25
    assert figures["grouped_over_random"] < 0.1
    sampler = LengthGroupedSampler(durations, batch_size=16, seed=1)
    assert padding_fraction(durations, to_batches(list(sampler), 16)) <= 0.05
