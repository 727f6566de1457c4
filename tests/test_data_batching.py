"""Deterministic, resumable, per-rank batches."""
import itertools

import pytest

from libs.data.batching import StepBatchSampler


def _take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def test_ranks_split_each_global_batch():
    r0, r1 = (_take(StepBatchSampler(100, 10, rank=r, world_size=2, seed=1), 20) for r in (0, 1))
    for a, b in zip(r0, r1):
        assert len(a) == len(b) == 5 and not set(a) & set(b)
    epoch = [i for batch in r0[:10] + r1[:10] for i in batch]
    assert len(set(epoch)) == 100                       # one epoch covers every item once


def test_resume_continues_the_same_stream():
    full = _take(StepBatchSampler(37, 8, seed=3), 12)
    assert _take(StepBatchSampler(37, 8, seed=3, start=5), 7) == full[5:]


def test_epochs_are_reshuffled_and_seeded():
    s = _take(StepBatchSampler(16, 8, seed=0), 4)
    assert s[:2] != s[2:]
    assert _take(StepBatchSampler(16, 8, seed=0), 4) == s
    assert _take(StepBatchSampler(16, 8, seed=1), 4) != s


@pytest.mark.parametrize('kwargs, match', [
    (dict(n_items=100, global_batch=10, world_size=3), 'not divisible by the 3 processes'),
    (dict(n_items=5, global_batch=10), 'fewer than one global batch'),
])
def test_bad_sizes(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StepBatchSampler(**kwargs)
