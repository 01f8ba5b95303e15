"""Plain-Python twin of `usjepa.kernels.block_masks.sample_block_masks` (same algorithm, NumPy RNG).

It exists to be read, to test the Numba kernel against (the two agree in distribution, not bit for bit:
the kernel uses its own counter-based RNG), and as the baseline of benchmarks/bench_masks.py. The
algorithm is described step by step in docs/kernels.md; the comments below name the steps.
"""

from __future__ import annotations

import numpy as np

from .mask_config import PAD, MaskConfig, block_hw, block_size, check_inputs, scale_aspect, threshold


def grow_valid(valid: np.ndarray, n_min: int) -> np.ndarray:
    """Fallback 1: add the invalid patches nearest to the valid area (squared distance between patch
    centres; to the grid centre when nothing is valid; ties in raster order) until n_min patches are valid."""
    G = valid.shape[0]
    if valid.sum() >= n_min:
        return valid
    rows, cols = np.divmod(np.arange(G * G), G)
    flat = valid.ravel()
    if flat.any():
        vr, vc = rows[flat], cols[flat]
        d = ((2 * rows[:, None] - 2 * vr[None, :]) ** 2 + (2 * cols[:, None] - 2 * vc[None, :]) ** 2).min(1)
    else:
        d = (2 * rows - (G - 1)) ** 2 + (2 * cols - (G - 1)) ** 2
    candidates = [p for p in range(G * G) if not flat[p]]
    candidates.sort(key=lambda p: (d[p], p))
    grown = flat.copy()
    grown[candidates[: n_min - int(flat.sum())]] = True
    return grown.reshape(G, G)


def _count(area: np.ndarray, top: int, left: int, h: int, w: int) -> int:
    return int(area[top : top + h, left : left + w].sum())


def _place(rng, G, h, w, accept, max_tries):
    """Top-left corner uniform over the positions `accept` allows, all G-h+1 x G-w+1 of them eligible
    (I-JEPA's randint(0, G-h) never reaches the last row/column). Rejection first, then the exact
    enumeration, which draws from the same distribution; None when no position is acceptable."""
    for _ in range(max_tries):
        top, left = int(rng.integers(G - h + 1)), int(rng.integers(G - w + 1))
        if accept(top, left):
            return top, left
    ok = [(t, l) for t in range(G - h + 1) for l in range(G - w + 1) if accept(t, l)]
    return ok[int(rng.integers(len(ok)))] if ok else None


def _place_best(rng, G, h, w, area):
    """Fallback 2: uniform over the positions whose block covers the most patches of `area`."""
    counts = {(t, l): _count(area, t, l, h, w) for t in range(G - h + 1) for l in range(G - w + 1)}
    best = max(counts.values())
    ok = [pos for pos, c in counts.items() if c == best]
    return ok[int(rng.integers(len(ok)))]


def _block(G, top, left, h, w) -> np.ndarray:
    m = np.zeros((G, G), dtype=bool)
    m[top : top + h, left : left + w] = True
    return m


def _sample_one(valid, cfg, sizes, rng):
    """Masks of one image before equalisation: (context mask, [target masks], [rectangles])."""
    G, T = cfg.grid, cfg.n_targets
    (th, tw), (ch, cw), (t_scale, t_aspect) = sizes
    V = grow_valid(valid if cfg.usrc else np.ones((G, G), bool), cfg.min_keep + T)
    n_valid = int(V.sum())
    if cfg.tgt_scale_of == "valid":  # targets sized against this image's scan region
        th, tw = block_hw(t_scale * n_valid, t_aspect, G)
    tau_t = threshold(cfg.tau, th * tw, n_valid)
    tau_c = threshold(cfg.tau, ch * cw, n_valid)

    for _attempt in range(cfg.max_tries):
        # Targets (Eq. 3): |B_i ∩ V| >= tau, then M_i = B_i ∩ V; targets may overlap one another.
        tgt_pos = []
        for _ in range(T):
            pos = _place(rng, G, th, tw, lambda t, l: _count(V, t, l, th, tw) >= tau_t, cfg.max_tries)
            tgt_pos.append(pos if pos is not None else _place_best(rng, G, th, tw, V))
        targets = [_block(G, t, l, th, tw) & V for t, l in tgt_pos]
        free = V & ~np.logical_or.reduce(targets)
        # Context (Eq. 4): |B_c ∩ V| >= tau and at least min_keep patches left once the targets are removed.
        ctx_pos = _place(
            rng, G, ch, cw,
            lambda t, l: _count(V, t, l, ch, cw) >= tau_c and _count(free, t, l, ch, cw) >= cfg.min_keep,
            cfg.max_tries,
        )
        if ctx_pos is not None:
            context = _block(G, *ctx_pos, ch, cw) & free
            return context, targets, [ctx_pos] + tgt_pos, (th, tw)

    # Fallback 3 (every attempt left too little context): best context block of the last attempt, then
    # free valid patches outside it, then patches handed back from targets (never emptying a target),
    # in random order, until min_keep. |V| >= min_keep + T makes this always succeed.
    ctx_pos = _place_best(rng, G, ch, cw, free)
    context = _block(G, *ctx_pos, ch, cw) & free
    outside = np.flatnonzero((free & ~context).ravel())
    claimed = np.flatnonzero((V & ~free).ravel())
    cflat = context.ravel()
    tflat = [t.ravel() for t in targets]
    for p in list(rng.permutation(outside)) + list(rng.permutation(claimed)):
        if cflat.sum() >= cfg.min_keep:
            break
        holders = [t for t in tflat if t[p]]
        if any(t.sum() == 1 for t in holders):
            continue
        for t in holders:
            t[p] = False
        cflat[p] = True
    return context, targets, [ctx_pos] + tgt_pos, (th, tw)


def sample_block_masks_reference(valid, cfg: MaskConfig, seed: int, *, return_blocks: bool = False):
    """Same contract as `usjepa.kernels.block_masks.sample_block_masks`."""
    valid, seed = check_inputs(valid, cfg, seed)
    B, G, T = valid.shape[0], cfg.grid, cfg.n_targets
    batch_rng = np.random.default_rng([seed, 0])
    # One target size and one context size per batch, as in I-JEPA: without USrc every target then has
    # the same length and equalisation drops nothing.
    u = batch_rng.random(4)
    sizes = (block_size(u[0], u[1], cfg.tgt_scale, cfg.tgt_aspect, G),
             block_size(u[2], u[3], cfg.ctx_scale, cfg.ctx_aspect, G),
             scale_aspect(u[0], u[1], cfg.tgt_scale, cfg.tgt_aspect))
    rngs = [np.random.default_rng([seed, i + 1]) for i in range(B)]
    per_image = [_sample_one(valid[i], cfg, sizes, rngs[i]) for i in range(B)]

    # Lengths: each mask whole, PAD after it up to the longest of the batch; or ("batch_min") every mask
    # cut to the batch's smallest by a uniformly random subset (not raster truncation).
    ctx_n = [int(c.sum()) for c, _, _, _ in per_image]
    tgt_n = [int(t.sum()) for _, ts, _, _ in per_image for t in ts]
    pick = min if cfg.lengths == "batch_min" else max
    k_ctx, k_tgt = pick(ctx_n), pick(tgt_n)
    ctx_idx = np.full((B, k_ctx), PAD, np.int64)
    tgt_idx = np.full((T, B, k_tgt), PAD, np.int64)

    def kept(mask, rng, k):
        idx = np.flatnonzero(mask.ravel())
        return idx if len(idx) <= k else np.sort(rng.choice(idx, k, replace=False))

    for i, (context, targets, _, _) in enumerate(per_image):
        c = kept(context, rngs[i], k_ctx)
        ctx_idx[i, : len(c)] = c
        for j, t in enumerate(targets):
            t = kept(t, rngs[i], k_tgt)
            tgt_idx[j, i, : len(t)] = t
    if not return_blocks:
        return ctx_idx, tgt_idx
    ch, cw = sizes[1]
    blocks = np.array([[(t, l, ch, cw) if j == 0 else (t, l, *thw) for j, (t, l) in enumerate(rects)]
                       for _, _, rects, thw in per_image], dtype=np.int64)
    return ctx_idx, tgt_idx, blocks
