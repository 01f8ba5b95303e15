"""Eq. 6 epoch plan, DDP slicing and elastic exact resume.

One epoch (paper §4.3, Eq. 6): dataset i contributes ``min(|D_i|, N_t)`` samples; a capped dataset gets a
fresh random subset every epoch. The union is shuffled globally with a generator seeded by (seed, epoch),
so every rank and every worker computes the same *global order* without talking to each other.

Consumption is by global step: global batch ``s`` is ``order[s·B·W : (s+1)·B·W]`` and rank ``r`` takes the
``r``-th block of ``B`` inside it. Every rank therefore gets the same number of batches, and what has been
consumed is always a *prefix* of the global order. The state is ``(seed, epoch, consumed)``; restoring it
with any world size or batch size continues from ``order[consumed:]``: nothing repeated, nothing skipped.

The tail of an epoch that does not fill a whole global batch is dropped (``drop_last=True``, training:
the next epoch is a fresh shuffle, so it is a different tail each time) or padded by wrapping round to the
start of the order (``drop_last=False``, validation: every sample is seen, a few twice). Either way no rank
ever gets fewer batches than another, which is what keeps DDP from hanging.

Within a rank, loader workers take whole batches round-robin (batch ``t`` → worker ``t mod n_workers``);
DALI's parallel ``external_source`` and PyTorch's ``DataLoader`` both do exactly that with a batch index.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

DEFAULT_CAP = 50_000  # N_t of the paper


def epoch_order(dataset_sizes: Sequence[int], cap: int | None, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """Global sample ids (int64) of one epoch in consumption order.

    Sample ids are positions in the concatenation of the datasets in the given order: dataset ``i`` owns
    ids ``[start_i, start_i + |D_i|)``. ``cap=None`` takes every sample. ``shuffle=False`` keeps id order
    (validation) and, for capped datasets, the first ``cap`` samples.
    """
    sizes = np.asarray(dataset_sizes, dtype=np.int64)
    if (sizes < 0).any():
        raise ValueError(f"dataset sizes must be >= 0, got {list(dataset_sizes)}")
    if cap is not None and cap < 1:
        raise ValueError(f"cap N_t must be >= 1, got {cap}")
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    if not shuffle:
        parts = [np.arange(s, s + (n if cap is None else min(n, cap)), dtype=np.int64) for s, n in zip(starts, sizes)]
        return np.concatenate(parts) if parts else np.empty(0, np.int64)
    seq = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch) & 0xFFFFFFFF, 0x5EED])
    subset_seq, shuffle_seq = seq.spawn(2)
    subset_seqs = subset_seq.spawn(len(sizes))
    parts = []
    for i, (s, n) in enumerate(zip(starts, sizes)):
        if cap is not None and n > cap:
            # A fresh subset each epoch; its own stream per dataset, so adding a dataset at the end of the
            # list does not change the subsets the others draw.
            sub_rng = np.random.default_rng(subset_seqs[i])
            chosen = sub_rng.choice(n, size=cap, replace=False).astype(np.int64)
            chosen.sort()  # order inside the subset is irrelevant: the union is shuffled below
            parts.append(s + chosen)
        else:
            parts.append(np.arange(s, s + n, dtype=np.int64))
    order = np.concatenate(parts) if parts else np.empty(0, np.int64)
    np.random.default_rng(shuffle_seq).shuffle(order)
    return order


def eq6_probabilities(dataset_sizes: Sequence[int], cap: int | None) -> np.ndarray:
    """P(D_i) of Eq. 6."""
    sizes = np.asarray(dataset_sizes, dtype=np.float64)
    eff = sizes if cap is None else np.minimum(sizes, cap)
    return eff / eff.sum()


@dataclass
class SamplerState:
    seed: int
    epoch: int
    consumed: int  # global samples of this epoch already handed out (a prefix of the epoch order)


class EpochSampler:
    """Per-rank view of the global epoch order. Pure bookkeeping: it never touches data.

    ``batch_ids(t)`` gives the global sample ids of this rank's batch ``t`` of the current pass (the pass
    starts at ``consumed``); ``advance(n)`` records ``n`` finished steps of all ranks.
    """

    def __init__(
        self,
        dataset_sizes: Sequence[int],
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        cap: int | None = DEFAULT_CAP,
        shuffle: bool = True,
        drop_last: bool = True,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        self.dataset_sizes = [int(n) for n in dataset_sizes]
        if sum(self.dataset_sizes) == 0:
            raise ValueError("no samples to draw from: every dataset is empty")
        self.batch_size = int(batch_size)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.cap = cap
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.state = SamplerState(seed=int(seed), epoch=0, consumed=0)
        self._order_cache: tuple[tuple[int, int], np.ndarray] | None = None

    # -------------------------------------------------------------------------------------- plan
    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def order(self, epoch: int | None = None) -> np.ndarray:
        epoch = self.state.epoch if epoch is None else int(epoch)
        key = (self.state.seed, epoch)
        if self._order_cache is None or self._order_cache[0] != key:
            o = epoch_order(self.dataset_sizes, self.cap, self.state.seed, epoch, self.shuffle)
            self._order_cache = (key, o)
        return self._order_cache[1]

    def epoch_samples(self) -> int:
        return len(self.order())

    def _steps_for(self, n: int) -> int:
        g = self.global_batch
        if n <= 0:
            return 0
        return n // g if self.drop_last else -(-n // g)

    def batches_per_epoch(self) -> int:
        """Steps of a whole epoch at the current world and batch size (identical on every rank)."""
        return self._steps_for(self.epoch_samples())

    def remaining_batches(self) -> int:
        """Steps left in the current epoch from ``consumed`` (identical on every rank)."""
        return self._steps_for(self.epoch_samples() - self.state.consumed)

    def pass_ids(self) -> np.ndarray:
        """This rank's sample ids for the rest of the epoch, [remaining_batches, batch_size]."""
        order = self.order()
        n_steps = self.remaining_batches()
        g = self.global_batch
        need = n_steps * g
        rest = order[self.state.consumed :]
        if need > len(rest):  # pad (drop_last=False) by wrapping round to the start of the epoch order
            reps = -(-(need - len(rest)) // len(order))
            rest = np.concatenate([rest] + [order] * reps)
        rest = rest[:need].reshape(n_steps, self.world_size, self.batch_size)
        return np.ascontiguousarray(rest[:, self.rank, :])

    def batch_ids(self, t: int) -> np.ndarray:
        g = self.global_batch
        start = self.state.consumed + t * g + self.rank * self.batch_size
        order = self.order()
        idx = np.arange(start, start + self.batch_size) % len(order)
        return order[idx]

    # ------------------------------------------------------------------------------------- state
    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` from its beginning (unless it is the epoch a restored state is inside)."""
        epoch = int(epoch)
        if epoch != self.state.epoch:
            self.state = SamplerState(self.state.seed, epoch, 0)

    def advance(self, n_steps: int = 1) -> None:
        self.state.consumed += int(n_steps) * self.global_batch
        if self.state.consumed >= self.epoch_samples() or self.remaining_batches() == 0:
            self.state = SamplerState(self.state.seed, self.state.epoch + 1, 0)

    def state_dict(self) -> dict:
        return {"seed": self.state.seed, "epoch": self.state.epoch, "consumed": self.state.consumed}

    def load_state_dict(self, d: dict) -> None:
        try:
            st = SamplerState(int(d["seed"]), int(d["epoch"]), int(d["consumed"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"bad sampler state {d!r}: needs integer seed, epoch, consumed") from e
        if st.consumed < 0 or st.epoch < 0:
            raise ValueError(f"bad sampler state {d!r}: negative epoch or consumed")
        self.state = st
        if st.consumed > self.epoch_samples():
            raise ValueError(
                f"sampler state says {st.consumed} samples consumed, but epoch {st.epoch} has only "
                f"{self.epoch_samples()}: was the corpus changed since the checkpoint?"
            )
