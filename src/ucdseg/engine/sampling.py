"""Deterministic, resumable batches.

The order of training samples and each sample's random augmentation are pure functions of
``(seed, step, epoch, image)``, so a run resumed at iteration ``i`` sees exactly the batches an
uninterrupted run would, whatever the number of DataLoader workers or processes.
"""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler


def batches_per_epoch(num_items: int, batch_size: int) -> int:
    return max(1, num_items // batch_size)


def num_iterations(num_items: int, batch_size: int, epochs: float, iterations: int | None) -> int:
    if iterations is not None:
        return int(iterations)
    return max(1, math.ceil(epochs * batches_per_epoch(num_items, batch_size)))


class StepBatchSampler(Sampler[list]):
    """Yields, for iterations ``start..total-1``, this process's share of each global batch.

    Each element is ``(index, sample_seed)``: :class:`SeededSamples` uses the seed for the
    sample's augmentation. Each epoch is a fresh permutation drawn from ``(seed, epoch)``; a step
    with fewer images than a batch repeats its permutation to fill the batch.
    """

    def __init__(self, num_items: int, batch_size: int, total: int, seed: int, start: int = 0,
                 rank: int = 0, world_size: int = 1):
        if num_items < 1:
            raise ValueError("the step has no training image: check the task, the setting and the dataset")
        if batch_size % world_size:
            raise ValueError(f"global batch size {batch_size} is not divisible by {world_size} processes")
        self.num_items, self.batch_size, self.total = num_items, batch_size, total
        self.seed, self.start, self.rank, self.world_size = seed, start, rank, world_size
        self.per_epoch = batches_per_epoch(num_items, batch_size)

    def __len__(self) -> int:
        return max(0, self.total - self.start)

    def _permutation(self, epoch: int) -> np.ndarray:
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_items)
        return np.resize(perm, max(self.num_items, self.batch_size))

    def __iter__(self) -> Iterator[list]:
        local = self.batch_size // self.world_size
        epoch, perm = -1, None
        for it in range(self.start, self.total):
            e, b = divmod(it, self.per_epoch)
            if e != epoch:
                epoch, perm = e, self._permutation(e)
            batch = perm[b * self.batch_size:(b + 1) * self.batch_size]
            mine = batch[self.rank * local:(self.rank + 1) * local]
            yield [(int(i), self.seed * 1_000_003 + epoch * 10_007 + int(i)) for i in mine]


class SeededSamples(Dataset):
    """Reads ``dataset[index]`` with torch's RNG seeded by the sample's own seed."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]
