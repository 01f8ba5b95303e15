"""The patch-level validity grid that `sample_block_masks` consumes, from a pixel-level USrc mask."""

from __future__ import annotations

import numpy as np


def patch_validity(mask: np.ndarray, grid: int = 14) -> np.ndarray:
    """bool [.., grid, grid]: a patch is valid when at least one of its pixels is (paper §4.2, P_valid).

    mask: bool or 0/1 [H, W] or [B, H, W]. Patch edges are floor(k * H / grid), so H and W need not be
    multiples of grid (224 / 14 = 16 pixels exactly); each side must hold at least `grid` pixels.
    """
    m = np.asarray(mask) != 0
    if m.ndim not in (2, 3):
        raise ValueError(f"mask must be [H, W] or [B, H, W], got shape {m.shape}")
    H, W = m.shape[-2:]
    if H < grid or W < grid:
        raise ValueError(f"mask {H}x{W} is smaller than the {grid}x{grid} patch grid")
    rows = (np.arange(grid) * H) // grid
    cols = (np.arange(grid) * W) // grid
    any_rows = np.logical_or.reduceat(m, rows, axis=-2)
    return np.logical_or.reduceat(any_rows, cols, axis=-1)
