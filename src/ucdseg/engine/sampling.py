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

    ``memory``: exemplars at indices ``num_items .. num_items + memory - 1``, replacing a random
    half of every global batch (``mixing="replace_half"``, SSUL main.py:429-443: the positions drawn
    from ``(seed, iteration)``, the exemplars taken in turn from a permutation of the memory per
    memory epoch). With ``mixing="concat"`` the caller counts them in ``num_items`` instead.
    """

    def __init__(self, num_items: int, batch_size: int, total: int, seed: int, start: int = 0,
                 rank: int = 0, world_size: int = 1, memory: int = 0, mixing: str = "concat"):
        if num_items < 1:
            raise ValueError("the step has no training image: check the task, the setting and the dataset")
        if batch_size % world_size:
            raise ValueError(f"global batch size {batch_size} is not divisible by {world_size} processes")
        if mixing not in ("concat", "replace_half"):
            raise ValueError(f"unknown memory mixing {mixing!r}; expected concat or replace_half")
        self.num_items, self.batch_size, self.total = num_items, batch_size, total
        self.seed, self.start, self.rank, self.world_size = seed, start, rank, world_size
        self.per_epoch = batches_per_epoch(num_items, batch_size)
        self.memory = memory if mixing == "replace_half" else 0

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
            batch = [(int(i), self.seed * 1_000_003 + epoch * 10_007 + int(i))
                     for i in perm[b * self.batch_size:(b + 1) * self.batch_size]]
            if self.memory:
                self._with_memory(it, batch)
            yield batch[self.rank * local:(self.rank + 1) * local]

    def _with_memory(self, it: int, batch: list) -> None:
        """Half of the batch's positions (drawn from ``(seed, it)``) take the memory's next exemplars."""
        positions = np.random.default_rng([self.seed, it, 1]).permutation(len(batch))[: len(batch) // 2]
        for k, position in enumerate(sorted(int(p) for p in positions)):
            turn = it * len(positions) + k
            memory_epoch, offset = divmod(turn, self.memory)
            order = np.random.default_rng([self.seed, memory_epoch, 2]).permutation(self.memory)
            batch[position] = (self.num_items + int(order[offset]), self.seed * 1_000_003 + 7_919 * turn + 1)


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
