import pytest
import torch
from torch.utils.data import Dataset

from ucdseg.engine.sampling import SeededSamples, StepBatchSampler, num_iterations


def test_epochs_to_iterations():
    assert num_iterations(100, 16, 1.0, None) == 6  # 100 // 16 full batches per epoch
    assert num_iterations(100, 16, 2.5, None) == 15
    assert num_iterations(5, 16, 1.0, None) == 1  # fewer images than a batch: one batch per epoch
    assert num_iterations(100, 16, 1.0, 42) == 42


def test_each_epoch_is_a_permutation_and_epochs_differ():
    sampler = StepBatchSampler(12, 4, total=6, seed=1)
    batches = [[i for i, _ in b] for b in sampler]
    assert len(batches) == 6
    epoch0, epoch1 = sum(batches[:3], []), sum(batches[3:], [])
    assert sorted(epoch0) == list(range(12)) and sorted(epoch1) == list(range(12))
    assert epoch0 != epoch1


def test_resume_yields_the_remaining_batches_exactly():
    full = list(StepBatchSampler(10, 3, total=9, seed=5))
    resumed = list(StepBatchSampler(10, 3, total=9, seed=5, start=4))
    assert resumed == full[4:]


def test_processes_split_each_global_batch():
    full = list(StepBatchSampler(16, 4, total=5, seed=2))
    r0 = list(StepBatchSampler(16, 4, total=5, seed=2, rank=0, world_size=2))
    r1 = list(StepBatchSampler(16, 4, total=5, seed=2, rank=1, world_size=2))
    assert [a + b for a, b in zip(r0, r1)] == full


def test_small_step_fills_the_batch_and_errors():
    (batch,) = list(StepBatchSampler(3, 5, total=1, seed=0))
    assert sorted({i for i, _ in batch}) == [0, 1, 2] and len(batch) == 5
    with pytest.raises(ValueError, match="no training image"):
        StepBatchSampler(0, 4, total=1, seed=0)
    with pytest.raises(ValueError, match="not divisible"):
        StepBatchSampler(10, 5, total=1, seed=0, world_size=2)


class RandomValue(Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, index):
        return torch.rand(1).item()


def test_sample_augmentation_depends_only_on_its_seed():
    data = SeededSamples(RandomValue())
    a = data[(0, 123)]
    torch.rand(10)  # global RNG use in between must not matter
    assert data[(0, 123)] == a
    assert data[(0, 124)] != a
    state = torch.get_rng_state()
    data[(1, 7)]
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left untouched
