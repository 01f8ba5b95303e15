"""Eq. 6 epoch plan, DDP slicing and elastic exact resume (pure bookkeeping, no data)."""

from __future__ import annotations

import numpy as np
import pytest

from usjepa.shards.sampler import EpochSampler, epoch_order, eq6_probabilities

SIZES = [5000, 1200, 300]
CAP = 1000


def dataset_of(ids: np.ndarray, sizes) -> np.ndarray:
    return np.searchsorted(np.cumsum(sizes), ids, side="right")


def test_epoch_takes_min_size_cap_per_dataset_and_fresh_subsets():
    o0 = epoch_order(SIZES, CAP, seed=3, epoch=0)
    o1 = epoch_order(SIZES, CAP, seed=3, epoch=1)
    assert len(o0) == len(set(o0.tolist())) == CAP + CAP + 300
    counts = np.bincount(dataset_of(o0, SIZES), minlength=3)
    assert counts.tolist() == [1000, 1000, 300]
    # capped datasets draw a fresh subset each epoch, uncapped ones take everything every epoch
    big0 = set(o0[dataset_of(o0, SIZES) == 0].tolist())
    big1 = set(o1[dataset_of(o1, SIZES) == 0].tolist())
    assert big0 != big1 and len(big0 & big1) < 600  # expected overlap 1000·1000/5000 = 200
    small = lambda o: set(o[dataset_of(o, SIZES) == 2].tolist())
    assert small(o0) == small(o1) == set(range(6200, 6500))
    np.testing.assert_array_equal(o0, epoch_order(SIZES, CAP, seed=3, epoch=0))  # reproducible
    assert not np.array_equal(o0, epoch_order(SIZES, CAP, seed=4, epoch=0))


def test_dataset_proportions_in_any_window_follow_eq6():
    p = eq6_probabilities(SIZES, CAP)
    np.testing.assert_allclose(p, [1000 / 2300, 1000 / 2300, 300 / 2300])
    # the global shuffle mixes datasets: a window of the order is a sample from Eq. 6 (chi-square, df = 2)
    for epoch in range(3):
        window = epoch_order(SIZES, CAP, seed=0, epoch=epoch)[:800]
        obs = np.bincount(dataset_of(window, SIZES), minlength=3)
        exp = p * len(window)
        chi2 = float(((obs - exp) ** 2 / exp).sum())
        assert chi2 < 13.8, (obs, exp)  # 99.9 % quantile of chi-square with 2 degrees of freedom


@pytest.mark.parametrize("world,batch", [(1, 8), (2, 5), (3, 4), (4, 1)])
def test_every_sample_exactly_once_across_ranks_and_equal_batch_counts(world, batch):
    sizes = [37, 23, 60]  # uncapped: 120 samples
    total = sum(sizes)
    samplers = [EpochSampler(sizes, batch, r, world, seed=1, cap=None, drop_last=False) for r in range(world)]
    lens = {s.remaining_batches() for s in samplers}
    assert len(lens) == 1  # identical on every rank
    ids = np.concatenate([s.pass_ids().ravel() for s in samplers])
    assert set(ids.tolist()) == set(range(total))  # every sample at least once (padding wraps round)
    n_pad = len(ids) - total
    assert 0 <= n_pad < world * batch
    # with drop_last the tail is dropped instead: no sample twice, still equal counts
    samplers = [EpochSampler(sizes, batch, r, world, seed=1, cap=None, drop_last=True) for r in range(world)]
    ids = np.concatenate([s.pass_ids().ravel() for s in samplers])
    assert len(ids) == len(set(ids.tolist())) == (total // (world * batch)) * world * batch
    assert len({s.remaining_batches() for s in samplers}) == 1


def test_divisible_epoch_covers_each_sample_exactly_once():
    sizes = [48, 16]
    samplers = [EpochSampler(sizes, 4, r, 2, seed=9, cap=None) for r in range(2)]
    ids = np.concatenate([s.pass_ids().ravel() for s in samplers])
    assert sorted(ids.tolist()) == list(range(64))


def global_sequence(sizes, cap, seed, epoch_steps, world, batch, start_state=None, n_steps=None):
    """Run ``world`` samplers in lock step; return the global sequence of ids ordered by (step, rank)."""
    samplers = [EpochSampler(sizes, batch, r, world, seed=seed, cap=cap) for r in range(world)]
    if start_state is not None:
        for s in samplers:
            s.load_state_dict(start_state)
    out = []
    steps = samplers[0].remaining_batches() if n_steps is None else n_steps
    per_rank = [s.pass_ids() for s in samplers]
    for t in range(steps):
        for r in range(world):
            out.append(per_rank[r][t])
            np.testing.assert_array_equal(per_rank[r][t], samplers[r].batch_ids(t))
    for s in samplers:
        s.advance(steps)
    return np.concatenate(out) if out else np.empty(0, np.int64), samplers[0].state_dict()


@pytest.mark.parametrize("new_world,new_batch", [(2, 6), (3, 6), (1, 5), (4, 2)])
def test_resume_at_random_step_continues_the_exact_global_order(new_world, new_batch):
    sizes, cap, seed = [500, 130, 70], 200, 11
    rng = np.random.default_rng(new_world * 10 + new_batch)
    full = epoch_order(sizes, cap, seed, 0)
    stop = int(rng.integers(1, 30))
    first, state = global_sequence(sizes, cap, seed, None, world=2, batch=6, n_steps=stop)
    assert state == {"seed": seed, "epoch": 0, "consumed": stop * 12}
    rest, end_state = global_sequence(sizes, cap, seed, None, world=new_world, batch=new_batch, start_state=state)
    seq = np.concatenate([first, rest])
    # nothing repeated, nothing skipped: the concatenation is a prefix of the one global order
    np.testing.assert_array_equal(seq, full[: len(seq)])
    assert len(full) - len(seq) < new_world * new_batch  # only the tail that fills no global batch is dropped
    assert end_state["epoch"] == 1 and end_state["consumed"] == 0


def test_set_epoch_keeps_a_restored_mid_epoch_position_and_bad_states_are_refused():
    s = EpochSampler([100], 4, 0, 1, seed=0, cap=None)
    s.load_state_dict({"seed": 0, "epoch": 2, "consumed": 40})
    s.set_epoch(2)
    assert s.state_dict()["consumed"] == 40 and s.remaining_batches() == 15
    s.set_epoch(3)
    assert s.state_dict() == {"seed": 0, "epoch": 3, "consumed": 0} and s.remaining_batches() == 25
    with pytest.raises(ValueError):
        s.load_state_dict({"seed": 0, "epoch": 0})
    with pytest.raises(ValueError):
        s.load_state_dict({"seed": 0, "epoch": 0, "consumed": 101})
    with pytest.raises(ValueError):
        EpochSampler([10], 4, rank=2, world_size=2)
