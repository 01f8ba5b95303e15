"""Validation from a deterministic slice of the training split, for corpora ingested without one.

Ingest holds out groups (videos, volumes, patients) by ``sha1(group) < val_fraction``; on a small corpus this
can leave nothing at all (the 12 shared POCUS videos at 5 %: 0 validation frames). ``held_out_groups``
instead ranks the training split's groups by ``sha1("holdout", group)`` (then by name) and takes the first
``ceil(fraction x groups)`` of them (at least one, never all): a group never straddles the two sides, the
slice is the same on every rank, run and machine, and it is never empty. The groups and their ranking keys
come from the corpus table (``group``, ``group_holdout``: computed once when the table is built), so holding
out reads no sample member; ``open_sample_table(root, split, val_from_train=f)`` applies it.
"""

from __future__ import annotations

import math

import numpy as np

from usjepa.shards.format import stable_unit_hash


class HoldoutError(ValueError):
    """The training split cannot give up a validation slice (fewer than two groups, or a bad fraction)."""


def holdout_key(group: str) -> float:
    """The ranking key of a group (stored per group in the corpus table)."""
    return stable_unit_hash("holdout\0" + group)


def held_out_groups(keys: np.ndarray, present: np.ndarray, fraction: float, where: str = "") -> np.ndarray:
    """bool [G]: the groups held out for validation, among the ``present`` ones.

    ``keys`` float64 [G] are ``holdout_key`` per group id; group ids follow the sorted group names, so sorting
    by (key, id) is sorting by (key, name)."""
    if not 0 < fraction < 1:
        raise HoldoutError(f"val_from_train must lie in (0, 1), got {fraction}")
    ids = np.flatnonzero(present)
    if len(ids) < 2:
        raise HoldoutError(f"{where}: the training split has {len(ids)} group(s); holding out validation needs at "
                           f"least 2")
    ranked = ids[np.lexsort((ids, keys[ids]))]
    held = np.zeros(len(keys), bool)
    held[ranked[: min(len(ids) - 1, max(1, math.ceil(fraction * len(ids))))]] = True
    return held
