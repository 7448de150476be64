"""Samplers that make a K-process run see the same global batches as a one-process run, evaluation shards
without duplicates, the gather of eval outputs, per-sample seeding in loader workers, and EMA maths."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from mambakit.engine.distributed import (DistEnv, EpochBatchSampler, SeededSamples, ShardSampler, gather_outputs,
                                         resolve_device, split_sizes)
from mambakit.engine.ema import ModelEMA


def batches(sampler):
    return [[index for _, index in batch] for batch in sampler]


@pytest.mark.parametrize("n, batch, world, drop_last", [(50, 8, 2, True), (50, 8, 2, False), (45, 12, 4, False),
                                                        (64, 16, 4, True), (23, 6, 3, False)])
def test_ranks_together_see_the_one_process_batches(n, batch, world, drop_last):
    single = batches(EpochBatchSampler(n, batch, seed=3, epoch=2, drop_last=drop_last))
    shards = [batches(EpochBatchSampler(n, batch, seed=3, epoch=2, rank=r, world_size=world, drop_last=drop_last))
              for r in range(world)]
    assert all(len(s) == len(single) for s in shards)
    for b, expected in enumerate(single):
        assert [i for r in range(world) for i in shards[r][b]] == expected
    flat = [i for b in single for i in b]
    assert len(set(flat)) == len(flat)                           # a permutation: no sample twice
    assert len(flat) == (n // batch * batch if drop_last else n)


def test_order_depends_on_seed_and_epoch_only():
    a = batches(EpochBatchSampler(40, 8, seed=1, epoch=0))
    assert a == batches(EpochBatchSampler(40, 8, seed=1, epoch=0))
    assert a != batches(EpochBatchSampler(40, 8, seed=1, epoch=1))
    assert a != batches(EpochBatchSampler(40, 8, seed=2, epoch=0))
    torch.manual_seed(123)                                       # the global generator plays no part
    assert a == batches(EpochBatchSampler(40, 8, seed=1, epoch=0))
    assert batches(EpochBatchSampler(10, 4, seed=1, epoch=0, shuffle=False, drop_last=False)) == \
        [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_start_offset_skips_whole_global_batches():
    full = batches(EpochBatchSampler(40, 8, seed=5, epoch=1, rank=1, world_size=2))
    resumed = EpochBatchSampler(40, 8, seed=5, epoch=1, rank=1, world_size=2, start_batch=3)
    assert batches(resumed) == full[3:] and len(resumed) == 2
    with pytest.raises(ValueError, match="start_batch=6 is outside the epoch's 5 batches"):
        EpochBatchSampler(40, 8, seed=5, epoch=1, start_batch=6)


def test_global_batch_sizes_and_split_sizes():
    sampler = EpochBatchSampler(45, 8, seed=0, epoch=0, drop_last=False)
    assert [sampler.global_batch_size(b) for b in range(len(sampler))] == [8] * 5 + [5]
    assert split_sizes(5, 2) == [3, 2] and split_sizes(2, 4) == [1, 1, 0, 0] and split_sizes(8, 4) == [2] * 4


@pytest.mark.parametrize("n, world", [(10, 3), (2, 4), (0, 2), (9, 1)])
def test_eval_shards_cover_the_split_once_in_order(n, world):
    shards = [list(ShardSampler(n, r, world)) for r in range(world)]
    assert [i for s in shards for i in s] == list(range(n))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_gather_outputs_single_process_concatenates_batches():
    env = DistEnv()
    out = gather_outputs([{"x": torch.arange(3), "id": ["a", "b", "c"]}, {"x": torch.arange(2), "id": ["d", "e"]}],
                         env)
    assert torch.equal(out["x"], torch.tensor([0, 1, 2, 0, 1])) and out["id"] == ["a", "b", "c", "d", "e"]
    assert gather_outputs([], env) == {}


def test_gather_outputs_errors_name_the_problem():
    env = DistEnv()
    with pytest.raises(ValueError, match="output 'loss' is a 0-d tensor"):
        gather_outputs([{"loss": torch.tensor(1.0)}], env)
    with pytest.raises(ValueError, match="returned keys"):
        gather_outputs([{"a": torch.zeros(2)}, {"b": torch.zeros(2)}], env)
    with pytest.raises(ValueError, match="different numbers of samples"):
        gather_outputs([{"a": torch.zeros(2), "b": torch.zeros(3)}], env)


class Augmented(Dataset):
    """Returns its index plus noise from every global generator (python, numpy, torch)."""

    def __len__(self):
        return 24

    def __getitem__(self, i):
        return torch.tensor([float(i), random.random(), float(np.random.rand()), float(torch.rand(()))])


def test_worker_randomness_depends_on_the_sample_not_the_worker():
    def load(workers, start_batch):
        sampler = EpochBatchSampler(24, 4, seed=9, epoch=1, start_batch=start_batch)
        loader = DataLoader(SeededSamples(Augmented(), seed=9), batch_sampler=sampler, num_workers=workers,
                            generator=torch.Generator().manual_seed(workers))
        return {int(row[0]): row[1:] for batch in loader for row in batch}

    two_workers, three_workers_resumed = load(1, 0), load(2, 2)
    assert set(three_workers_resumed) < set(two_workers)
    for index, noise in three_workers_resumed.items():
        assert torch.equal(noise, two_workers[index])
    assert len({tuple(v.tolist()) for v in two_workers.values()}) == 24    # different per sample


def test_main_process_loading_leaves_seeding_to_the_global_generators():
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    first = SeededSamples(Augmented(), seed=9)[(0, 5)]
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    again = SeededSamples(Augmented(), seed=9)[(0, 5)]
    other = SeededSamples(Augmented(), seed=9)[(0, 5)]
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_cuda_requested_without_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(ValueError, match="train.device=cuda, but CUDA is not available"):
        resolve_device("cuda")
    assert resolve_device("auto") == torch.device("cpu")


def test_ema_update_maths_against_float64():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema = ModelEMA(model, decay=0.9)
    expected = {k: v.double().clone() for k, v in model.state_dict().items()}
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
            model[1].running_mean.add_(1.0)
            model[1].num_batches_tracked += 5
        ema.update(model)
        for key, value in model.state_dict().items():
            if value.is_floating_point():
                expected[key] = 0.9 * expected[key] + 0.1 * value.double()
            else:
                expected[key] = value.double()
    for key, value in ema.state_dict().items():
        torch.testing.assert_close(value.double(), expected[key], rtol=1e-6, atol=1e-6)
    assert ema.state_dict()["1.num_batches_tracked"].item() == 15
    assert not any(p.requires_grad for p in ema.module.parameters()) and not ema.module.training
    with pytest.raises(ValueError, match=r"ema_decay must be in \(0, 1\)"):
        ModelEMA(model, 1.0)


def test_explicit_order_is_cut_into_global_batches_and_shared_by_ranks():
    order = [3, 3, 1, 0, 2, 2, 5, 4, 4]                 # with repeats, e.g. weighted sampling with replacement
    single = batches(EpochBatchSampler(6, 4, seed=0, epoch=0, order=order, drop_last=False))
    assert single == [[3, 3, 1, 0], [2, 2, 5, 4], [4]]
    ranks = [batches(EpochBatchSampler(6, 4, seed=0, epoch=0, order=order, rank=r, world_size=2)) for r in (0, 1)]
    assert ranks == [[[3, 3], [2, 2]], [[1, 0], [5, 4]]]   # drop_last: the single leftover sample is dropped
