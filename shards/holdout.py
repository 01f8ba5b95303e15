"""Validation from a deterministic slice of the training split, for corpora ingested without one.

Ingest holds out groups (videos, volumes, patients) by ``sha1(group) < val_fraction``; on a small corpus this
can leave nothing at all (the 12 shared POCUS videos at 5 %: 0 validation frames). ``split_off_validation``
instead ranks the training split's groups by ``sha1("holdout", group)`` and takes the first
``ceil(fraction x groups)`` of them (at least one, never all): a group never straddles the two sides, the
slice is the same on every rank, run and machine, and it is never empty. Groups come from each sample's
metadata member (one small read per sample, once per loader); a sample whose metadata is unreadable is a
group of its own.
"""

from __future__ import annotations

import math

import numpy as np

from usjepa.shards.format import SampleMeta, ShardFormatError, stable_unit_hash
from usjepa.shards.readers import SampleTable


class HoldoutError(ValueError):
    """The training split cannot give up a validation slice (fewer than two groups, or a bad fraction)."""


def sample_groups(table: SampleTable) -> list[str]:
    reader = table.reader_view()
    groups = []
    try:
        for i in range(len(table)):
            if i % 4096 == 0:  # issue 21.2: a remote corpus fetches these members in coalesced ranges
                reader.prefetch(np.arange(i, min(i + 4096, len(table))))
            try:
                meta = reader._bytes(int(table.shard[i]), table.meta_offset[i], table.meta_size[i])
                groups.append(SampleMeta.from_json(meta).group)
            except (OSError, ShardFormatError, UnicodeDecodeError, ValueError, KeyError):
                groups.append("sample:" + table.key(i))
    finally:
        reader.close()
    return groups


def subset(table: SampleTable, keep: np.ndarray, split: str) -> SampleTable:
    """The rows of ``table`` where ``keep`` is true, in the same order (datasets stay contiguous)."""
    bounds = np.cumsum([0, *table.dataset_sizes])
    sizes = [int(keep[a:b].sum()) for a, b in zip(bounds[:-1], bounds[1:])]
    names = [n for n, k in zip(table.dataset_names, sizes) if k]
    pick = lambda a: a[keep].copy()  # noqa: E731
    return SampleTable(root=table.root, split=split, shard_paths=table.shard_paths, dataset_names=names,
                       dataset_sizes=[k for k in sizes if k], shard=pick(table.shard),
                       jpg_offset=pick(table.jpg_offset), jpg_size=pick(table.jpg_size),
                       mask_offset=pick(table.mask_offset), mask_size=pick(table.mask_size),
                       meta_offset=pick(table.meta_offset), meta_size=pick(table.meta_size), keys=pick(table.keys),
                       skipped=table.skipped, remote=table.remote)


def split_off_validation(train: SampleTable, fraction: float) -> tuple[SampleTable, SampleTable]:
    """(the training rows left to train on, the held-out validation rows)."""
    if not 0 < fraction < 1:
        raise HoldoutError(f"val_from_train must lie in (0, 1), got {fraction}")
    groups = sample_groups(train)
    ranked = sorted(set(groups), key=lambda g: (stable_unit_hash("holdout\0" + g), g))
    if len(ranked) < 2:
        raise HoldoutError(f"{train.root}: the training split has {len(ranked)} group(s); holding out validation "
                         f"needs at least 2")
    held = set(ranked[: min(len(ranked) - 1, max(1, math.ceil(fraction * len(ranked))))])
    is_val = np.fromiter((g in held for g in groups), dtype=bool, count=len(groups))
    return subset(train, ~is_val, "train"), subset(train, is_val, "val")
