"""Each rank sees a disjoint share of every epoch; evaluation counts every sample once."""

import numpy as np
import pytest

from distres.data.sharding import ShardSampler, epoch_order
from tests.helpers import FOLDER_RUN, read_metrics


def shard(n: int, rank: int, world: int, seed: int = 0, epoch: int = 0, shuffle: bool = True) -> list[int]:
    """This rank's sample indices for one epoch, as the sampler hands them out."""
    sampler = ShardSampler(n, max(1, n), rank, world, seed, shuffle=shuffle, drop_last=False)
    sampler.set_epoch(epoch)
    return [int(i) for batch in sampler.index_batches() for i in batch]


@pytest.mark.parametrize("n,world", [(10, 1), (10, 2), (13, 3), (100, 8), (7, 8)])
def test_shards_are_disjoint_and_cover_the_epoch(n, world):
    for epoch in range(3):
        parts = [shard(n, r, world, seed=5, epoch=epoch) for r in range(world)]
        flat = [i for p in parts for i in p]
        assert len(flat) == len(set(flat)) == n
        assert set(flat) == set(range(n))
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_order_reshuffles_per_epoch_and_depends_on_seed():
    assert shard(50, 0, 2, seed=1, epoch=0) != shard(50, 0, 2, seed=1, epoch=1)
    assert shard(50, 0, 2, seed=1, epoch=0) == shard(50, 0, 2, seed=1, epoch=0)
    assert shard(50, 0, 2, seed=1, epoch=0) != shard(50, 0, 2, seed=2, epoch=0)
    assert shard(50, 1, 2, shuffle=False) == list(range(1, 50, 2))


@pytest.mark.parametrize("n,world,batch", [(37, 2, 4), (37, 3, 5), (64, 4, 16), (9, 2, 5)])
def test_train_sampler_gives_every_rank_the_same_number_of_full_batches(n, world, batch):
    samplers = [ShardSampler(n, batch, r, world, seed=0, shuffle=True, drop_last=True) for r in range(world)]
    batches = [list(s) for s in samplers]
    expected = n // (world * batch)
    assert all(len(b) == expected for b in batches)
    assert all(len(x) == batch for b in batches for x in b)
    seen = [i for b in batches for x in b for i, _ in x]
    assert len(seen) == len(set(seen))


@pytest.mark.parametrize("n,world,batch", [(37, 2, 4), (37, 3, 5), (5, 4, 2)])
def test_eval_sampler_covers_every_sample_once(n, world, batch):
    seen = []
    for r in range(world):
        s = ShardSampler(n, batch, r, world, seed=0, shuffle=False, drop_last=False)
        got = [i for x in s for i, _ in x]
        assert len(s) == -(-len(got) // batch)
        seen += got
    assert sorted(seen) == list(range(n))


def test_resume_position_skips_the_batches_already_done():
    s = ShardSampler(40, 4, 1, 2, seed=0, shuffle=True, drop_last=True)
    s.set_epoch(2)
    full = list(s)
    s.set_epoch(2, start_sample=3 * 4 * 2)  # 3 global micro-batches of 4 x 2
    assert list(s) == full[3:] and len(s) == len(full) - 3


def _steps(n, world, batch, accum, epoch=1, start=0, repeats=1):
    """Each optimizer step's draws (ids) per slot (micro-batch a of rank r: slot a * world + r)."""
    out = {}
    for r in range(world):
        s = ShardSampler(n, batch, r, world, seed=4, shuffle=True, drop_last=True, repeats=repeats, accum=accum)
        s.set_epoch(epoch, start)
        for k, ids in enumerate(s.id_batches()):
            out.setdefault(k // accum, {})[(k % accum) * world + r] = ids.tolist()
    return [out[k] for k in sorted(out)]


@pytest.mark.parametrize("split", [(1, 8, 2), (2, 8, 1), (4, 4, 1), (1, 4, 4), (2, 2, 4)])
def test_a_step_takes_the_same_samples_whatever_the_split_of_its_global_batch(split):
    """Global batch 16 split as (processes, batch, grad-accum): step s always takes positions
    16s..16s+15 of the epoch's order; with the same batch and processes x accum, every slot
    (micro-batch) holds the same images, so BatchNorm sees the same batches."""
    order = epoch_order(100, 4, 1, True).tolist()
    steps = _steps(100, *split)
    assert len(steps) == 100 // 16
    for k, slots in enumerate(steps):
        assert sorted(i for ids in slots.values() for i in ids) == sorted(order[16 * k : 16 * k + 16])
    if split[1] == 8:
        assert steps == _steps(100, 2, 8, 1)


@pytest.mark.parametrize(
    "before,after", [((2, 8, 1), (1, 8, 2)), ((2, 8, 1), (4, 4, 1)), ((2, 8, 1), (1, 8, 1)), ((1, 4, 2), (3, 4, 2))]
)
def test_a_resume_with_another_split_takes_exactly_the_samples_left(before, after):
    """Interrupted after 3 steps of global batch 16; resumed at sample 48 with another split
    (the same global batch, or another): the rest of the epoch's order, each sample once, only
    the tail that fills no step left over."""
    n, done = 200, 3
    first = [i for slots in _steps(n, *before)[:done] for ids in slots.values() for i in ids]
    g_before = before[0] * before[1] * before[2]
    rest = [i for slots in _steps(n, *after, start=done * g_before) for ids in slots.values() for i in ids]
    order = epoch_order(n, 4, 1, True).tolist()
    g_after = after[0] * after[1] * after[2]
    assert sorted(first) == sorted(order[: done * g_before])
    expected = order[done * g_before :][: (n - done * g_before) // g_after * g_after]
    assert sorted(rest) == sorted(expected) and not set(first) & set(rest)


def test_repeated_augmentation_spreads_the_copies_over_ranks():
    n, world, batch, reps = 96, 4, 6, 3
    samplers = [
        ShardSampler(n, batch, r, world, seed=1, shuffle=True, drop_last=True, repeats=reps) for r in range(world)
    ]
    per_rank = [[pair for b in s for pair in b] for s in samplers]
    assert len({len(p) for p in per_rank}) == 1 and len(per_rank[0]) == n // world  # equal shares, same epoch length
    images = [i for p in per_rank for i, _ in p]
    seeds = [sd for p in per_rank for _, sd in p]
    assert len(set(seeds)) == len(seeds)  # every copy augmented differently
    counts = np.bincount(images, minlength=n)
    assert sorted(set(counts.tolist())) == [0, reps] and (counts == reps).sum() == n // reps
    # within one step the copies of an image are on different ranks
    batches = [list(s) for s in samplers]
    for k in range(n // (world * batch)):
        for r in range(world):
            mine = [i for i, _ in batches[r][k]]
            assert len(mine) == len(set(mine))
    # evaluation is not repeated
    ev = ShardSampler(n, batch, 0, 1, seed=1, shuffle=False, drop_last=False, repeats=reps)
    assert [i for b in ev for i, _ in b] == list(range(n))


def test_augmentation_seed_is_per_sample_not_per_worker():
    a = ShardSampler(20, 4, 0, 2, seed=0, shuffle=True, drop_last=True)
    b = ShardSampler(20, 4, 1, 2, seed=0, shuffle=True, drop_last=True)
    seeds = [sd for x in list(a) + list(b) for _, sd in x]
    assert len(set(seeds)) == len(seeds)


def test_eval_count_exact_with_two_processes(folder_run):
    """21 validation images on 2 ranks with batch 4 (the shared 2-rank run, conftest.folder_run):
    the shards are 11 + 10, batches 4+4+3 and 4+4+2, and the reduced count is exactly 21 at every
    evaluation (a padding sampler would report 22 or 24)."""
    _, out, _ = folder_run
    evals = [x for x in read_metrics(out) if x["kind"] == "eval"]
    assert sum(FOLDER_RUN["val"].values()) == 21
    assert [e["eval_samples"] for e in evals] == [21, 21]
    # train: 72 samples / 2 ranks = 36 each -> 9 steps of 4 per epoch, 2 epochs
    assert [x["step"] for x in read_metrics(out) if x["kind"] == "train"][-1] == 18
