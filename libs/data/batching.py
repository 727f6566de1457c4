"""Deterministic, resumable batches for every process: micro-batch s of rank r is a fixed index slice.

Epoch e shuffles the data with a generator seeded by (seed, e); global micro-batch s takes the next
`global_batch` indices of that permutation (the remainder of an epoch is dropped), and rank r takes
its contiguous share. Starting at micro-batch s reproduces exactly what an uninterrupted run sees.
The sampler runs in the training process (DataLoader workers only load the items it names), so the number of
workers does not change which items a micro-batch holds. Each epoch's permutation is turned into a list once, so
the per-step work is a list slice.
"""
import torch

__all__ = ['StepBatchSampler', 'per_rank_batch']


def per_rank_batch(global_batch, world_size):
    """Each process's share of a global batch; ValueError unless it splits evenly."""
    if global_batch % world_size:
        raise ValueError(f"the global batch size {global_batch} is not divisible by the {world_size} processes; use "
                         f"a multiple of {world_size}")
    return global_batch // world_size


class StepBatchSampler(torch.utils.data.Sampler):
    """Endless iterator of index lists (per-rank micro-batches), starting at micro-batch `start`."""

    def __init__(self, n_items, global_batch, rank=0, world_size=1, seed=0, start=0):
        self.per_rank = per_rank_batch(global_batch, world_size)
        if n_items < global_batch:
            raise ValueError(f"the data set has {n_items} items, fewer than one global batch of {global_batch}")
        self.n, self.global_batch, self.seed, self.start = n_items, global_batch, seed, start
        self.offset = rank * self.per_rank
        self.batches_per_epoch = n_items // global_batch

    def __iter__(self):
        s, epoch, perm = self.start, None, None
        while True:
            e, k = divmod(s, self.batches_per_epoch)
            if e != epoch:
                generator = torch.Generator().manual_seed(self.seed * 7919 + e)
                epoch, perm = e, torch.randperm(self.n, generator=generator).tolist()
            begin = k * self.global_batch + self.offset
            yield perm[begin:begin + self.per_rank]
            s += 1

    def __len__(self):
        return self.batches_per_epoch
